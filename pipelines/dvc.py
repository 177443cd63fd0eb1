"""``dvc.yaml``, rendered from the stage declarations (``pipelines.stages``).

The file stays checked in and readable; ``python -m pipelines.dvc`` rewrites it, and
``tests/code/test_stages.py`` fails when the checked-in file differs from what this renders. Each
stage's code deps are the project files its executor (``components/<stage>.py``) imports,
found by reading the imports (lazy ones inside functions too), so a change to any of them
reruns the stage; the runner that hands it its params and MLflow run is not among them.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Any

import yaml

from imgpipe.core.errors import InputError
from pipelines.stages import STAGES, SUMMARY, Stage

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("components", "imgpipe", "serving", "pipelines")

HEADER = """\
# The pipeline DAG, rendered from pipelines/stages.py by `python -m pipelines.dvc`: edit the
# declarations there, not this file (tests/code/test_stages.py checks that the two agree).
# Each stage is `imgpipe <stage>` (commands/stages.py) running components/<stage>.py.
"""

PLOTS = [
    {
        name: {
            "title": f"{title} by epoch (frozen phase, then fine-tuning)",
            "x": "step",
            "y": {
                "metrics/train_history.csv": columns,
                "metrics/finetune_history.csv": columns,
            },
        }
    }
    for name, title, columns in (
        ("accuracy", "Accuracy", ["accuracy", "val_accuracy"]),
        ("loss", "Loss", ["loss", "val_loss"]),
    )
]
"""``dvc plots show``: both training phases on one step axis."""


def _module_file(module: str) -> Path | None:
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return None
    path = ROOT.joinpath(*parts)
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None  # a package (its __init__ is empty) or a name imported from a module


def _imports(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.add(node.module)
            # `from imgpipe.model import backbones` imports the module imgpipe.model.backbones
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def code_deps(module: str) -> list[str]:
    """The project files ``module`` imports, directly or through other project files."""
    start = _module_file(module)
    if start is None:
        raise InputError(f"{module} is no module of {', '.join(PACKAGES)}")
    seen, todo = {start}, [start]
    while todo:
        for name in _imports(todo.pop()):
            found = _module_file(name)
            if found is not None and found not in seen:
                seen.add(found)
                todo.append(found)
    return sorted(str(p.relative_to(ROOT)) for p in seen)


def render_stage(stage: Stage) -> dict[str, Any]:
    deps = [stage.input_path(name) for name in stage.inputs]
    deps += [STAGES[before].outputs[SUMMARY].path for before in stage.after]
    entry: dict[str, Any] = {
        "cmd": f"imgpipe {stage.name}",
        # What the executor imports, down to the last helper; not pipelines.runner nor
        # imgpipe.tracking.runs, which say how a stage is run and logged, not what it computes:
        # rewording a log line or an MLflow permission error reruns no stage.
        "deps": [*deps, *code_deps(stage.module)],
        "params": list(stage.params),
    }
    for name, out in stage.outputs.items():
        if out.dvc == "out":
            entry.setdefault("outs", []).append(out.path)
        elif out.dvc == "persist":
            entry.setdefault("outs", []).append({out.path: {"persist": True, "cache": False}})
        elif out.dvc == "metric":
            entry.setdefault("metrics", []).append({out.path: {"cache": False}})
        elif out.dvc == "plot":
            options = {"cache": False, **dict(out.plot)}
            entry.setdefault("plots", []).append({out.path: options})
        elif out.dvc != "cache":  # a cache folder is deliberately no DVC output
            raise InputError(f"stage {stage.name}: unknown DVC kind {out.dvc!r} of {name}")
    return entry


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # no &id001 anchors: people read this file
        return True


def render() -> str:
    """The whole ``dvc.yaml``."""
    body = yaml.dump(
        {
            "stages": {name: render_stage(stage) for name, stage in STAGES.items()},
            "plots": PLOTS,
        },
        Dumper=_Dumper,
        sort_keys=False,
        width=100,
    )
    return HEADER + body


if __name__ == "__main__":
    target = ROOT / "dvc.yaml"
    target.write_text(render(), encoding="utf-8")
    print(f"wrote {target}", file=sys.stderr)
