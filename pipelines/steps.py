"""What a Kubeflow component does around a stage: write the stage's params.yaml sections, point
MLflow at the pipeline's run, and call the same ``imgpipe <stage>`` entry point the DVC
pipeline calls (so every step's logic has one home, ``components/<stage>.py``); then hand the
stage's JSON metrics to KFP.

Imported inside the component functions (KFP ships a component's source, not its module), from
the project installed in the components image (``infra/docker``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml


class StageFailed(RuntimeError):
    """The stage exited with an error (its message is in the component's log)."""


def run_stage(
    stage: str,
    sections: dict[str, Any],  # params.yaml sections, as dicts or JSON text
    argv: list[str],
    *,
    tracking_uri: str,
    run_id: str = "",
) -> None:
    """``imgpipe <stage> --params <sections as params.yaml> ARGV`` in this process, logging into
    the MLflow run ``run_id`` of ``tracking_uri``, or into a new run there when it is empty."""
    from pipelines.cli import main

    if tracking_uri:  # else the pod's MLFLOW_TRACKING_URI, or the local mlflow.db
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    os.environ.pop("MLFLOW_RUN_ID", None)  # a cached step never joins a run it was not given
    if run_id:
        os.environ["MLFLOW_RUN_ID"] = run_id
    parsed = {k: json.loads(v) if isinstance(v, str) else v for k, v in sections.items()}
    with tempfile.TemporaryDirectory(prefix=f"imgpipe-{stage}-") as tmp:
        params = Path(tmp) / "params.yaml"
        params.write_text(yaml.safe_dump(parsed, sort_keys=False))
        code = main([stage, "--params", str(params), *argv])
    if code:
        raise StageFailed(f"imgpipe {stage} exited with status {code}")


def stage_log(folder: str) -> str:
    """The tracking URI of a cached step's own MLflow store, kept in its ``mlflow_log`` output.

    A cached step cannot take the execution's run id (a new value every execution, so the
    cache would never hit): it logs into this store instead, and ``import_stage_logs`` copies
    the store into the execution's run, whether the step ran or came from the cache.
    """
    from imgpipe.tracking import SQLITE

    Path(folder).mkdir(parents=True, exist_ok=True)
    return f"{SQLITE}{Path(folder).resolve() / STAGE_LOG_DB}"


STAGE_LOG_DB = "mlflow.db"


def import_stage_logs(folders: list[str], tracking_uri: str, run_id: str) -> list[str]:
    """Copy each stage log's run (params, every metric's history, the stages' tags, artifacts)
    into ``run_id``; returns the stages imported. Each imported stage is tagged
    ``stage.<name>.log_run`` with its log's run id: the same id in two executions means the
    second reused the first's cached step. Artifacts are read from the log's own folder (not
    through the absolute path the producing pod recorded). A model logged with ``log_model``
    stays in the stage's store (push registers the exported SavedModel into the run)."""
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    from imgpipe.tracking import RUN_TAGS, SQLITE

    target = MlflowClient(tracking_uri)
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


def start_run(tracking_uri: str, experiment: str, name: str) -> str:
    """A new MLflow run for this pipeline execution; every component logs into it."""
    import mlflow

    from imgpipe.tracking import dvc_data_hash, ensure_experiment, git_commit

    mlflow.set_tracking_uri(tracking_uri)
    project = Path.cwd()
    with mlflow.start_run(
        experiment_id=ensure_experiment(mlflow, project, experiment),
        run_name=name,
        tags={
            "orchestrator": "kubeflow",
            "git_commit": git_commit(project),
            "dvc_data_md5": dvc_data_hash(project),
        },
    ) as run:
        return str(run.info.run_id)


def source_folder(source: str, workdir: Path, data: str) -> tuple[str, dict[str, Any]]:
    """``sample`` materialises the offline ELPV sample data; anything else is a path the pod
    can read (a mounted volume). Returns the source and the data section (from its JSON) to
    use with it."""
    data = json.loads(data)
    if source != "sample":
        return source, data
    from imgpipe import sample_data

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


def log_confusion(artifact: Any, confusion_csv: Path, labels: list[str]) -> None:
    """The test split's confusion matrix as KFP ClassificationMetrics."""
    import csv

    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    with open(confusion_csv, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            matrix[index[row["actual"]]][index[row["predicted"]]] += 1
    artifact.log_confusion_matrix(labels, matrix)
