"""The architecture: every stage declared once (pipelines/stages.py) and everything else agrees
with the declaration: dvc.yaml (code deps included), each executor's signature, the CLI; no
import cycle anywhere; the layers import only downwards."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
from pathlib import Path

import pytest
import yaml

from imgpipe.core.params import SECTIONS, ParamsError, load_params, section
from pipelines import dvc
from pipelines.stages import STAGES

PROJECT = Path(__file__).resolve().parents[2]
PACKAGES = ("imgpipe", "components", "pipelines", "commands", "serving", "bench")
LAYERS = {  # a package may import only from those listed for it
    "imgpipe": {"imgpipe", "serving"},  # serving.warmup: the warmup file's one home
    "components": {"imgpipe", "serving"},
    "serving": {"serving"},
    "pipelines": {"imgpipe", "components", "pipelines", "serving"},
    "commands": {"imgpipe", "components", "pipelines", "serving", "commands"},  # parse, call, print
    "bench": {"imgpipe", "components", "pipelines", "commands", "serving", "bench"},
}


def test_dvc_yaml_is_what_the_declarations_render():
    """dvc.yaml is checked in for people to read; it must say what the declarations say
    (`python -m pipelines.dvc` rewrites it)."""
    assert (PROJECT / "dvc.yaml").read_text(encoding="utf-8") == dvc.render(), (
        "dvc.yaml disagrees with pipelines/stages.py: run `python -m pipelines.dvc`"
    )


def test_code_deps_follow_imports_including_lazy_ones(tmp_path):
    deps = dvc.code_deps("components.evaluate")
    # evaluate imports registry at module level and the champion's SavedModel code lazily
    for expected in (
        "components/evaluate.py",
        "imgpipe/tracking/registry.py",
        "imgpipe/export/savedmodel.py",
    ):
        assert expected in deps
    assert not any(d.startswith("pipelines/") for d in deps)
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    for name in STAGES:
        listed = {d for d in stages[name]["deps"] if d.endswith(".py")}
        assert set(dvc.code_deps(f"components.{name}")) <= listed, name


@pytest.mark.parametrize("name", list(STAGES))
def test_each_executor_takes_exactly_the_declared_names(name):
    stage = STAGES[name]
    run = importlib.import_module(stage.module).run
    parameters = inspect.signature(run).parameters
    required = {n for n, p in parameters.items() if p.default is inspect.Parameter.empty}
    declared = set(stage.inputs) | set(stage.outputs) | set(stage.sections)
    assert required == declared, f"components.{name}.run vs pipelines/stages.py"
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters.values())


def test_declared_params_exist_in_params_yaml_and_inputs_name_real_outputs():
    params = load_params(PROJECT / "params.yaml")
    for stage in STAGES.values():
        for key in stage.params:
            section_name, _, field = key.partition(".")
            assert section_name in params, (stage.name, key)
            if field:
                assert field in params[section_name], (stage.name, key)
        for name, spec in stage.inputs.items():
            if spec.stage:
                producer = STAGES[spec.stage]
                assert spec.output in producer.outputs, (stage.name, name)
                assert list(STAGES).index(spec.stage) < list(STAGES).index(stage.name)


def test_cli_offers_every_declared_input_and_output():
    from commands import build_parser

    parser = build_parser()
    for stage in STAGES.values():
        args = parser.parse_args([stage.name])
        for name in [*stage.inputs, *stage.outputs]:
            assert hasattr(args, name), (stage.name, name)
        given = (
            parser.parse_args([stage.name, "--out", "elsewhere"])
            if "out" in stage.outputs
            else None
        )
        if given is not None:
            assert given.out == "elsewhere"


def test_every_section_of_params_yaml_loads_and_nothing_has_a_code_default():
    params = load_params(PROJECT / "params.yaml")
    assert set(params) == set(SECTIONS)
    for name, cls in SECTIONS.items():
        section(cls, name, params)
        # no field has a default in code: params.yaml is their only home
        assert all(
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            for f in dataclasses.fields(cls)
        ), name
    missing = {**params, "finetune": {k: v for k, v in params["finetune"].items() if k != "epochs"}}
    with pytest.raises(ParamsError, match=r"finetune\.epochs is missing"):
        section(SECTIONS["finetune"], "finetune", missing)


def _project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((PROJECT / package).rglob("*.py")):
            parts = path.relative_to(PROJECT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def _imported(path: Path, modules: dict[str, Path]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        found.update(n for n in names if n in modules)
    return found


def test_no_import_cycle_and_layers_import_only_downwards():
    """Lazy imports inside functions count too: a cycle through them is still a cycle."""
    modules = _project_modules()
    graph = {name: _imported(path, modules) - {name} for name, path in modules.items()}
    for name, imported in graph.items():
        allowed = LAYERS[name.split(".")[0]]
        wrong = sorted(i for i in imported if i.split(".")[0] not in allowed)
        assert not wrong, f"{name} imports {wrong}"
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for imported in sorted(graph[name]):
            if state.get(imported) == "open":
                cycle = [*path[path.index(imported) :], imported]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if imported not in state:
                visit(imported, [*path, imported])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_library_rooms_import_in_one_order():
    """A room of ``imgpipe`` imports only from the rooms before it in ``imgpipe.ROOMS`` (lazy
    imports count), every module lives in a room, and no room holds more than a dozen modules
    side by side."""
    from imgpipe import ROOMS

    modules = _project_modules()
    library = {name: path for name, path in modules.items() if name.startswith("imgpipe.")}
    assert {name.split(".")[1] for name in library} == set(ROOMS)
    for name, path in library.items():
        room = ROOMS.index(name.split(".")[1])
        for imported in _imported(path, modules):
            if imported.startswith("imgpipe."):
                other = imported.split(".")[1]
                assert ROOMS.index(other) <= room, f"{name} imports {imported}: {other} is above"
    for room in ROOMS:
        assert len(list((PROJECT / "imgpipe" / room).glob("*.py"))) <= 13, room  # + __init__


def test_components_holds_only_the_declared_stages():
    files = {p.stem for p in (PROJECT / "components").glob("*.py")} - {"__init__"}
    assert files == set(STAGES)


@pytest.mark.parametrize("name", list(STAGES))
def test_each_stage_turns_its_committed_summary_into_mlflow_metrics(name):
    """Guards the reused-stage path: a stage's ``metrics(summary)`` is what MLflow gets both
    when it ran and when DVC reused it (read back from the summary DVC restored), so it must
    turn the summary in the tree (``make demo``'s, committed) into named numbers, each under
    the stage's own prefix or a headline name (``gate.*``: the blessing's comparison with the
    champion)."""
    import json

    module = importlib.import_module(STAGES[name].module)
    summary = json.loads((PROJECT / STAGES[name].outputs["summary"].path).read_text())
    values = module.metrics(summary)
    assert values, name
    for key, value in values.items():
        assert isinstance(value, int | float) and not isinstance(value, bool), (key, value)
        assert key.split(".")[0] in {name, "frozen", "test", "parity", "blessed", "gate"}, key


def test_upstream_follows_inputs_and_ordering_gates():
    """Guards what a run may log as reused: only the stages a stage depends on."""
    from pipelines.stages import upstream

    assert upstream("ingest") == []
    assert upstream("train") == ["ingest", "validate", "augment"]  # validate gates augment
    assert upstream("push") == [s for s in STAGES if s != "push"]


def test_summary_prints_the_committed_run(monkeypatch, capsys):
    """``make demo`` ends with ``imgpipe summary`` on the metrics it just wrote: on the committed
    ones (the production run, trained on train + val with nothing held out) it prints every
    phase and the test figures."""
    from commands import main

    monkeypatch.chdir(PROJECT)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///nowhere.db")  # printed, not opened
    assert main(["summary"]) == 0
    out = capsys.readouterr().out
    for line in ("data:", "frozen:", "finetune:", "test:", "gate:", "export:", "registry:"):
        assert f"\n{line}" in f"\n{out}", (line, out)
