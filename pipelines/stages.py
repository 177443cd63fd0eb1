"""Every stage of the pipeline, declared once: its inputs, outputs, params and summary metrics.

Like TFX's ``ComponentSpec`` (``PusherSpec``: PARAMETERS, INPUTS, OUTPUTS), in plain Python.
Everything that runs a stage is derived from these declarations, never written a second time:

- the ``imgpipe <stage>`` subcommand (``commands.stages``): one ``--<name> PATH`` per input and
  output, defaulting to the DVC paths below, and ``--params``;
- the Kubeflow component (``pipelines.kubeflow``): one typed artifact per input and output, one
  JSON parameter per params section, wired to the producing stages;
- ``dvc.yaml`` stays a readable checked-in file; ``tests/code/test_stages.py`` fails when it
  disagrees with these declarations, code deps included (found from the stage's imports).

The executor of stage ``<name>`` is ``components.<name>.run``: a plain function whose keyword
arguments are the declared inputs and outputs (as paths) and params sections (as the typed views
of ``imgpipe.core.params``); it returns the stage's summary, which it also writes to ``summary``.
``log_to_mlflow`` logs what a person compares in MLflow, ``describe`` is the line the CLI prints.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from imgpipe.core.errors import InputError

Kind = Literal["Dataset", "Model", "Metrics", "ClassificationMetrics", "HTML", "Markdown"]
"""The KFP artifact type (``kfp.dsl``) an input or output travels as in the Kubeflow pipeline."""


@dataclasses.dataclass(frozen=True)
class Output:
    path: str
    """Where it lives in the DVC project (``dvc.yaml``) and the CLI's default."""
    kind: Kind
    dvc: Literal["out", "metric", "plot", "persist", "cache"] = "out"
    """How DVC tracks it: a cached ``out``, a ``metric`` or ``plot`` file kept in git
    (``cache: false``), a ``persist``ed folder a rerun resumes from, or a ``cache`` folder that is
    no DVC output at all (content-keyed, kept across runs: the frozen-feature cache)."""
    plot: tuple[tuple[str, str], ...] = ()
    """DVC plot options (template, axes, title) for ``plot`` outputs."""


@dataclasses.dataclass(frozen=True)
class Input:
    stage: str
    """The producing stage; empty for the raw data, a path from params (``path``)."""
    output: str = ""
    subpath: str = ""
    """A file or folder inside the producer's output."""
    path: str = ""
    """For raw data only: the DVC dependency, a params reference such as ``${data.source}``."""


@dataclasses.dataclass(frozen=True)
class View:
    """A file inside an output that Kubeflow's UI shows as its own artifact (Data Docs, model
    card): a copy, not an input of any stage."""

    kind: Kind
    output: str
    subpath: str


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    help: str
    inputs: dict[str, Input]
    outputs: dict[str, Output]
    params: tuple[str, ...]
    """params.yaml sections, or single keys (``model.image_size``) where the stage reads only
    those: DVC reruns the stage when they change. The executor gets each whole section."""
    after: tuple[str, ...] = ()
    """Stages that must succeed first although no output of theirs is read (validation gates
    augment): DVC depends on their summary, Kubeflow orders the tasks."""
    views: dict[str, View] = dataclasses.field(default_factory=dict)

    @property
    def module(self) -> str:
        return f"components.{self.name}"

    @property
    def sections(self) -> tuple[str, ...]:
        """The params sections the executor receives, in declaration order."""
        return tuple(dict.fromkeys(p.split(".", 1)[0] for p in self.params))

    def input_path(self, name: str) -> str:
        """The DVC path of input ``name``: the producer's output path plus the subpath."""
        spec = self.inputs[name]
        if not spec.stage:
            return spec.path
        base = STAGES[spec.stage].outputs[spec.output].path
        return f"{base}/{spec.subpath}" if spec.subpath else base


def _stage(stage: Stage) -> tuple[str, Stage]:
    overlap = (set(stage.inputs) & set(stage.outputs)) | (
        (set(stage.inputs) | set(stage.outputs)) & set(stage.sections)
    )
    if overlap:  # they all become keyword arguments of one run()
        raise InputError(f"stage {stage.name}: {sorted(overlap)} named twice")
    return stage.name, stage


SUMMARY = "summary"

LOCAL_PIPELINE_ROOT = "outputs/kfp"
"""kfp.local's artifacts (``imgpipe pipeline run-local``, a retraining ``kfp-local``)."""
LOCAL_SHARED = "outputs/kfp-shared"
"""The folder standing in for the shared claim under kfp.local: serving versions (models/),
feature cache, checkpoints, kept across runs."""
"""Every stage's summary metrics: a small JSON that DVC tracks as metrics and MLflow logs."""

_INGEST = "outputs/ingest"
STAGES: dict[str, Stage] = dict(
    [
        _stage(
            Stage(
                "ingest",
                "check, deduplicate and split the raw images; write shards",
                inputs={"source": Input("", path="${data.source}")},
                outputs={
                    "out": Output(_INGEST, "Dataset"),
                    SUMMARY: Output("metrics/ingest.json", "Metrics", "metric"),
                },
                params=("data", "ingest", "validate.min_images_per_class"),
            )
        ),
        _stage(
            Stage(
                "validate",
                "run the Great Expectations suite on the manifest",
                inputs={"manifest": Input("ingest", "out", "manifest.csv")},
                outputs={
                    "out": Output("outputs/validate", "Dataset"),
                    SUMMARY: Output("metrics/validate.json", "Metrics", "metric"),
                },
                params=("validate",),
                views={"data_docs": View("HTML", "out", "data_docs/index.html")},
            )
        ),
        _stage(
            Stage(
                "augment",
                "materialise the balanced, augmented training set",
                inputs={"shards": Input("ingest", "out", "shards")},
                outputs={
                    "out": Output("outputs/augment", "Dataset"),
                    SUMMARY: Output("metrics/augment.json", "Metrics", "metric"),
                },
                params=("augment", "model.backbone", "model.image_size"),
                after=("validate",),
            )
        ),
        _stage(
            Stage(
                "train",
                "frozen-base phase: train the head on cached base features",
                inputs={
                    "augmented": Input("augment", "out", "shards"),
                    "dataset": Input("ingest", "out"),
                },
                outputs={
                    "out": Output("outputs/train", "Model"),
                    SUMMARY: Output("metrics/train.json", "Metrics", "metric"),
                    "history": Output("metrics/train_history.csv", "Dataset", "plot"),
                    "feature_cache": Output("outputs/cache/features", "Dataset", "cache"),
                },
                params=("model", "train"),
            )
        ),
        _stage(
            Stage(
                "finetune",
                "unfreeze the top of the base and fine-tune on fresh views; resumable",
                inputs={
                    "trained": Input("train", "out", "model.keras"),
                    "dataset": Input("ingest", "out"),
                    "frozen_history": Input("train", "history"),
                },
                outputs={
                    "out": Output("outputs/finetune", "Model"),
                    SUMMARY: Output("metrics/finetune.json", "Metrics", "metric"),
                    "history": Output("metrics/finetune_history.csv", "Dataset", "plot"),
                    "checkpoints": Output("outputs/finetune_checkpoints", "Dataset", "persist"),
                },
                params=("model", "finetune", "augment", "train"),
            )
        ),
        _stage(
            Stage(
                "evaluate",
                "test-split metrics and the blessing gate vs the champion",
                inputs={
                    "tuned": Input("finetune", "out", "model.keras"),
                    "decision": Input("finetune", "out", "decision.json"),
                    "dataset": Input("ingest", "out"),
                },
                outputs={
                    "out": Output("outputs/evaluate", "Dataset"),
                    SUMMARY: Output("metrics/evaluate.json", "Metrics", "metric"),
                    "confusion": Output(
                        "metrics/confusion.csv",
                        "ClassificationMetrics",
                        "plot",
                        plot=(
                            ("template", "confusion"),
                            ("x", "predicted"),
                            ("y", "actual"),
                            ("title", "Test split confusion matrix"),
                        ),
                    ),
                    "calibration": Output(
                        "metrics/calibration.csv",
                        "Dataset",
                        "plot",
                        plot=(
                            ("x", "confidence"),
                            ("y", "accuracy"),
                            ("title", "Reliability (accuracy by top-1 confidence bin)"),
                        ),
                    ),
                },
                params=("evaluate", "model.image_size", "serving.model_name"),
            )
        ),
        _stage(
            Stage(
                "export",
                "SavedModel (TF Serving layout), TFLite, parity, model card",
                inputs={
                    "tuned": Input("finetune", "out", "model.keras"),
                    "dataset": Input("ingest", "out"),
                    "evaluation": Input("evaluate", SUMMARY),
                },
                outputs={
                    "out": Output("outputs/export", "Model"),
                    SUMMARY: Output("metrics/export.json", "Metrics", "metric"),
                },
                params=(
                    "export",
                    "model",
                    "serving.model_name",
                    "monitor.reference_images",
                    "monitor.embedding_dims",
                ),
                views={"model_card": View("Markdown", "out", "model_card.md")},
            )
        ),
        _stage(
            Stage(
                "push",
                "register in MLflow; if blessed, make champion and push to serving",
                inputs={
                    "exported": Input("export", "out"),
                    "blessing": Input("evaluate", "out", "blessing.json"),
                },
                outputs={SUMMARY: Output("metrics/push.json", "Metrics", "metric")},
                params=("serving",),
            )
        ),
    ]
)
"""The stages in pipeline order (each reads only outputs of stages before it)."""


def upstream(name: str) -> list[str]:
    """The stages ``name`` depends on, directly or not (inputs and ``after``), in pipeline
    order."""
    seen: set[str] = set()
    pending = [name]
    while pending:
        stage = STAGES[pending.pop()]
        for parent in [i.stage for i in stage.inputs.values() if i.stage] + list(stage.after):
            if parent not in seen:
                seen.add(parent)
                pending.append(parent)
    return [s for s in STAGES if s in seen]
