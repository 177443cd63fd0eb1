"""A finished process ends without the interpreter's teardown only when nothing is lost by it:
the exit status stays what it would have been, and a process with work still running, or
pytest's own process, ends the usual way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

STEP = """
import atexit, multiprocessing, sys, time
from imgpipe.core.process import end_at_exit_without_teardown

atexit.register(lambda: print("teardown ran", flush=True))  # as TensorFlow's and MLflow's hooks
print("work done", flush=True)
{before}
end_at_exit_without_teardown({main!r})
{after}
"""


def _run(
    tmp_path: Path, after: str, main: str = "step", before: str = ""
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "step.py").write_text(STEP.format(main=main, before=before, after=after))
    return subprocess.run(
        [sys.executable, "-m", "step"],
        cwd=tmp_path,
        env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_finished_step_skips_the_teardown_with_status_0(tmp_path):
    done = _run(tmp_path, "")
    assert (done.returncode, done.stdout) == (0, "work done\n"), done


CHILD = "multiprocessing.Process(target=time.sleep, args=(0.5,)).start()"


@pytest.mark.parametrize(
    ("before", "after", "status", "why"),
    [
        ("", "raise RuntimeError('writing the outputs failed')", 1, "an uncaught exception"),
        ("", "sys.exit(3)", 3, "an explicit exit status"),
        (CHILD, "", 0, "a child process still runs"),
    ],
)
def test_the_usual_exit_where_the_teardown_matters(tmp_path, before, after, status, why):
    done = _run(tmp_path, after, before=before)
    assert done.returncode == status, (why, done)
    assert done.stdout == "work done\nteardown ran\n", (why, done)


def test_nothing_changes_in_a_process_whose_main_module_is_another(tmp_path):
    """As in pytest's own process, which calls the Kubeflow step's code in some tests: its exit
    status says whether the suite passed."""
    done = _run(tmp_path, "sys.exit(2)", main="kfp.dsl.executor_main")
    assert (done.returncode, done.stdout) == (2, "work done\nteardown ran\n"), done
