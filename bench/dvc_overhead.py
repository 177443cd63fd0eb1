"""Pipeline overhead: the time of a ``dvc repro`` that has nothing to do, and which stages DVC
would rerun after one fine-tuning parameter changes (only finetune and what follows it).

    python -m bench.dvc_overhead --repeats 3

Needs an up-to-date pipeline (``make demo``). With the parameter changed in params.yaml, two
questions go to DVC without running anything: which stages the change invalidates
(``dvc status``: finetune only, nothing upstream), and which stages a repro would then run
(``dvc repro --dry --force-downstream``: a dry run cannot see that finetune's new model will
change evaluate's inputs, so downstream stages are counted as they will be). The file's exact
text is put back afterwards, also on error or interrupt. (tests/e2e/test_pipeline_dvc.py runs the
same change for real on a tiny project.) Writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from bench.machine import describe

DVC = str(Path(sys.executable).with_name("dvc"))
RAN = re.compile(r"Running stage '([^']+)'")


def dvc(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run([DVC, *args], capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(f"dvc {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result


def stale_stages() -> dict[str, Any]:
    return json.loads(dvc("status", "--json").stdout or "{}")


def would_run(params_file: Path, section: str, key: str, value: Any) -> tuple[list[str], list[str]]:
    """With ``section.key`` set to ``value`` in params.yaml: the stages it invalidates, and
    the stages a repro would run (those and everything downstream of them)."""
    from imgpipe.core.fileio import atomic_path

    def write(data: bytes) -> None:
        with atomic_path(params_file) as tmp:
            tmp.write_bytes(data)

    original = params_file.read_bytes()
    params = yaml.safe_load(original)
    params[section][key] = value
    try:
        write(yaml.safe_dump(params, sort_keys=False).encode())
        invalidated = list(stale_stages())
        return invalidated, RAN.findall(dvc("repro", "--dry", "--force-downstream").stdout)
    finally:
        write(original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/dvc_overhead.json"))
    args = parser.parse_args()

    stale = stale_stages()
    if stale:
        raise SystemExit(
            f"the pipeline is not up to date ({', '.join(stale)} changed): run `dvc repro` "
            "(or `make demo`) first, so that a no-op repro is a no-op"
        )
    seconds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        out = dvc("repro").stdout
        seconds.append(time.perf_counter() - started)
        if RAN.search(out):
            raise SystemExit(f"`dvc repro` ran stages on an up-to-date pipeline:\n{out}")
    learning_rate = yaml.safe_load(args.params.read_text())["finetune"]["learning_rate"]
    invalidated, rerun = would_run(args.params, "finetune", "learning_rate", learning_rate * 2)
    if stale_stages():
        raise SystemExit(f"{args.params} was not restored: `git diff {args.params}`")
    stages = list(yaml.safe_load(Path("dvc.yaml").read_text())["stages"])
    expected = stages[stages.index("finetune") :]
    report = {
        "benchmark": "dvc_overhead",
        "machine": describe(),
        "repeats": args.repeats,
        "noop_repro_seconds": [round(s, 2) for s in seconds],
        "median_noop_repro_seconds": round(statistics.median(seconds), 2),
        "changed_param": "finetune.learning_rate",
        "stages_invalidated": invalidated,
        "stages_rerun": rerun,
        "only_finetune_and_after": invalidated == ["finetune"] and rerun == expected,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
