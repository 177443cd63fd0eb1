"""Run one declared stage: its typed params from params.yaml, its MLflow run, its executor.

The one adapter between a declaration (``pipelines.stages``) and ``components.<stage>``; the CLI
and the Kubeflow components both call ``execute``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from imgpipe.core.errors import InputError
from imgpipe.core.params import ParamsError, sections
from imgpipe.data.manifest import MANIFEST
from pipelines.stages import STAGES, SUMMARY, Stage, upstream


def default_paths(stage: Stage, params: Mapping[str, Any]) -> dict[str, Path]:
    """Every input and output at its DVC path; raw-data inputs (``${data.source}``) from params."""
    paths = {name: Path(_substitute(stage.input_path(name), params)) for name in stage.inputs}
    paths.update({name: Path(out.path) for name, out in stage.outputs.items()})
    return paths


def _substitute(path: str, params: Mapping[str, Any]) -> str:
    if not (path.startswith("${") and path.endswith("}")):
        return path
    value: Any = params
    for key in path[2:-1].split("."):
        if not isinstance(value, Mapping) or key not in value:
            raise ParamsError(f"{path[2:-1]} is missing from params.yaml")
        value = value[key]
    return str(value)


def _call(function: Callable[..., Any], available: Mapping[str, Any]) -> Any:
    """``function`` with the arguments it names, taken from ``available``."""
    names = inspect.signature(function).parameters
    return function(**{name: available[name] for name in names if name in available})


def execute(
    stage: Stage,
    paths: Mapping[str, Path],
    params: Mapping[str, Any],
    *,
    whole_run: bool = True,
    configured: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``stage`` on ``paths`` (every declared input and output) with the params.yaml
    content ``params``, inside this execution's MLflow run; returns the stage's summary.

    The run gets the stage's params, its summary metrics (``components.<stage>.metrics``),
    what ``log_to_mlflow`` adds, and the data splits as MLflow datasets. With ``whole_run``
    (the CLI, under DVC or alone) this process also speaks for the run as a whole: a new run
    gets every param of params.yaml, and under DVC each stage that DVC reused is logged from
    the outputs DVC restored (``log_reused``). The Kubeflow steps pass False: each holds only
    its own sections, and the pipeline's start-run and import-logs steps do the rest. They may
    also run on params with paths resolved for the pod (``serving.model_base_path`` in the
    shared place): ``configured`` is then what the run records, the params as given.
    """
    import mlflow

    from imgpipe.tracking.runs import execution_key, flatten, log_params, stage_run

    missing = (set(stage.inputs) | set(stage.outputs)) - set(paths)
    if missing:
        raise InputError(f"stage {stage.name}: no path for {sorted(missing)}")
    typed = sections(stage.sections, dict(params))  # every key checked before any work
    module = importlib.import_module(stage.module)
    arguments = {**paths, **typed}
    generated = ["dvc.lock", *(out.path for s in STAGES.values() for out in s.outputs.values())]
    with stage_run(stage.name, params=params if whole_run else None, generated=generated) as run:
        logged = params if configured is None else configured
        log_params(flatten({name: logged[name] for name in stage.sections}))
        try:
            summary = module.run(**arguments)
        except BaseException:
            if hasattr(module, "log_failure"):  # what failed, for the run (validate's Data Docs)
                _call(module.log_failure, arguments)
            raise
        mlflow.log_metrics(module.metrics(summary))
        _call(module.log_to_mlflow, arguments)
        manifest = _manifest(stage, paths, whole_run)
        inputs = mlflow.get_run(run.info.run_id).inputs
        if manifest is not None and not (inputs and inputs.dataset_inputs):
            log_datasets_of(manifest, params)
        if whole_run and execution_key():
            log_reused(stage.name, Path.cwd())
    return summary


def execute_as_worker(
    stage: Stage, paths: Mapping[str, Path], params: Mapping[str, Any]
) -> dict[str, Any]:
    """``stage`` as a non-chief worker of a multi-worker job (imgpipe.model.distribute.is_chief)
    runs it: beside the chief, neither tracked nor writing the stage's outputs, which go to a
    folder of its own, dropped afterwards. The resumable checkpoints stay shared (the chief
    writes them, every worker resumes from them)."""
    import tempfile

    typed = sections(stage.sections, dict(params))
    module = importlib.import_module(stage.module)
    with tempfile.TemporaryDirectory(prefix=f"imgpipe-{stage.name}-worker-") as scratch:
        arguments: dict[str, Any] = {**paths, **typed}
        for name, out in stage.outputs.items():
            if out.dvc != "persist":
                arguments[name] = Path(scratch) / name
        return dict(module.run(**arguments))


def _manifest(stage: Stage, paths: Mapping[str, Path], whole_run: bool) -> Path | None:
    """The manifest this stage read or wrote, or (under DVC) the one in the workspace."""
    if stage.name == "ingest":
        return paths["out"] / MANIFEST
    if "dataset" in paths:
        return paths["dataset"] / MANIFEST
    default = Path(STAGES["ingest"].outputs["out"].path) / MANIFEST
    return default if whole_run and default.is_file() else None


def log_datasets_of(manifest: Path, params: Mapping[str, Any]) -> None:
    """The splits of ``manifest`` as MLflow datasets; the source is ``data.source``."""
    import mlflow

    from imgpipe.tracking.runs import DATA_VERSION_TAG, dvc_data_hash, log_datasets

    source = str(params["data"]["source"])
    if "://" not in source:
        source = Path(source).resolve().as_uri()
    active = mlflow.active_run()
    tags = mlflow.get_run(active.info.run_id).data.tags if active is not None else {}
    version = tags.get(DATA_VERSION_TAG)
    log_datasets(manifest, source, version or dvc_data_hash(Path.cwd()))


def log_reused(current: str, root: Path) -> None:
    """Under DVC: every stage upstream of ``current`` that this run has no record of was
    reused by DVC; it is logged from the summary DVC restored (its metrics and a
    ``stage.<name>=reused`` tag with the hash that ``dvc.lock`` records for its main output),
    so a full ``dvc repro`` run carries every stage's figures. Stages downstream are left
    alone: a partial run (``dvc exp run finetune``) must not claim their stale figures."""
    import json

    import mlflow
    import yaml

    run = mlflow.active_run()
    assert run is not None
    tags = mlflow.get_run(run.info.run_id).data.tags
    try:
        lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        lock = {}
    for name in upstream(current):
        stage = STAGES[name]
        summary = root / stage.outputs[SUMMARY].path
        if f"stage.{name}" in tags or not summary.is_file():
            continue
        module = importlib.import_module(stage.module)
        mlflow.log_metrics(module.metrics(json.loads(summary.read_text())))
        primary = stage.outputs.get("out", stage.outputs[SUMMARY]).path
        hashes = {o.get("path"): o.get("md5") for o in lock.get(name, {}).get("outs", [])}
        mlflow.set_tags(
            {
                f"stage.{name}": "reused",
                f"stage.{name}.md5": str(hashes.get(primary) or "unknown"),
            }
        )


def describe(stage: Stage, summary: dict[str, Any]) -> str:
    """The line a person reads when the stage is done."""
    return f"{stage.name}: {importlib.import_module(stage.module).describe(summary)}"
