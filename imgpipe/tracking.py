"""The one home of MLflow logging: one run per pipeline execution, shared by all its stages.

How stages find their run, first match wins:

1. ``MLFLOW_RUN_ID`` in the environment (MLflow's own variable; Kubeflow passes it in);
2. the run tagged with this execution's key: the ``dvc repro`` / ``dvc exp run`` process that
   started the stage, identified by host, PID and start time, so every stage that one
   ``dvc repro`` runs logs into the same run;
3. a new run (a stage run alone from the command line).

The tracking URI is ``MLFLOW_TRACKING_URI`` when set, else a local SQLite file ``mlflow.db``
with artifacts in ``mlartifacts/`` beside it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "imgpipe"
EXECUTION_TAG = "imgpipe.execution"
SQLITE = "sqlite:///"
RUN_TAGS = (EXECUTION_TAG, "git_commit", "dvc_data_md5")
"""Tags of the run itself, set when it is opened; every other tag belongs to a stage."""
_ORCHESTRATORS = {("dvc", "repro"), ("dvc", "exp")}


def tracking_uri(root: Path | None = None) -> str:
    root = (root or Path.cwd()).resolve()
    return os.environ.get("MLFLOW_TRACKING_URI") or f"{SQLITE}{root / 'mlflow.db'}"


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time in clock ticks) of ``pid`` from /proc, or None off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces
    return int(fields[1]), fields[19]


def _proc_args(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def execution_key() -> str | None:
    """Identify the DVC process this stage runs under, or None when run on its own."""
    pid = os.getppid()
    for _ in range(32):
        stat = _proc_stat(pid)
        if stat is None or pid <= 1:
            return None
        args = [Path(a).name if i < 2 else a for i, a in enumerate(_proc_args(pid))]
        for i, arg in enumerate(args[:3]):
            if arg == "dvc" and i + 1 < len(args) and (arg, args[i + 1]) in _ORCHESTRATORS:
                return f"{socket.gethostname()}:{pid}:{stat[1]}"
        pid = stat[0]
    return None


def git_commit(root: Path) -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def dvc_data_hash(root: Path) -> str:
    """The md5 that ``data.dvc`` records for the raw data, or ``untracked``."""
    try:
        outs = yaml.safe_load((root / "data.dvc").read_text())["outs"]
        return str(outs[0]["md5"])
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return "untracked"


def ensure_experiment(mlflow: Any, root: Path, name: str | None = None) -> str:
    """The experiment's id, created if new (with SQLite, artifacts go to ``mlartifacts/``
    beside the database file; a relative path is taken from ``root``)."""
    name = name or os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    location = None
    uri = mlflow.get_tracking_uri()
    if uri.startswith(SQLITE):  # artifacts beside the database file
        location = (root / uri[len(SQLITE) :]).resolve().parent.joinpath("mlartifacts").as_uri()
    try:
        return str(mlflow.create_experiment(name, artifact_location=location))
    except Exception:  # created meanwhile by a concurrent stage
        return str(mlflow.get_experiment_by_name(name).experiment_id)


def _find_run(mlflow: Any, experiment_id: str, key: str) -> str | None:
    runs = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string=f"tags.`{EXECUTION_TAG}` = '{key}'",
        max_results=1,
        output_format="list",
    )
    return runs[0].info.run_id if runs else None


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (each stage runs in its own
    process, under DVC and under Kubeflow alike). On Linux from VmHWM, which starts afresh at
    exec; ``ru_maxrss`` would carry over the peak of the parent (dvc, the KFP runner)."""
    import resource
    import sys

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


@contextlib.contextmanager
def stage_run(stage: str, root: Path | None = None) -> Iterator[Any]:
    """Open (or rejoin) this execution's MLflow run for ``stage``; close it FAILED on error.

    >>> with stage_run("ingest") as run:
    ...     mlflow.log_metric("ingest.images", 2624)
    """
    import mlflow

    root = (root or Path.cwd()).resolve()
    mlflow.set_tracking_uri(tracking_uri(root))
    run_id = os.environ.get("MLFLOW_RUN_ID")
    key = execution_key()
    if not run_id:
        experiment_id = ensure_experiment(mlflow, root)
        run_id = _find_run(mlflow, experiment_id, key) if key else None
    if run_id:
        run = mlflow.start_run(run_id=run_id)
    else:
        run = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}",
            tags=dict(
                zip(
                    RUN_TAGS,
                    (
                        key or f"standalone:{stage}:{time.time_ns()}",
                        git_commit(root),
                        dvc_data_hash(root),
                    ),
                    strict=True,
                )
            ),
        )
    mlflow.set_tag(f"stage.{stage}", "running")
    started = time.perf_counter()
    try:
        yield run
    except BaseException:
        mlflow.set_tag(f"stage.{stage}", "failed")
        mlflow.end_run(status="FAILED")
        raise
    mlflow.log_metrics(
        {
            f"{stage}.wall_seconds": round(time.perf_counter() - started, 2),
            f"{stage}.peak_rss_mb": round(peak_rss_mb(), 1),
        }
    )
    mlflow.set_tag(f"stage.{stage}", "done")
    mlflow.end_run()


def log_params(prefix: str, params: Any) -> None:
    """Log a params dataclass as ``<prefix>.<field>``."""
    import dataclasses

    import mlflow

    values = dataclasses.asdict(params)
    mlflow.log_params(
        {
            f"{prefix}.{k}": (",".join(map(str, v)) if isinstance(v, list | tuple) else v)
            for k, v in values.items()
        }
    )
