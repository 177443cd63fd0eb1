"""The Kubeflow pipeline, derived from the stage declarations (``pipelines.stages``).

start-run -> ingest -> validate -> augment -> train -> finetune -> evaluate -> export -> push
                                                           `-> import-logs

Each stage's component is generated from its declaration: one typed artifact per input and
output (``Dataset``, ``Model``, ``Metrics``, ``ClassificationMetrics``; Data Docs as ``HTML``, the
model card as ``Markdown``), one JSON parameter per params section, and a one-line body that
runs the stage (``pipelines.kubeflow_step``). The DAG is wired from the declared inputs.
Pipeline parameters are overlays: params.yaml is compiled in, and ``<section>_params`` (JSON,
default ``{}``) overrides keys of that section. train and finetune ask for an NVIDIA GPU
(accelerator, limit, node selector, toleration), finetune not when compiled with
``finetune.workers`` > 1 (it launches a TrainJob, ``pipelines.kubeflow_trainer``); every step has
CPU and memory requests and retries transient failures (push excepted); ingest and augment ask for
as many CPUs as their ``workers`` param (``PARALLEL``).

Caching is on for the steps from ingest to finetune (``CACHED``). They log into an MLflow store
of their own, an output artifact, which import-logs copies into the execution's run: the run is
complete whether a step ran or came from the cache. The promotion decision is made inside the
push component (``components.push``), not with ``dsl.If``.

What outlives a run lives in the shared place, named by the pipeline parameter
``shared_volume``: a PersistentVolumeClaim (``infra/k8s``), mounted at ``SHARED_MOUNT`` in the
steps that keep files (``SHARED``: train's feature cache, finetune's checkpoints, push's serving
versions), or, for kfp.local, an absolute host folder. It is laid out like the project folder
under DVC (``models/``, ``outputs/cache/features/``, ``outputs/finetune_checkpoints/``), and
TF Serving mounts its ``models/`` folder.
"""

# No ``from __future__ import annotations``: KFP reads the component signatures' types.
import importlib.metadata
import inspect
import json
import linecache
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from kfp import dsl
from kfp.dsl import (
    HTML,
    Artifact,
    ClassificationMetrics,
    Dataset,
    Input,
    Markdown,
    Metrics,
    Model,
    Output,
)

from imgpipe.core.errors import InputError
from imgpipe.core.params import SECTIONS
from imgpipe.tracking.access import PASSWORD_ENV, PIPELINE_SECRET, USER_ENV
from pipelines.kubeflow_step import SHARED_MOUNT
from pipelines.stages import STAGES, Stage

IMAGE = os.environ.get(
    "IMGPIPE_IMAGE", f"ghcr.io/imgpipe/components:{importlib.metadata.version('imgpipe')}"
)
"""The components image (``infra/docker/components.Dockerfile``), by default tagged with this
package's version (pyproject.toml), never ``latest``; ignored by kfp.local."""
COMPONENT = {"base_image": IMAGE, "install_kfp_package": False}
"""How every step is declared: the image already holds kfp at the project's pin
(requirements.lock); KFP's default would ``pip install kfp`` again at the start of every step."""
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_LABEL = ("nvidia.com/gpu.present", "true")  # set by NVIDIA's GPU feature discovery


@dsl.component(**COMPONENT)
def import_logs(
    ingest: Input[Artifact],
    validate: Input[Artifact],
    augment: Input[Artifact],
    train: Input[Artifact],
    finetune: Input[Artifact],
    tracking_uri: str,
    run_id: str,
) -> str:
    """Bring the cached steps' MLflow logs into this execution's run (never cached: the run is
    new every execution, the logs may come from the cache)."""
    from pipelines import kubeflow_step

    logs = [ingest.path, validate.path, augment.path, train.path, finetune.path]
    return ",".join(kubeflow_step.import_stage_logs(logs, tracking_uri, run_id))


RESOURCES = {
    # stage: (cpu request, memory request, gpu)
    "start-run": ("250m", "512Mi", False),
    "import-logs": ("250m", "1Gi", False),
    "ingest": ("2", "2Gi", False),
    "validate": ("500m", "1Gi", False),
    "augment": ("2", "4Gi", False),
    "train": ("4", "16Gi", True),
    "finetune": ("4", "16Gi", True),
    "evaluate": ("2", "8Gi", False),
    "export": ("2", "8Gi", False),
    "push": ("500m", "2Gi", False),
}
PARALLEL = {"ingest", "augment"}
"""Steps with a ``workers`` param: their CPU request is that count (params.yaml, compiled in;
RESOURCES' when null) and so is their CPU limit, which ``workers: null`` reads back as every
core the container may use (imgpipe.core.parallel.cpu_count). A run-time overlay of ``workers``
changes the processes, not the request."""
CACHED = {"ingest", "validate", "augment", "train", "finetune"}
CACHED_ORDER = [name for name in STAGES if name in CACHED]
"""Steps whose outputs follow from their inputs alone, and whose inputs come only from the
pipeline's parameters and other cached steps (so a cache hit is possible at all): they do not
take the execution's MLflow run id. Not cached: start-run and import-logs (the run is new every
execution), evaluate (compares with the registry's current champion), export (its model card
carries this execution's evaluation) and push (writes the registry and the serving path)."""

CREDENTIALS = {"username": USER_ENV, "password": PASSWORD_ENV}
"""The MLflow account of the steps that talk to the server (start-run, import-logs and the
uncached stages), from the Secret named by the ``mlflow_credentials`` parameter (default
``mlflow-pipeline``, type basic-auth) into MLflow's own variables. Optional: without it a step
talks to the server unauthenticated, which an authenticating server refuses with an error
naming the Secret (``imgpipe.tracking.access``)."""

ARTIFACT_TYPES = (Dataset, Model, Metrics, ClassificationMetrics, HTML, Markdown)
KEPT = {"cache", "persist"}
"""Outputs that are no artifact in Kubeflow (the feature cache, resumable checkpoints): folders
in the shared place, kept across runs (``pipelines.kubeflow_step.kept_folder``)."""

SHARED_VOLUME = "imgpipe-shared"
"""The default of the ``shared_volume`` pipeline parameter: the claim ``infra/k8s`` creates."""
SHARED = [
    name
    for name, stage in STAGES.items()
    if any(out.dvc in KEPT for out in stage.outputs.values())
    or {"serving", "serving.model_base_path"} & set(stage.params)
]
"""Steps that keep files in the shared place: a ``KEPT`` output, or push's serving versions
(``serving.model_base_path``, relative to the shared place under Kubeflow)."""

READS_SOURCE = [
    name for name, stage in STAGES.items() if any(not i.stage for i in stage.inputs.values())
]
"""Steps that read the raw data (the ``source`` parameter): they mount the shared place too, so
that a data folder there, the one ``imgpipe monitor`` appends labelled feedback to under
Kubeflow, is a path they can read."""

NOT_RETRIED = {"push"}
"""push registers a model version before it promotes: a blind retry could register twice."""


def _configure(
    task: Any,
    stage: str,
    params: dict[str, Any] | None = None,
    shared_volume: Any = None,
    credentials: Any = None,
) -> Any:
    from kfp import kubernetes

    cpu, memory, gpu = RESOURCES[stage]
    task.set_display_name(stage)
    if stage in PARALLEL and params is not None:
        cpu = str(params[stage]["workers"] or cpu)
        task.set_cpu_limit(cpu)
    task.set_cpu_request(cpu).set_memory_request(memory)
    if stage not in NOT_RETRIED:
        task.set_retry(num_retries=2, backoff_duration="30s", backoff_factor=2.0)
    task.set_caching_options(stage in CACHED)
    if stage == "finetune" and params is not None and params["finetune"]["workers"] > 1:
        gpu = False  # the step only launches and waits for its TrainJob, whose nodes get GPUs
    if gpu:
        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(1)
        kubernetes.add_node_selector(task, *GPU_NODE_LABEL)
        kubernetes.add_toleration(task, key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
    if stage in SHARED or stage in READS_SOURCE:  # kfp.local ignores it: a host folder there
        kubernetes.mount_pvc(task, pvc_name=shared_volume, mount_path=SHARED_MOUNT)
    if credentials is not None:  # kfp.local ignores it: there the steps inherit the shell's
        kubernetes.use_secret_as_env(task, credentials, CREDENTIALS, optional=True)
    return task


def _component_source(stage: Stage) -> str:
    """The stage's component as Python source: KFP ships a lightweight component's source, so
    its signature is written out from the declaration; the body hands everything to
    ``pipelines.kubeflow_step.run`` (installed in the components image)."""
    arguments = []
    for name, spec in stage.inputs.items():
        if spec.stage:
            kind = STAGES[spec.stage].outputs[spec.output].kind
            arguments.append(f"{name}: Input[{kind}]")
        else:  # raw data: a path the pods can read, or "sample"
            arguments += [f"{name}: str", "data_version: str"]
    arguments += [f"{section}: str" for section in stage.sections]
    arguments.append("base_params: str")
    if stage.name in SHARED:
        arguments.append("shared_volume: str")
    if stage.name in CACHED:
        arguments.append("mlflow_log: Output[Artifact]")
    else:
        arguments += ["tracking_uri: str", "run_id: str"]
    arguments += [
        f"{name}: Output[{out.kind}]" for name, out in stage.outputs.items() if out.dvc not in KEPT
    ]
    arguments += [f"{name}: Output[{view.kind}]" for name, view in stage.views.items()]
    signature = ",\n    ".join(arguments)
    return (
        f"def {stage.name}(\n    {signature},\n):\n"
        f'    """{stage.help} (generated from pipelines/stages.py)."""\n'
        "    from pipelines import kubeflow_step\n\n"
        f"    kubeflow_step.run({stage.name!r}, locals())\n"
    )


def _start_run_source() -> str:
    """start-run: a new MLflow run for the execution (never cached), with every params
    section's overlay, so that it logs the execution's params."""
    arguments = ["tracking_uri: str", "experiment: str", "data_version: str", "base_params: str"]
    arguments += [f"{section}: str" for section in SECTIONS]
    return (
        f"def start_run(\n    {', '.join(arguments)},\n) -> str:\n"
        '    """A new MLflow run for this execution (generated, pipelines/kubeflow.py)."""\n'
        "    from pipelines import kubeflow_step\n\n"
        "    return kubeflow_step.start_run(locals())\n"
    )


def component(stage: Stage) -> Any:
    """The KFP component of ``stage``, derived from its declaration."""
    return _compiled(stage.name, _component_source(stage))


def _compiled(name: str, source: str) -> Any:
    """A KFP component from generated source (registered with linecache, so KFP can read it
    back as it reads a written function)."""
    filename = f"<imgpipe component {name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict[str, Any] = {
        "Input": Input,
        "Output": Output,
        "Artifact": Artifact,
        **{kind.__name__: kind for kind in ARTIFACT_TYPES},
    }
    exec(compile(source, filename, "exec"), namespace)
    return dsl.component(**COMPONENT)(namespace[name])


def build(params: dict[str, Any], imported: dict[str, dict[str, str]] | None = None) -> Any:
    """The pipeline: every declared stage's component, wired by the declarations. ``params``
    (a loaded params.yaml) is compiled in as the base; each ``<section>_params`` pipeline
    parameter is a JSON object of overrides on that section (default ``{}``).

    ``imported`` (kfp.local only) maps cached stages to their outputs' URIs from an earlier
    execution: those stages do not run, their outputs are imported (``dsl.importer``), as
    KFP's cache hands them over on a cluster (kfp.local has no cache)."""
    imported = imported or {}
    if set(imported) - set(CACHED):
        raise InputError(f"only cached steps can be imported, not {sorted(set(imported) - CACHED)}")
    base_params = json.dumps(params)
    components = {name: component(stage) for name, stage in STAGES.items()}
    start_run = _compiled("start_run", _start_run_source())

    # @dsl.pipeline reads the parameters from the signature and passes them by position.
    parameters = [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
        for name, default in (
            ("source", "sample"),
            ("data_version", ""),
            ("mlflow_tracking_uri", "http://mlflow.imgpipe.svc.cluster.local:5000"),
            ("mlflow_experiment", "imgpipe"),
            ("shared_volume", SHARED_VOLUME),
            ("mlflow_credentials", PIPELINE_SECRET),
            *((f"{s}_params", "{}") for s in SECTIONS),
        )
    ]

    def imgpipe(*values: str) -> None:
        given = dict(zip((p.name for p in parameters), values, strict=True))
        uri = given["mlflow_tracking_uri"]
        run = _configure(
            start_run(
                tracking_uri=uri,
                experiment=given["mlflow_experiment"],
                data_version=given["data_version"],
                base_params=base_params,
                **{s: given[f"{s}_params"] for s in SECTIONS},
            ),
            "start-run",
            credentials=given["mlflow_credentials"],
        )
        tasks: dict[str, Any] = {}
        for name, stage in STAGES.items():
            if name in imported:
                tasks[name] = _imported(stage, imported[name])
                continue
            arguments: dict[str, Any] = {s: given[f"{s}_params"] for s in stage.sections}
            arguments["base_params"] = base_params
            if name in SHARED:
                arguments["shared_volume"] = given["shared_volume"]
            for input_name, spec in stage.inputs.items():
                if spec.stage:
                    arguments[input_name] = tasks[spec.stage].outputs[spec.output]
                else:
                    arguments[input_name] = given["source"]
                    arguments["data_version"] = given["data_version"]
            if name not in CACHED:
                arguments.update(tracking_uri=uri, run_id=run.output)
            task = _configure(
                components[name](**arguments),
                name,
                params,
                given["shared_volume"],
                None if name in CACHED else given["mlflow_credentials"],
            )
            if name in CACHED:  # so that a log older than the run came from the cache
                task.after(run)
            for before in stage.after:
                if before not in imported:
                    task.after(tasks[before])
            tasks[name] = task
        _configure(
            import_logs(
                **{name: tasks[name].outputs["mlflow_log"] for name in CACHED_ORDER},
                tracking_uri=uri,
                run_id=run.output,
            ),
            "import-logs",
            credentials=given["mlflow_credentials"],
        )

    imgpipe.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [p.replace(annotation=str) for p in parameters]
    )
    imgpipe.__annotations__ = {p.name: str for p in parameters} | {"return": None}
    return dsl.pipeline(
        name="imgpipe",
        description="Transfer-learning image classification: ingest to a pushed, served model.",
    )(imgpipe)


def _imported(stage: Stage, uris: dict[str, str]) -> Any:
    """An importer per output of a cached ``stage`` (its artifacts and its MLflow log), standing
    in for the task: ``.outputs[name]`` as a task's."""
    kinds = {name: out.kind for name, out in stage.outputs.items() if out.dvc not in KEPT}
    classes = {kind.__name__: kind for kind in ARTIFACT_TYPES}
    outputs = {}
    for name, kind in {**kinds, "mlflow_log": "Artifact"}.items():
        if name not in uris:
            raise InputError(f"stage {stage.name}: no URI for its output {name!r} to import")
        task = dsl.importer(
            artifact_uri=uris[name], artifact_class=classes.get(kind, Artifact), reimport=False
        )
        outputs[name] = task.set_display_name(f"import {stage.name} {name}").output
    return SimpleNamespace(outputs=outputs)


def compile_to(params: dict[str, Any], path: Path) -> Path:
    import logging

    from kfp import compiler

    name = IMAGE.rsplit("/", 1)[-1]
    if "@" not in name and (":" not in name or name.endswith(":latest")):
        logging.getLogger(__name__).warning(
            "components image %s is not pinned: KFP's cache keys on the image name, so cached "
            "steps will not rerun with new code; set IMGPIPE_IMAGE to a version tag or digest",
            IMAGE,
        )

    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build(params), str(path))
    return path


def run_local(
    params: dict[str, Any],
    pipeline_root: Path,
    *,
    shared_volume: str,
    reused_from: Path | None = None,
    **arguments: Any,
) -> Any:
    """Run the whole pipeline for real with kfp.local, in this venv (SubprocessRunner,
    use_venv=False: the project is already installed here). ``shared_volume`` is the shared
    place as an absolute host folder (kfp.local mounts no claim). ``reused_from``, an earlier
    kfp.local execution's folder, stands in for KFP's cache, which kfp.local lacks: the cached
    steps are not run, their outputs are imported from there."""
    from kfp import local

    if not Path(shared_volume).is_absolute():
        raise InputError(
            f"shared_volume {shared_volume!r}: kfp.local mounts no PersistentVolumeClaim; "
            "give the shared place as an absolute host folder"
        )
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root),
        raise_on_error=True,
    )
    imported = imported_from(Path(reused_from)) if reused_from is not None else {}
    return build(params, imported)(shared_volume=shared_volume, **arguments)


def imported_from(execution: Path) -> dict[str, dict[str, str]]:
    """``build``'s ``imported`` for an earlier kfp.local execution's folder: each cached step's
    outputs there (those kept in the shared place excepted) and its MLflow log."""
    imported = {}
    for name in CACHED_ORDER:
        names = [n for n, out in STAGES[name].outputs.items() if out.dvc not in KEPT]
        imported[name] = {n: str(execution / name / n) for n in [*names, "mlflow_log"]}
    return imported
