"""The hostile-input and failure cases of ``python -m bench.faults``, as tests: each group runs
in a process of its own, and every case must end as expected with no file written outside the
folders its component may write. (The gRPC server's cases are its contract tests in
tests/code/test_serving.py; the bench runs them against the demo's model too.)"""

from __future__ import annotations

import pytest

from bench.faults import run_group

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("group", ["feedback", "images", "request_log", "monitor", "sidecar"])
def test_each_fault_case_ends_as_expected_and_writes_nothing_outside(
    group, tmp_path, export_classifier
):
    saved_model = None
    if group == "sidecar":
        saved_model = export_classifier(
            tmp_path / "models" / "tiny" / "1", "tiny", ("crack", "finger", "intact"), seed=1
        )
    rows = run_group(group, tmp_path / group, saved_model)
    assert rows, group
    failed = [
        f"{r['case']}: expected {r['expected']!r}, got {r['outcome']!r}"
        for r in rows
        if not r["ok"]
    ]
    assert not failed, "\n".join(failed)
    assert [r["case"] for r in rows if r["files_outside"]] == []
    lost = [r for r in rows if r["records_lost"] is not None]
    assert all(r["records_lost"] <= r["records_lost_bound"] for r in lost), lost
