"""The one home of MLflow logging: one run per pipeline execution, shared by all its stages.

How stages find their run, first match wins:

1. ``MLFLOW_RUN_ID`` in the environment (MLflow's own variable; Kubeflow passes it in);
2. the run tagged with this execution's key: the ``dvc repro`` / ``dvc exp run`` process that
   started the stage, identified by host, PID and start time, so every stage that one
   ``dvc repro`` runs logs into the same run;
3. a new run (a stage run alone from the command line).

The tracking URI is ``MLFLOW_TRACKING_URI`` when set, else a local SQLite file ``mlflow.db``
with artifacts in ``mlartifacts/`` beside it.

A run is named and tied to what produced it when it is opened (``run_identity``): under
``dvc exp run`` it takes the experiment's name, else a readable ``repro-<commit>-<time>``; tags
give the commit, whether the tree was dirty, the params that differ from the baseline commit,
the DVC experiment and baseline, and the data version. The experiment is tagged as a
classification experiment, so MLflow's UI opens it in its model-training view.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from imgpipe.tracking.access import needs, on_experiment, on_run

EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "imgpipe"
EXECUTION_TAG = "imgpipe.execution"
COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own: the UI shows it as the run's source version
DIRTY_TAG = "git.dirty"
PARAMS_CHANGED_TAG = "params.changed"
EXPERIMENT_TAG, BASELINE_TAG = "dvc.experiment", "dvc.baseline"
DATA_VERSION_TAG = "data.version"
RUN_TAGS = (
    EXECUTION_TAG,
    COMMIT_TAG,
    DIRTY_TAG,
    PARAMS_CHANGED_TAG,
    EXPERIMENT_TAG,
    BASELINE_TAG,
    DATA_VERSION_TAG,
)
"""Tags of the run itself, set when it is opened; every other tag belongs to a stage."""
EXPERIMENT_KIND = ("mlflow.experimentKind", "classification")
"""MLflow 3's experiment type: a classification experiment opens in the model-training view
(runs, metrics, charts), not the GenAI one (traces, sessions)."""
HEADLINE_VIEW = "headline"
HEADLINE_COLUMNS = (
    "attributes.`Dataset`",
    "metrics.`test.accuracy`",
    "metrics.`test.balanced_accuracy`",
    "metrics.`test.argmax.accuracy`",
    "metrics.`finetune.val_accuracy`",
    "metrics.`frozen.val_accuracy`",
    "metrics.`blessed`",
    "tags.`params.changed`",
)
"""The runs-table columns a person looks at first: the data, test and validation accuracy,
the blessing, what changed. MLflow 3.17 has no server-side default columns; its shared views are
experiment tags (``mlflow.sharedViewState.<key>``) that the UI opens from
``#/experiments/<id>/runs?viewStateShareKey=<key>``, which ``make ui`` prints."""


def view_tags() -> dict[str, str]:
    """The experiment's tags: its kind and the headline view."""
    import json

    view = {"selectedColumns": list(HEADLINE_COLUMNS)}
    return dict([EXPERIMENT_KIND, (f"mlflow.sharedViewState.{HEADLINE_VIEW}", json.dumps(view))])


def headline_url(ui: str, experiment_id: str) -> str:
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={HEADLINE_VIEW}"


SQLITE = "sqlite:///"
STAGE_LOG_DB = "mlflow.db"
"""The database file of a Kubeflow step's own MLflow store (``pipelines.kubeflow_step``)."""
_ORCHESTRATORS = {("dvc", "repro"), ("dvc", "exp")}


def tracking_uri(root: Path | None = None) -> str:
    root = (root or Path.cwd()).resolve()
    return os.environ.get("MLFLOW_TRACKING_URI") or f"{SQLITE}{root / 'mlflow.db'}"


def execution_key() -> str | None:
    """Identify the DVC process this stage runs under (``dvc repro`` or ``dvc exp``, walking up
    the process tree), or None when run on its own."""
    import psutil

    try:
        process = psutil.Process(os.getppid())
        for _ in range(32):
            if process.pid <= 1:
                return None
            args = [Path(a).name if i < 2 else a for i, a in enumerate(process.cmdline())]
            for i, arg in enumerate(args[:3]):
                if arg == "dvc" and i + 1 < len(args) and (arg, args[i + 1]) in _ORCHESTRATORS:
                    return f"{socket.gethostname()}:{process.pid}:{process.create_time()}"
            parent = process.parent()
            if parent is None:
                return None
            process = parent
    except psutil.Error:  # gone, or not ours to read
        return None
    return None


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, check=True
    ).stdout


def git_state(root: Path, generated: Iterable[str] = ()) -> tuple[str, bool]:
    """The commit checked out and whether tracked files differ from it, not counting the
    pipeline's own outputs (``generated``: DVC deletes a git-tracked metrics file before it
    reruns the stage); ``unknown`` outside a git repository."""
    try:
        commit = _git(root, "rev-parse", "HEAD").strip()
        status = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    ours = tuple(str(path).rstrip("/") for path in generated)
    changed = [line[3:] for line in status.splitlines()]
    dirty = any(
        path not in ours and not path.startswith(tuple(f"{o}/" for o in ours)) for path in changed
    )
    return commit, dirty


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params as MLflow params: ``section.key`` -> value, lists joined with commas."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list | tuple):
            flat[name] = ",".join(map(str, value))
        else:
            flat[name] = str(value)
    return flat


def changed_params(root: Path, baseline: str, params: Mapping[str, Any]) -> str:
    """``key: old -> new`` for every param that differs from params.yaml at ``baseline``
    (what ``dvc params diff`` shows), ``none`` when nothing does, ``unknown`` without git."""
    try:
        committed = yaml.safe_load(_git(root, "show", f"{baseline}:params.yaml")) or {}
    except (OSError, subprocess.CalledProcessError, yaml.YAMLError):
        return "unknown"
    old, new = flatten(committed), flatten(params)
    changes = [
        f"{key}: {old.get(key, '(none)')} -> {new.get(key, '(none)')}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    ]
    text = "; ".join(changes) or "none"
    return text if len(text) <= 5000 else text[:4990] + " ..."  # MLflow's tag value limit


def run_identity(
    root: Path,
    params: Mapping[str, Any] | None,
    started_by: str,
    generated: Iterable[str] = (),
) -> tuple[str, dict[str, str]]:
    """The name and tags of a new run. ``started_by``: ``repro`` under DVC, else the stage;
    ``generated``: the pipeline's outputs, which do not make the tree dirty."""
    commit, dirty = git_state(root, generated)
    experiment = os.environ.get("DVC_EXP_NAME", "")
    baseline = os.environ.get("DVC_EXP_BASELINE_REV", "") or commit
    tags = {
        COMMIT_TAG: commit,
        DIRTY_TAG: str(dirty).lower(),
        DATA_VERSION_TAG: dvc_data_hash(root),
    }
    if params is not None:
        tags[PARAMS_CHANGED_TAG] = changed_params(root, baseline, params)
    if experiment:
        tags.update({EXPERIMENT_TAG: experiment, BASELINE_TAG: baseline})
        return experiment, tags
    short = commit[:7] + ("-dirty" if dirty else "")
    return f"{started_by}-{short}-{time.strftime('%m%d-%H%M%S')}", tags


def dvc_data_hash(root: Path) -> str:
    """The md5 that ``data.dvc`` records for the raw data, or ``untracked``."""
    try:
        outs = yaml.safe_load((root / "data.dvc").read_text())["outs"]
        return str(outs[0]["md5"])
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return "untracked"


def experiment_name() -> str:
    """The pipeline's experiment: ``MLFLOW_EXPERIMENT_NAME``, else ``imgpipe``."""
    return os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)


def ensure_experiment(mlflow: Any, root: Path, name: str | None = None) -> str:
    """The experiment's id, created if new (with SQLite, artifacts go to ``mlartifacts/``
    beside the database file; a relative path is taken from ``root``)."""
    name = name or experiment_name()
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        for key, value in view_tags().items():  # made before these tags existed
            if experiment.tags.get(key) != value:
                mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
        return str(experiment.experiment_id)
    location = None
    uri = mlflow.get_tracking_uri()
    if uri.startswith(SQLITE):  # artifacts beside the database file
        location = (root / uri[len(SQLITE) :]).resolve().parent.joinpath("mlartifacts").as_uri()
    try:
        return str(mlflow.create_experiment(name, artifact_location=location, tags=view_tags()))
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
def stage_run(
    stage: str,
    root: Path | None = None,
    params: Mapping[str, Any] | None = None,
    generated: Iterable[str] = (),
) -> Iterator[Any]:
    """Open (or rejoin) this execution's MLflow run for ``stage``; close it FAILED on error.
    A new run gets its name and tags (``run_identity``) and, when ``params`` (all of
    params.yaml) is given, every param: two runs of one pipeline have the same param keys
    whichever stages they ran.

    >>> with stage_run("ingest") as run:
    ...     mlflow.log_metric("ingest.images", 2624)
    """
    import mlflow

    root = (root or Path.cwd()).resolve()
    mlflow.set_tracking_uri(tracking_uri(root))
    run_id = os.environ.get("MLFLOW_RUN_ID")
    key = execution_key()
    experiment = experiment_name()
    with needs(
        on_run(run_id) if run_id else on_experiment(experiment),
        f"log stage {stage} into " + (f"run {run_id}" if run_id else f"experiment {experiment!r}"),
    ):
        if not run_id:
            experiment_id = ensure_experiment(mlflow, root)
            run_id = _find_run(mlflow, experiment_id, key) if key else None
        if run_id:
            run = mlflow.start_run(run_id=run_id)
        else:
            name, tags = run_identity(root, params, "repro" if key else stage, generated)
            tags[EXECUTION_TAG] = key or f"standalone:{stage}:{time.time_ns()}"
            run = mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags)
            if params is not None:
                log_params(flatten(params))
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


def log_params(flat: Mapping[str, str]) -> None:
    """Log flattened params, in batches of MLflow's limit of 100."""
    import mlflow

    items = list(flat.items())
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i : i + 100]))


SPLIT_CONTEXTS = {"train": "train", "val": "validation", "test": "test"}
"""Manifest split -> MLflow dataset context (and dataset name)."""


def log_datasets(manifest: Path, source: str, version: str) -> None:
    """The manifest's splits as MLflow datasets of the active run, which MLflow's runs table
    shows in its Dataset column: name and context ``train``/``validation``/``test``, source
    where the images came from, digest ``<data version>-<split>``: the first 12 characters of
    the data version (DVC's md5 of the raw data) and 8 of a digest of the split's image
    hashes, since one data version can be split differently (ingest params)."""
    import hashlib
    import warnings

    import mlflow
    from mlflow.data.pandas_dataset import from_pandas

    from imgpipe.data.manifest import read_manifest_frame

    frame = read_manifest_frame(manifest, all_text=True)
    inputs = []
    for split, context in SPLIT_CONTEXTS.items():
        rows = frame[frame["split"] == split].reset_index(drop=True)
        content = hashlib.md5("\n".join(sorted(rows["sha256"])).encode()).hexdigest()
        digest = f"{version.removesuffix('.dir')[:12]}-{content[:8]}"
        with warnings.catch_warnings():  # MLflow warns that it infers the schema
            warnings.simplefilter("ignore")
            dataset = from_pandas(rows, source=source, targets="label", name=context, digest=digest)
        inputs.append((dataset, context))
    for dataset, context in inputs:
        mlflow.log_input(dataset, context=context)
