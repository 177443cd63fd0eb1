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

from imgpipe.params import ParamsError, sections
from pipelines.stages import Stage


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


def execute(stage: Stage, paths: Mapping[str, Path], params: Mapping[str, Any]) -> dict[str, Any]:
    """Run ``stage`` on ``paths`` (every declared input and output) with the params.yaml
    content ``params``, inside this execution's MLflow run; returns the stage's summary."""
    from imgpipe.tracking import log_params, stage_run

    missing = (set(stage.inputs) | set(stage.outputs)) - set(paths)
    if missing:
        raise ValueError(f"stage {stage.name}: no path for {sorted(missing)}")
    typed = sections(stage.sections, dict(params))  # every key checked before any work
    module = importlib.import_module(stage.module)
    arguments = {**paths, **typed}
    with stage_run(stage.name):
        for name, values in typed.items():
            log_params(name, values)
        try:
            summary = module.run(**arguments)
        except BaseException:
            if hasattr(module, "log_failure"):  # what failed, for the run (validate's Data Docs)
                _call(module.log_failure, arguments)
            raise
        _call(module.log_to_mlflow, arguments)
    return summary


def describe(stage: Stage, summary: dict[str, Any]) -> str:
    """The line a person reads when the stage is done."""
    return f"{stage.name}: {importlib.import_module(stage.module).describe(summary)}"
