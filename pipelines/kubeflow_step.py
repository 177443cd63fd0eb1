"""What a Kubeflow component does around a stage: params.yaml with the run's overlays, the
artifacts' paths, MLflow pointed at the right store, the stage itself (``pipelines.runner``,
as the CLI runs it), then its metrics handed to KFP.

Imported inside the generated component functions (KFP ships a component's source, not its
module), from the project installed in the components image (``infra/docker``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# ``kfp.dsl.executor_main``, the main module of every step's process (KFP's lightweight
# components): once a step's work has succeeded, its process ends without the interpreter's
# teardown (about 2 s with TensorFlow loaded; ``imgpipe.core.process``) after the executor has
# written the step's outputs.
from kfp.dsl.component_factory import EXECUTOR_MODULE

from imgpipe.core.errors import InputError
from imgpipe.core.process import end_at_exit_without_teardown
from imgpipe.tracking.access import needs, on_experiment, on_run
from pipelines.kubeflow_trainer import SHARED


def run(name: str, arguments: dict[str, Any]) -> None:
    """Run stage ``name`` with a component's ``arguments`` (its ``locals()``)."""
    from imgpipe.core.logs import quiet_for_logs
    from imgpipe.core.params import FinetuneParams, section

    quiet_for_logs()
    from pipelines.runner import execute
    from pipelines.stages import STAGES

    stage = STAGES[name]
    configured = overlaid(stage.sections, arguments)
    params = dict(configured)
    shared = shared_place(arguments["shared_volume"]) if "shared_volume" in arguments else None
    if shared is not None and "serving" in params:
        params["serving"] = served_from(shared, params["serving"])
    if "mlflow_log" in arguments:  # cached: never the execution's run (see stage_log)
        _point_mlflow(stage_log(arguments["mlflow_log"].path), "")
    else:
        _point_mlflow(arguments["tracking_uri"], arguments["run_id"])
    with tempfile.TemporaryDirectory(prefix=f"imgpipe-{name}-") as tmp:
        paths: dict[str, Path] = {}
        for input_name, spec in stage.inputs.items():
            if spec.stage:
                base = Path(arguments[input_name].path)
                paths[input_name] = base / spec.subpath if spec.subpath else base
            else:
                source, params["data"] = source_folder(
                    arguments[input_name], Path(tmp), params["data"]
                )
                paths[input_name] = Path(source)
        for output_name in stage.outputs:
            if output_name in arguments:
                paths[output_name] = Path(arguments[output_name].path)
            else:  # feature cache, checkpoints: kept across runs
                if shared is None:
                    raise InputError(f"stage {name}: no shared place for its {output_name}")
                paths[output_name] = kept_folder(shared, stage, output_name, params, arguments)
        workers = section(FinetuneParams, name, params).workers if name == "finetune" else 1
        compiled = json.loads(arguments["base_params"]).get("finetune", {}).get("workers", 1)
        if name == "finetune" and workers != compiled:
            raise InputError(
                f"finetune_params.workers = {workers}, but the pipeline was compiled with "
                f"finetune.workers = {compiled}: it decides at compile time whether the step "
                "takes a GPU or launches a TrainJob, so compile with the workers you want"
            )
        if workers > 1:
            from pipelines.kubeflow_trainer import run_finetune  # a Kubeflow Trainer TrainJob

            assert shared is not None
            run_finetune(
                paths,
                params,
                claim=arguments["shared_volume"],
                mlflow_log=Path(arguments["mlflow_log"].path),
                shared=shared,
            )
        else:
            execute(stage, paths, params, whole_run=False, configured=configured)
    for output_name, out in stage.outputs.items():  # what KFP's UI shows of them
        if out.kind == "Metrics":
            log_metrics(arguments[output_name], paths[output_name])
        elif out.kind == "ClassificationMetrics":
            log_confusion(arguments[output_name], paths[output_name])
    for view_name, view in stage.views.items():
        shutil.copyfile(paths[view.output] / view.subpath, arguments[view_name].path)
    end_at_exit_without_teardown(EXECUTOR_MODULE)


SHARED_MOUNT = str(SHARED)
"""Where the claim ``shared_volume`` names is mounted in the steps that keep files across runs
(``pipelines.kubeflow.SHARED``)."""


def shared_place(shared_volume: str) -> Path:
    """The folder of the shared place: the claim's mount (``SHARED_MOUNT``) when
    ``shared_volume`` names a PersistentVolumeClaim, or the absolute host folder it names
    (kfp.local)."""
    import re

    if Path(shared_volume).is_absolute():
        return Path(shared_volume)
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", shared_volume):
        raise InputError(
            f"shared_volume {shared_volume!r} is neither a PersistentVolumeClaim name nor an "
            "absolute folder"
        )
    if not Path(SHARED_MOUNT).is_dir():
        raise FileNotFoundError(
            f"shared_volume {shared_volume!r}: the claim is not mounted at {SHARED_MOUNT}"
        )
    return Path(SHARED_MOUNT)


def served_from(shared: Path, serving: dict[str, Any]) -> dict[str, Any]:
    """The serving section with a relative ``model_base_path`` (params.yaml's ``models``, the
    project's folder under DVC) taken inside the shared place, where TF Serving reads it."""
    base = Path(serving["model_base_path"])
    return serving if base.is_absolute() else {**serving, "model_base_path": str(shared / base)}


def kept_folder(
    shared: Path, stage: Any, output: str, params: dict[str, Any], arguments: dict[str, Any]
) -> Path:
    """Where output ``output`` of ``stage`` (DVC kind ``cache`` or ``persist``) lives in the shared
    place: at its DVC path, as in the project folder. The feature cache is keyed by content
    inside (one folder serves every run); a ``persist`` folder (checkpoints) gets one subfolder
    per params and input artifacts, so that a retry or a rerun over the same (cached) inputs
    resumes, and concurrent runs never start over in each other's folder."""
    folder = shared / stage.outputs[output].path
    if stage.outputs[output].dvc == "cache":
        return folder
    from imgpipe.core.params import RESUME_IGNORES

    inputs = {n: arguments[n].uri for n, spec in stage.inputs.items() if spec.stage}
    sections = {s: params[s] for s in stage.sections}
    if "finetune" in sections:  # what the checkpoints do not depend on shares their folder
        sections["finetune"] = {
            k: v for k, v in sections["finetune"].items() if k not in RESUME_IGNORES
        }
    key = json.dumps([sections, inputs], sort_keys=True)
    return folder / hashlib.sha256(key.encode()).hexdigest()[:16]


def overlaid(sections: Iterable[str], arguments: dict[str, Any]) -> dict[str, Any]:
    """The compiled-in params.yaml with the run's overlays of ``sections`` (JSON, one per
    section) applied: an overlay changes only the keys it names."""
    params = json.loads(arguments["base_params"])
    for section in sections:
        params[section] = {**params.get(section, {}), **json.loads(arguments[section])}
    return params


def _point_mlflow(tracking_uri: str, run_id: str) -> None:
    """Log into ``run_id`` of ``tracking_uri``, or into a new run there when it is empty."""
    if tracking_uri:  # else the pod's MLFLOW_TRACKING_URI, or the local mlflow.db
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    os.environ.pop("MLFLOW_RUN_ID", None)  # a cached step never joins a run it was not given
    if run_id:
        os.environ["MLFLOW_RUN_ID"] = run_id


def stage_log(folder: str) -> str:
    """The tracking URI of a cached step's own MLflow store, kept in its ``mlflow_log`` output.

    A cached step cannot take the execution's run id (a new value every execution, so the
    cache would never hit): it logs into this store instead, and ``import_stage_logs`` copies
    the store into the execution's run, whether the step ran or came from the cache.
    """
    from imgpipe.tracking.runs import SQLITE, STAGE_LOG_DB

    Path(folder).mkdir(parents=True, exist_ok=True)
    store = Path(folder).resolve() / STAGE_LOG_DB
    if not store.exists():
        shutil.copyfile(_empty_store(), store)
    return f"{SQLITE}{store}"


def _empty_store() -> Path:
    """An empty MLflow store (SQLite) of this MLflow version, made once per machine in the temp
    folder: MLflow builds a new store's tables through its schema migrations (about 2.4 s on
    2 cores, against 0.1 s to copy one), which every step of a kfp.local run would otherwise
    pay. A pod starts with an empty temp folder and makes its own."""
    from importlib.metadata import version

    from mlflow.tracking import MlflowClient

    from imgpipe.tracking.runs import SQLITE

    empty = Path(tempfile.gettempdir()) / f"imgpipe-empty-mlflow-{version('mlflow')}.db"
    if not empty.exists():
        staged = empty.with_name(f"{empty.name}.{os.getpid()}.tmp")
        MlflowClient(f"{SQLITE}{staged}").search_experiments()  # creates the tables
        os.replace(staged, empty)  # whole, even with other steps making theirs at once
    return empty


def import_stage_logs(folders: list[str], tracking_uri: str, run_id: str) -> list[str]:
    """Copy each stage log's run (params, every metric's history, the stages' tags, artifacts)
    into ``run_id``; returns the stages imported. Each imported stage is tagged
    ``stage.<name>.log_run`` with its log's run id, and ``stage.<name>`` says ``done`` or
    ``reused``: a log that started before this execution's run came from KFP's cache (the
    cached steps run after start-run). Artifacts are read from the log's own folder (not
    through the absolute path the producing pod recorded). A model logged with ``log_model``
    stays in the stage's store (push registers the exported SavedModel into the run)."""
    from mlflow.tracking import MlflowClient

    target = MlflowClient(tracking_uri)
    with needs(on_run(run_id), f"import the stage logs into run {run_id}", tracking_uri):
        imported = _import_stage_logs(target, folders, run_id)
    end_at_exit_without_teardown(EXECUTOR_MODULE)
    return imported


def _import_stage_logs(target: Any, folders: list[str], run_id: str) -> list[str]:
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    from imgpipe.tracking.runs import RUN_TAGS, SQLITE, STAGE_LOG_DB

    started = target.get_run(run_id).info.start_time
    imported = []
    for folder in folders:
        database = Path(folder) / STAGE_LOG_DB
        if not database.is_file():
            raise FileNotFoundError(f"no MLflow stage log at {database}")
        source = MlflowClient(f"{SQLITE}{database.resolve()}")
        experiments = [e.experiment_id for e in source.search_experiments()]
        (run,) = source.search_runs(experiments)  # a stage log holds one run
        source_id = run.info.run_id
        metrics = [m for key in run.data.metrics for m in source.get_metric_history(source_id, key)]
        params = [Param(k, v) for k, v in run.data.params.items()]
        tags = [
            RunTag(k, v)
            for k, v in run.data.tags.items()
            if k not in RUN_TAGS and not k.startswith("mlflow.")
        ]
        stages = [t.key.removeprefix("stage.") for t in tags if t.key.startswith("stage.")]
        tags += [RunTag(f"stage.{stage}.log_run", source_id) for stage in stages]
        if run.info.start_time < started:  # from KFP's cache: an earlier execution's log
            tags = [t for t in tags if t.key not in {f"stage.{s}" for s in stages}]
            tags += [RunTag(f"stage.{stage}", "reused") for stage in stages]
        for i in range(0, max(len(metrics), len(params), len(tags)), 100):  # log_batch limits
            target.log_batch(
                run_id,
                metrics=metrics[i : i + 100],
                params=params[i : i + 100],
                tags=tags[i : i + 100],
            )
        artifacts = Path(folder) / "mlartifacts" / source_id / "artifacts"  # ensure_experiment
        if artifacts.is_dir():
            target.log_artifacts(run_id, str(artifacts))
        imported += stages
    return imported


def start_run(arguments: dict[str, Any]) -> str:
    """A new MLflow run for this pipeline execution, from the start-run component's
    ``arguments``: named and tagged like a DVC run (``imgpipe.tracking.runs.run_identity``), with
    every param of the execution (params.yaml and all the run's overlays), so that runs of
    the pipeline share their param keys whichever steps came from the cache."""
    import time

    import mlflow

    from imgpipe.core.params import SECTIONS
    from imgpipe.tracking.runs import (
        DATA_VERSION_TAG,
        ensure_experiment,
        flatten,
        log_params,
        run_identity,
    )

    mlflow.set_tracking_uri(arguments["tracking_uri"])
    project = Path.cwd()
    params = overlaid(SECTIONS, arguments)
    _, tags = run_identity(project, params, "kfp")
    tags["orchestrator"] = "kubeflow"
    if arguments["data_version"]:
        tags[DATA_VERSION_TAG] = arguments["data_version"]
    experiment = arguments["experiment"]
    with (
        needs(on_experiment(experiment), f"start a run in experiment {experiment!r}"),
        mlflow.start_run(
            experiment_id=ensure_experiment(mlflow, project, experiment),
            run_name=f"kfp-{time.strftime('%Y%m%d-%H%M%S')}",
            tags=tags,
        ) as run,
    ):
        log_params(flatten(params))
    end_at_exit_without_teardown(EXECUTOR_MODULE)
    return str(run.info.run_id)


def source_folder(source: str, workdir: Path, data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``sample`` materialises the offline ELPV sample data; anything else is a path the pod
    can read (a mounted volume). Returns the source and the data section to use with it."""
    if source != "sample":
        return source, data
    from imgpipe.data import sample_data

    target = workdir / "data"
    sample_data.run(target)
    return str(target), {
        **data,
        "source": str(target),
        "metadata_csv": str(target / "metadata.csv"),
    }


def log_metrics(artifact: Any, summary: Path, prefix: str = "") -> None:
    """Every numeric scalar of a stage's JSON summary as a KFP metric (nested keys joined
    with dots)."""

    def walk(obj: Any, key: str) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(obj, int | float):  # bools too, as 1.0 / 0.0
            artifact.log_metric(key, float(obj))

    walk(json.loads(Path(summary).read_text()), prefix)


def log_confusion(artifact: Any, confusion_csv: Path) -> None:
    """The test split's confusion matrix (evaluate's ``actual,predicted`` rows) as KFP
    ClassificationMetrics, classes in sorted order (the label map's)."""
    import csv

    with open(confusion_csv, newline="", encoding="utf-8") as f:
        pairs = [(row["actual"], row["predicted"]) for row in csv.DictReader(f)]
    labels = sorted({label for pair in pairs for label in pair})
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for actual, predicted in pairs:
        matrix[index[actual]][index[predicted]] += 1
    artifact.log_confusion_matrix(labels, matrix)
