"""The Kubeflow pipeline: the DVC stages as KFP 2 components passing typed artifacts.

start-run -> ingest -> validate -> augment -> train -> finetune -> evaluate -> export -> push
                                                           `-> import-logs

Each component calls the stage's ``imgpipe`` entry point (``pipelines.steps.run_stage``), so the
logic of every step lives once, in ``components/``. Pipeline parameters mirror ``params.yaml``:
one dict per section, defaulting to the file's values when the pipeline is built. train and
finetune ask for an NVIDIA GPU (accelerator, limit, node selector, toleration); every step has
CPU and memory requests and retries transient failures (push excepted).

Caching is on for the steps from ingest to finetune (``CACHED``). They log into an MLflow store
of their own, an output artifact, which import-logs copies into the execution's run: the run is
complete whether a step ran or came from the cache. The promotion decision is made inside the
push component (``registry.register``), not with ``dsl.If``.
"""

# No ``from __future__ import annotations``: KFP reads the component signatures' types.
import json
import os
from pathlib import Path
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

IMAGE = os.environ.get("IMGPIPE_IMAGE", "ghcr.io/imgpipe/components:latest")
"""The components image (``infra/docker/components.Dockerfile``); ignored by kfp.local."""
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_LABEL = ("nvidia.com/gpu.present", "true")  # set by NVIDIA's GPU feature discovery


@dsl.component(base_image=IMAGE)
def start_run(tracking_uri: str, experiment: str) -> str:
    """A new MLflow run for this execution (never cached)."""
    import time

    from pipelines import steps

    return steps.start_run(tracking_uri, experiment, f"kfp-{time.strftime('%Y%m%d-%H%M%S')}")


@dsl.component(base_image=IMAGE)
def ingest(
    source: str,
    data_version: str,
    data: str,
    ingest: str,
    dataset: Output[Dataset],
    metrics: Output[Metrics],
    mlflow_log: Output[Artifact],
):
    """``data_version`` is not read: it is part of the cache key, so that new data at the same
    ``source`` path is ingested again (set it to the data's version, e.g. data.dvc's md5)."""
    import tempfile
    from pathlib import Path

    from pipelines import steps

    with tempfile.TemporaryDirectory() as tmp:
        folder, data = steps.source_folder(source, Path(tmp), data)
        summary = Path(tmp) / "ingest.json"
        steps.run_stage(
            "ingest",
            {"data": data, "ingest": ingest},
            ["--source", folder, "--out", dataset.path, "--summary", str(summary)],
            tracking_uri=steps.stage_log(mlflow_log.path),
        )
        steps.log_metrics(metrics, summary)


@dsl.component(base_image=IMAGE)
def validate(
    dataset: Input[Dataset],
    validate: str,
    report: Output[HTML],
    metrics: Output[Metrics],
    mlflow_log: Output[Artifact],
):
    import shutil
    import tempfile
    from pathlib import Path

    from pipelines import steps

    with tempfile.TemporaryDirectory() as tmp:
        out, summary = Path(tmp) / "validate", Path(tmp) / "validate.json"
        steps.run_stage(
            "validate",
            {"validate": validate},
            [
                "--manifest",
                f"{dataset.path}/manifest.csv",
                "--out",
                str(out),
                "--summary",
                str(summary),
            ],
            tracking_uri=steps.stage_log(mlflow_log.path),
        )
        shutil.copyfile(out / "data_docs" / "index.html", report.path)
        steps.log_metrics(metrics, summary)


@dsl.component(base_image=IMAGE)
def augment(
    dataset: Input[Dataset],
    model: str,
    augment: str,
    augmented: Output[Dataset],
    metrics: Output[Metrics],
    mlflow_log: Output[Artifact],
):
    import tempfile
    from pathlib import Path

    from pipelines import steps

    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "augment.json"
        steps.run_stage(
            "augment",
            {"model": model, "augment": augment},
            [
                "--shards",
                f"{dataset.path}/shards",
                "--out",
                augmented.path,
                "--summary",
                str(summary),
            ],
            tracking_uri=steps.stage_log(mlflow_log.path),
        )
        steps.log_metrics(metrics, summary)


@dsl.component(base_image=IMAGE)
def train(
    dataset: Input[Dataset],
    augmented: Input[Dataset],
    model: str,
    train: str,
    trained: Output[Model],
    metrics: Output[Metrics],
    mlflow_log: Output[Artifact],
):
    import shutil
    import tempfile
    from pathlib import Path

    from pipelines import steps

    with tempfile.TemporaryDirectory() as tmp:
        summary, history = Path(tmp) / "train.json", Path(tmp) / "train_history.csv"
        steps.run_stage(
            "train",
            {"model": model, "train": train},
            [
                "--augmented",
                f"{augmented.path}/shards",
                "--ingest",
                dataset.path,
                "--out",
                trained.path,
                "--metrics",
                str(summary),
                "--history",
                str(history),
                "--feature-cache",
                str(Path(tmp) / "cache"),
            ],
            tracking_uri=steps.stage_log(mlflow_log.path),
        )
        shutil.copyfile(history, Path(trained.path) / "train_history.csv")
        steps.log_metrics(metrics, summary)


@dsl.component(base_image=IMAGE)
def finetune(
    dataset: Input[Dataset],
    augmented: Input[Dataset],
    trained: Input[Model],
    model: str,
    finetune: str,
    tuned: Output[Model],
    metrics: Output[Metrics],
    mlflow_log: Output[Artifact],
):
    import tempfile
    from pathlib import Path

    from pipelines import steps

    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "finetune.json"
        steps.run_stage(
            "finetune",
            {"model": model, "finetune": finetune},
            [
                "--train",
                trained.path,
                "--augmented",
                f"{augmented.path}/shards",
                "--ingest",
                dataset.path,
                "--frozen-history",
                f"{trained.path}/train_history.csv",
                "--out",
                tuned.path,
                "--metrics",
                str(summary),
                "--history",
                str(Path(tmp) / "finetune_history.csv"),
                "--checkpoints",
                str(Path(tmp) / "checkpoints"),
            ],
            tracking_uri=steps.stage_log(mlflow_log.path),
        )
        steps.log_metrics(metrics, summary)


@dsl.component(base_image=IMAGE)
def evaluate(
    dataset: Input[Dataset],
    tuned: Input[Model],
    model: str,
    evaluate: str,
    serving: str,
    tracking_uri: str,
    run_id: str,
    evaluation: Output[Dataset],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
):
    from pathlib import Path

    from imgpipe.labels import read_labels
    from pipelines import steps

    out = Path(evaluation.path)
    steps.run_stage(
        "evaluate",
        {"model": model, "evaluate": evaluate, "serving": serving},
        [
            "--model",
            tuned.path,
            "--ingest",
            dataset.path,
            "--out",
            str(out / "evaluate"),
            "--metrics",
            str(out / "evaluate.json"),
            "--confusion",
            str(out / "confusion.csv"),
            "--calibration",
            str(out / "calibration.csv"),
        ],
        tracking_uri=tracking_uri,
        run_id=run_id,
    )
    steps.log_metrics(metrics, out / "evaluate.json")
    labels = read_labels(Path(dataset.path) / "labels.txt")
    steps.log_confusion(confusion, out / "confusion.csv", labels)


@dsl.component(base_image=IMAGE)
def export(
    dataset: Input[Dataset],
    tuned: Input[Model],
    evaluation: Input[Dataset],
    model: str,
    export: str,
    serving: str,
    tracking_uri: str,
    run_id: str,
    exported: Output[Model],
    card: Output[Markdown],
    metrics: Output[Metrics],
):
    import shutil
    import tempfile
    from pathlib import Path

    from pipelines import steps

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "export.json"
        steps.run_stage(
            "export",
            {"model": model, "export": export, "serving": serving},
            [
                "--model",
                tuned.path,
                "--ingest",
                dataset.path,
                "--evaluation",
                f"{evaluation.path}/evaluate.json",
                "--out",
                exported.path,
                "--report",
                str(report),
            ],
            tracking_uri=tracking_uri,
            run_id=run_id,
        )
        shutil.copyfile(Path(exported.path) / "model_card.md", card.path)
        steps.log_metrics(metrics, report)


@dsl.component(base_image=IMAGE)
def push(
    exported: Input[Model],
    evaluation: Input[Dataset],
    serving: str,
    tracking_uri: str,
    run_id: str,
    metrics: Output[Metrics],
):
    """Register; promote and copy to the serving base path only when blessed (the decision is
    made here, from the blessing evaluate wrote)."""
    import tempfile
    from pathlib import Path

    from pipelines import steps

    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "push.json"
        steps.run_stage(
            "push",
            {"serving": serving},
            [
                "--export",
                exported.path,
                "--blessing",
                f"{evaluation.path}/evaluate/blessing.json",
                "--summary",
                str(summary),
            ],
            tracking_uri=tracking_uri,
            run_id=run_id,
        )
        steps.log_metrics(metrics, summary)


@dsl.component(base_image=IMAGE)
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
    from pipelines import steps

    logs = [ingest.path, validate.path, augment.path, train.path, finetune.path]
    return ",".join(steps.import_stage_logs(logs, tracking_uri, run_id))


RESOURCES = {
    # stage: (cpu request, memory request, gpu)
    "start-run": ("250m", "512Mi", False),
    "import-logs": ("250m", "1Gi", False),
    "ingest": ("1", "2Gi", False),
    "validate": ("500m", "1Gi", False),
    "augment": ("2", "4Gi", False),
    "train": ("4", "16Gi", True),
    "finetune": ("4", "16Gi", True),
    "evaluate": ("2", "8Gi", False),
    "export": ("2", "8Gi", False),
    "push": ("500m", "2Gi", False),
}
CACHED = {"ingest", "validate", "augment", "train", "finetune"}
"""Steps whose outputs follow from their inputs alone, and whose inputs come only from the
pipeline's parameters and other cached steps (so a cache hit is possible at all): they do not
take the execution's MLflow run id. Not cached: start-run and import-logs (the run is new every
execution), evaluate (compares with the registry's current champion), export (its model card
carries this execution's evaluation) and push (writes the registry and the serving path)."""


NOT_RETRIED = {"push"}
"""push registers a model version before it promotes: a blind retry could register twice."""


def _configure(task: Any, stage: str) -> Any:
    from kfp import kubernetes

    cpu, memory, gpu = RESOURCES[stage]
    task.set_display_name(stage)
    task.set_cpu_request(cpu).set_memory_request(memory)
    if stage not in NOT_RETRIED:
        task.set_retry(num_retries=2, backoff_duration="30s", backoff_factor=2.0)
    task.set_caching_options(stage in CACHED)
    if gpu:
        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(1)
        kubernetes.add_node_selector(task, *GPU_NODE_LABEL)
        kubernetes.add_toleration(task, key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
    return task


def build(params: dict[str, Any]) -> Any:
    """The pipeline, its parameter defaults taken from ``params`` (a loaded params.yaml)."""

    # Sections travel as JSON text: KFP parameters cannot hold null, params.yaml can.
    sections = {name: json.dumps(params.get(name) or {}) for name in params}
    data_, ingest_, validate_, model_, augment_ = (
        sections.get(n, "{}") for n in ("data", "ingest", "validate", "model", "augment")
    )
    train_, finetune_, evaluate_, export_, serving_ = (
        sections.get(n, "{}") for n in ("train", "finetune", "evaluate", "export", "serving")
    )

    @dsl.pipeline(
        name="imgpipe",
        description="Transfer-learning image classification: ingest to a pushed, served model.",
    )
    def imgpipe(
        source: str = "sample",
        data_version: str = "",
        mlflow_tracking_uri: str = "http://mlflow.imgpipe.svc.cluster.local:5000",
        mlflow_experiment: str = "imgpipe",
        data: str = data_,
        ingest_params: str = ingest_,
        validate_params: str = validate_,
        model: str = model_,
        augment_params: str = augment_,
        train_params: str = train_,
        finetune_params: str = finetune_,
        evaluate_params: str = evaluate_,
        export_params: str = export_,
        serving: str = serving_,
    ) -> None:
        run = _configure(
            start_run(tracking_uri=mlflow_tracking_uri, experiment=mlflow_experiment), "start-run"
        )
        # Cached steps log into their own store (mlflow_log); the others into the run.
        common = {"tracking_uri": mlflow_tracking_uri, "run_id": run.output}
        ingested = _configure(
            ingest(source=source, data_version=data_version, data=data, ingest=ingest_params),
            "ingest",
        )
        dataset = ingested.outputs["dataset"]
        validated = _configure(validate(dataset=dataset, validate=validate_params), "validate")
        augmented = _configure(
            augment(dataset=dataset, model=model, augment=augment_params), "augment"
        )
        augmented.after(validated)  # data that failed validation never reaches training
        trained = _configure(
            train(
                dataset=dataset,
                augmented=augmented.outputs["augmented"],
                model=model,
                train=train_params,
            ),
            "train",
        )
        tuned = _configure(
            finetune(
                dataset=dataset,
                augmented=augmented.outputs["augmented"],
                trained=trained.outputs["trained"],
                model=model,
                finetune=finetune_params,
            ),
            "finetune",
        )
        _configure(
            import_logs(
                ingest=ingested.outputs["mlflow_log"],
                validate=validated.outputs["mlflow_log"],
                augment=augmented.outputs["mlflow_log"],
                train=trained.outputs["mlflow_log"],
                finetune=tuned.outputs["mlflow_log"],
                **common,
            ),
            "import-logs",
        )
        evaluated = _configure(
            evaluate(
                dataset=dataset,
                tuned=tuned.outputs["tuned"],
                model=model,
                evaluate=evaluate_params,
                serving=serving,
                **common,
            ),
            "evaluate",
        )
        exported = _configure(
            export(
                dataset=dataset,
                tuned=tuned.outputs["tuned"],
                evaluation=evaluated.outputs["evaluation"],
                model=model,
                export=export_params,
                serving=serving,
                **common,
            ),
            "export",
        )
        _configure(
            push(
                exported=exported.outputs["exported"],
                evaluation=evaluated.outputs["evaluation"],
                serving=serving,
                **common,
            ),
            "push",
        )

    return imgpipe


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


def run_local(params: dict[str, Any], pipeline_root: Path, **arguments: Any) -> Any:
    """Run the whole pipeline for real with kfp.local, in this venv (SubprocessRunner,
    use_venv=False: the project is already installed here)."""
    from kfp import local

    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root),
        raise_on_error=True,
    )
    return build(params)(**arguments)
