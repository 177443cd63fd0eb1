"""Ending a finished process without the interpreter's teardown.

With TensorFlow loaded, the interpreter's teardown (freeing every module, running every
library's exit hooks) takes about 2 s per process on 2 cores and does nothing for a process
whose work is done: every file it wrote is closed (atomic writes). Every stage process pays it
once (``dvc repro``, a kfp.local step), so the ``imgpipe`` console script and the Kubeflow steps
skip it, but only when nothing is left running that the teardown would have waited for.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import NoReturn


def nothing_pending() -> bool:
    """True when no other thread, no child process and no MLflow run is still open: nothing
    that the interpreter's teardown would join, end or flush."""
    import multiprocessing
    import threading

    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if any(not t.daemon for t in others) or multiprocessing.active_children():
        return False
    mlflow = sys.modules.get("mlflow")
    return mlflow is None or mlflow.active_run() is None


def end_now(code: int) -> NoReturn:
    """End the process with ``code`` once the log handlers and standard streams are flushed."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def end_at_exit_without_teardown(main: str) -> None:
    """When the process's main module is ``main`` (run as ``python -m main``): once that module
    has run to its end, end the process at once with status 0 (if :func:`nothing_pending`),
    before the teardown and the other exit hooks. Anywhere else (a test calling the same code
    in pytest's process, whose exit status says whether the suite passed) it does nothing.

    For a process whose main module is not ours (KFP's ``executor_main`` writes the step's
    outputs after the component returns): call it once the work has succeeded. The hook steps
    aside, and the process ends as it would have, when the main module ended by an uncaught
    exception (it left ``sys.last_value``) or by ``sys.exit`` (noted as it is called: the
    status it carries is not readable at exit), or something is still running. A bare
    ``raise SystemExit`` after the call would end with status 0: KFP's executor raises none.
    Exit hooks run last registered first, so this one runs before those registered earlier
    (TensorFlow's, MLflow's).
    """
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is None or spec.name != main:
        return
    exit_ = sys.exit

    def exit_noted(status: str | int | None = None) -> NoReturn:
        _exits.append(status)
        exit_(status)

    sys.exit = exit_noted
    atexit.register(_end_if_finished)


_exits: list[object] = []


def _end_if_finished() -> None:
    if getattr(sys, "last_value", None) is None and not _exits and nothing_pending():
        end_now(0)
