"""Typed views of ``params.yaml``: the single home of every tunable number.

Each stage reads only its own section. Unknown or mistyped keys are errors that name the key,
so a typo in ``params.yaml`` never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import pydantic
import yaml

from imgpipe.core.errors import InputError

DEFAULT_PARAMS = Path("params.yaml")

T = TypeVar("T")

# Lists in YAML, tuples in the frozen views; the items are still checked strictly.
Names = Annotated[tuple[str, ...], pydantic.Field(strict=False)]
# Dataclasses validated by pydantic, strictly: an unknown key or a "42" for an int is an error.
_STRICT = pydantic.ConfigDict(extra="forbid", strict=True)


class ParamsError(InputError):
    """A params.yaml section is missing, has an unknown key or a value of the wrong type."""


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class DataParams:
    """Where the raw images are."""

    source: str
    """A folder of class folders (``<source>/<label>/<image>``) or a CSV manifest
    (``filepath,label[,metadata...]``, paths relative to the CSV's folder)."""
    metadata_csv: str | None
    """Optional CSV with ``filepath`` plus metadata columns, joined on ``filepath`` (relative
    to the source folder). Used with a folder source."""


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class IngestParams:
    seed: int
    val_fraction: float
    test_fraction: float
    stratify_by: Names
    max_pixels: int
    """Images whose header claims more pixels are quarantined as decompression bombs."""
    images_per_shard: int
    split_mode: Literal["auto", "random", "predefined"]
    """``predefined`` keeps the source's own splits (``train/``, ``val/`` or ``validation/``,
    ``test/`` folders, or a CSV ``split`` column), carving a missing val or test split out of
    train; ``random`` draws every split; ``auto`` is ``predefined`` when the source has splits."""
    group_by: str | None
    group_method: Literal["stable", "balanced"]
    """How whole groups are placed (``group_by``; also the cross-validation folds). ``stable``:
    by a hash of each group's name within its majority class, so adding groups moves only the
    few whose place crosses a boundary (for data that grows), at the cost of per-class fractions
    that follow a few large groups. ``balanced``: largest groups first, each to the split that
    brings every class closest to its fractions (as scikit-learn's StratifiedGroupKFold), for a
    fixed data set; adding groups may move many. Ingest reports what the method reached."""
    """A metadata column (patient, module, photographer...): images sharing a value stay in one
    split. None splits image by image."""
    folds: int
    """Cross-validation (``imgpipe crossval``): the non-test images cut into this many folds,
    class by class in the split's own hash order, so that fold 0 is about the val split when
    ``val_fraction / (1 - test_fraction)`` is ``1 / folds``."""
    fold: int | None
    """None: the train/val split above. A fold in ``[0, folds)``: val is that fold of the
    non-test images and train the other folds; the test split is the same as without it."""
    workers: int | None
    """Processes that check images and read them into shards; None: every core this process
    may use (imgpipe.core.parallel.cpu_count), one per 2,000 images at most (a smaller source does
    not repay starting them). The output is the same for any count."""

    def __post_init__(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ParamsError(f"ingest.{name} must be in [0, 1), got {value}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ParamsError(
                "ingest.val_fraction + ingest.test_fraction must leave images for training, "
                f"got {self.val_fraction} + {self.test_fraction}"
            )
        if "label" not in self.stratify_by:
            raise ParamsError(
                f"ingest.stratify_by must include 'label', got {list(self.stratify_by)}"
            )
        if self.images_per_shard < 1 or self.max_pixels < 1:
            raise ParamsError("ingest.images_per_shard and ingest.max_pixels must be positive")
        if self.workers is not None and self.workers < 1:
            raise ParamsError(f"ingest.workers must be null or at least 1, got {self.workers}")
        if self.folds < 2:
            raise ParamsError(f"ingest.folds must be at least 2, got {self.folds}")
        if self.fold is not None and not 0 <= self.fold < self.folds:
            raise ParamsError(
                f"ingest.fold must be null or in [0, folds={self.folds}), got {self.fold}"
            )


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class ValidateParams:
    labels: Names
    """The expected label set; empty accepts whatever labels the data has."""
    min_images_per_class: int
    """Error level: a class with fewer images in any split stops the pipeline."""
    min_side: int
    max_side: int
    max_imbalance_ratio: float
    """Warning level: largest class count / smallest class count."""


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class ModelParams:
    """Shared by augment, train, finetune and export: what the network sees."""

    backbone: str
    weights: str | None
    """``imagenet``, a local weights file, or null for random initialisation (tests)."""
    image_size: int | None
    """Square input size in pixels; null takes the backbone's native size."""


PER_EPOCH = "per_epoch"
"""``augment.balance_classes``'s value for a class-balanced draw in every fine-tuning epoch."""


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class AugmentParams:
    seed: int
    views_per_image: int
    """K augmented views per training image, beside the original."""
    balance_classes: bool | Literal["per_epoch"]
    """true: augment oversamples smaller classes (each copy freshly augmented) up to the largest
    class, once, in the shards the frozen phase trains on. ``per_epoch``: the shards stay as the
    data is, and each fine-tuning epoch draws its images class-balanced instead
    (``imgpipe.data.datasets.image_dataset``'s ``balanced``)."""
    flip_horizontal: bool
    flip_vertical: bool
    rotate_90: bool
    """Random multiples of 90 degrees (label-preserving for square, symmetric subjects)."""
    rotation_degrees: float
    zoom: float
    """Largest relative zoom in (crop) or out (pad), e.g. 0.1 = +-10%."""
    brightness: float
    """Largest brightness change as a fraction of the range."""
    contrast: float
    preview_images: int
    images_per_shard: int
    """Most images in one output shard; each of ingest's train shards gives its own."""
    workers: int | None
    """Processes, each augmenting one input shard at a time; None: every core this process may
    use (imgpipe.core.parallel.cpu_count), one per input shard at most. The output is the same for
    any count."""

    def __post_init__(self) -> None:
        if self.views_per_image < 0 or not 0 <= self.zoom < 0.5:
            raise ParamsError("augment.views_per_image must be >= 0 and augment.zoom in [0, 0.5)")
        if self.workers is not None and self.workers < 1:
            raise ParamsError(f"augment.workers must be null or at least 1, got {self.workers}")


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class TrainParams:
    """Frozen-base phase: the head trains on cached base features."""

    seed: int
    batch_size: int
    epochs: int
    learning_rate: float
    dropout: float
    hidden_units: int
    """0: GAP -> Dropout -> Dense; >0 adds Dense(hidden_units, relu) -> Dropout before it."""
    head: Literal["softmax", "ordinal"]
    """The output: a softmax over the classes, or for ordered labels (listed in order, e.g.
    ELPV's defect probabilities) a cumulative-logit layer with cut-points refitted on
    validation (imgpipe.model.ordinal). Both give class probabilities to evaluate and serving."""
    class_weights: bool
    early_stopping_patience: int
    reduce_lr_patience: int
    reduce_lr_factor: float


RESUME_IGNORES = ("objective", "calibrate", "mixed_precision", "workers")
"""finetune params that fine-tuning checkpoints do not depend on as written: ``objective``
and ``calibrate`` act after training (changing them reuses the epochs); ``mixed_precision`` and
``workers`` count as the precision and the replicas they resolve to
(imgpipe.model.checkpoints.fingerprint)."""


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class FittedDecision:
    """The served decision fitted on out-of-fold predictions of all the non-test images
    (``imgpipe crossval --apply`` writes it): what a run that trains on train and validation
    folds into its output layer, having no held-out images of its own to fit it on."""

    objective: Literal["accuracy", "balanced_accuracy"] | float
    temperature: float
    tau: float | None
    """The prior correction's scale (``imgpipe.evaluation.metrics.prior_correction``); None: the
    accuracy objective's argmax, nothing fitted."""
    fitted_on: str
    """``training_digest`` of the images and the recipe it was fitted for: a run on other data
    or another recipe does not use it."""
    source: str
    """Where it was fitted (the folds, seeds and number of predictions), for the reader."""


def _fitted_decision(value: Any) -> Any:
    """A mapping in params.yaml -> FittedDecision, its keys checked as strictly as a section's."""
    if not isinstance(value, dict):
        return value
    try:
        return FittedDecision(**value)
    except pydantic.ValidationError as exc:
        problems = [f"{_where('', e['loc']).lstrip('.')}: {e['msg']}" for e in exc.errors()]
        raise ValueError("; ".join(problems)) from None


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class FinetuneParams:
    seed: int
    batch_size: int
    epochs: int
    learning_rate: float
    """Peak learning rate (per replica: scaled by the replicas, imgpipe.model.distribute), reached
    by a linear warm-up, then a cosine decay to ``learning_rate * final_lr_fraction``."""
    final_lr_fraction: float
    warmup_epochs: float
    """Epochs of linear warm-up from 0 to the peak rate, so the first steps do not undo the
    head trained in the frozen phase (and a rate scaled by many replicas starts gently)."""
    ema_momentum: float | None
    """The weights validated, checkpointed and kept are an exponential moving average of the
    trained ones with this momentum (Keras' optimizer EMA): horizon ~ 1 / (1 - momentum)
    steps. None: the trained weights themselves."""
    unfreeze_layers: int
    """Top N layers of the base become trainable (rounded up to a block boundary);
    BatchNormalization layers stay frozen, in inference mode."""
    early_stopping_patience: int | None
    """None: the whole schedule runs and the last epoch's (averaged) weights are kept. A
    number: stop after that many epochs without a better ``monitor`` and keep the best one."""
    monitor: str
    """What picks the best epoch when stopping early: ``val_accuracy`` (higher is better) or
    ``val_loss``."""
    calibrate: bool
    """Fit a temperature on validation (after the prior correction) and fold it into the output
    layer, so the served probabilities are calibrated; the class chosen does not change."""
    objective: Literal["accuracy", "balanced_accuracy"] | float
    """What the served decision maximises. ``accuracy``: the network's own decision (the
    calibrated argmax; for an ordinal head its trained cut-points), nothing fitted but the
    temperature. ``balanced_accuracy``, or a weight w in (0, 1]: after training, a decision
    fitted to maximise ``(1 - w) * accuracy + w * balanced accuracy`` (``balanced_accuracy``
    is w = 1): the output bias moves by ``tau * log(training class prior)``
    (imgpipe.evaluation.metrics.prior_correction), or an ordinal head's cut-points are refitted."""
    mixed_precision: bool | None
    """None: ``mixed_float16`` when a GPU is visible, float32 otherwise; true/false force it.
    The head stays float32 and the saved model is float32 either way (imgpipe.model.distribute)."""
    quantization_aware_epochs: int
    """0: export quantizes the float model after training. N: after the schedule, N more
    epochs train the model in the form that computes what the full-integer TFLite model will
    (BatchNorm folded, int8 kernels, 8-bit activations; imgpipe.model.quantization), which is then
    the model evaluated, served and converted (EfficientNet-Lite backbones, softmax head)."""
    workers: int
    """Machines that fine-tune together. 1: one pod, as DVC and kfp.local run it. More: the
    Kubeflow step launches a Kubeflow Trainer TrainJob of that many nodes
    (MultiWorkerMirroredStrategy; ``pipelines/kubeflow_trainer.py``, ``infra/k8s/trainer``)."""
    train_on: Literal["auto", "train", "train+val"]
    """``train``: the val split is held out, the decision and temperature are fitted on it
    (recipe runs, cross-validation folds). ``train+val``: every non-test image trains the served
    model with the fixed schedule, and ``decision`` (fitted out-of-fold) is folded in; refused
    when ``decision`` was fitted on other images or another recipe. ``auto``: ``train+val`` when
    ``decision`` fits this data and recipe, else ``train`` (finetune says which and why)."""
    decision: Annotated[FittedDecision | None, pydantic.BeforeValidator(_fitted_decision)]
    """The decision fitted out-of-fold by ``imgpipe crossval --apply``; None: none yet."""

    def __post_init__(self) -> None:
        if self.train_on == "train+val" and self.early_stopping_patience is not None:
            raise ParamsError(
                "finetune.train_on: train+val has no held-out images to stop early on: "
                "set finetune.early_stopping_patience to null, or train_on to train"
            )
        if self.workers < 1:
            raise ParamsError(f"finetune.workers must be at least 1, got {self.workers}")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise ParamsError(
                f"finetune.warmup_epochs must be within [0, epochs={self.epochs}], "
                f"got {self.warmup_epochs}"
            )
        if self.ema_momentum is not None and not 0.0 < self.ema_momentum < 1.0:
            raise ParamsError(
                f"finetune.ema_momentum must be null or within (0, 1), got {self.ema_momentum}"
            )
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ParamsError(
                "finetune.early_stopping_patience must be null or at least 1, "
                f"got {self.early_stopping_patience}"
            )
        if self.monitor not in ("val_accuracy", "val_loss"):
            raise ParamsError(
                f"finetune.monitor must be val_accuracy or val_loss, got {self.monitor!r}"
            )
        if isinstance(self.objective, float) and not 0.0 < self.objective <= 1.0:
            raise ParamsError(
                "finetune.objective must be accuracy, balanced_accuracy or a weight of balanced "
                f"accuracy within (0, 1], got {self.objective}"
            )
        if self.quantization_aware_epochs < 0:
            raise ParamsError(
                "finetune.quantization_aware_epochs must be 0 or more, "
                f"got {self.quantization_aware_epochs}"
            )

    @property
    def balance(self) -> float | None:
        """The weight of balanced accuracy in the fitted decision; None: nothing fitted."""
        if self.objective == "accuracy":
            return None
        return 1.0 if self.objective == "balanced_accuracy" else float(self.objective)


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class EvaluateParams:
    """Test-split evaluation and the blessing gate (the test split is read only here and by
    export's parity report)."""

    batch_size: int
    slice_by: Names
    """Manifest metadata columns to slice the metrics by (ELPV: module_type)."""
    calibration_bins: int
    misclassified_examples: int
    """How many of the most confidently misclassified test images the grid shows."""
    min_accuracy: float
    """Blessing, absolute: the candidate's test accuracy must reach this."""
    min_balanced_accuracy: float
    non_inferiority_margin: float
    """Blessing, against the champion: refused when its accuracy or balanced accuracy is
    below the champion's by more than this, beyond the test set's noise (the whole paired
    ``confidence`` interval of the difference lies below minus the margin)."""
    confidence: float
    """Of the two-sided paired bootstrap interval of the difference."""
    bootstrap_samples: int
    min_compared_images: int
    """Fewer test images that neither model trained on: the gate cannot compare, not blessed."""
    max_relabelled_fraction: float
    """Refused when more than this fraction of the champion's training images that are still in
    the data now carry another label: a relabelling is reviewed, then let through by raising
    this for that run (the accuracy on today's labels cannot show that they changed)."""
    max_test_decisions: int
    """Gating decisions on one test set after which evaluate warns that its figures are worn
    (each decision tells the pipeline a little about the test images)."""
    class_groups: dict[str, Names]
    """Groups of classes (name -> its classes, each class in one group at most) whose figures
    evaluate reports beside the classes' own: ELPV's functional (defect 0 and 1/3) and
    defective (2/3 and 1), the 2-class task of some published results. Empty: none."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.calibration_bins < 1 or self.misclassified_examples < 0:
            raise ParamsError(
                "evaluate.batch_size and evaluate.calibration_bins must be positive, "
                "evaluate.misclassified_examples >= 0"
            )
        bounded = ("min_accuracy", "min_balanced_accuracy", "non_inferiority_margin")
        for name in (*bounded, "max_relabelled_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ParamsError(f"evaluate.{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.5 <= self.confidence < 1.0:
            raise ParamsError(f"evaluate.confidence must be in [0.5, 1), got {self.confidence}")
        for name in ("bootstrap_samples", "min_compared_images", "max_test_decisions"):
            if getattr(self, name) < 1:
                raise ParamsError(f"evaluate.{name} must be at least 1, got {getattr(self, name)}")


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class ExportParams:
    warmup_images: int
    """Real validation images in the TF Serving warmup file (one request each, bytes signature)."""
    representative_images: int
    """Training images that calibrate the int8 TFLite model's quantisation ranges."""
    int8: bool
    """A full-integer model (int8 weights and activations, uint8 in and out) for NPUs and
    integer-only CPUs, calibrated on ``representative_images``."""
    int8_weights: bool
    """A model with int8 weights and float activations (dynamic-range quantization): the same
    size as the full-integer one, closer to the float model, not integer-only."""
    data_description: str
    """For the model card: what the images are and where they come from."""
    data_licence: str
    """For the model card: the training data's licence (ELPV: CC-BY-NC-SA-4.0)."""

    def __post_init__(self) -> None:
        if not 1 <= self.warmup_images <= 1000 or self.representative_images < 1:
            raise ParamsError(
                "export.warmup_images must be in [1, 1000] (TF Serving's limit) and "
                "export.representative_images >= 1"
            )


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class ServingParams:
    """Shared by export, push and the serving configs."""

    model_name: str
    """TF Serving model name and MLflow registered model name."""
    model_base_path: str
    """Push target, TF Serving layout: ``<model_base_path>/<model_name>/<version>/``."""
    max_image_pixels: int
    """The served graph reads each image's header before decoding it and refuses one of more
    pixels (INVALID_ARGUMENT naming this limit): a small PNG can claim 20,000 x 20,000."""

    def __post_init__(self) -> None:
        import re

        if self.max_image_pixels < 1:
            raise ParamsError(
                f"serving.max_image_pixels must be positive, got {self.max_image_pixels}"
            )

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.model_name):
            raise ParamsError(
                f"serving.model_name must be letters, digits, '_', '.' or '-', "
                f"got {self.model_name!r}"
            )


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class RequestLogParams:
    """The logging sidecar in front of TF Serving (serving/sidecar.py)."""

    sampling_rate: float
    """Fraction of answered Predict and Classify calls written to the log."""
    directory: str
    """Where the log files go; relative: in the project (``make serve``); a pod's folder on
    the shared volume under Kubernetes (the sidecar's ``--log_dir``)."""
    max_file_mb: float
    """A file is closed (and readable by ``imgpipe monitor``) past this size..."""
    rotate_seconds: float
    """...or this age."""
    max_total_mb: float
    """The folder's bound: the oldest closed files are deleted beyond it."""
    retention_hours: float
    """Files (and the images in them) are deleted after this."""
    queue_mb: float
    """Bytes of records waiting for the writer (each counted with a fixed overhead); beyond
    it a record is dropped and counted."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.sampling_rate <= 1.0:
            raise ParamsError(
                f"request_log.sampling_rate must be in [0, 1], got {self.sampling_rate}"
            )
        if not 0 < self.max_file_mb <= self.max_total_mb:
            raise ParamsError(
                "request_log.max_file_mb must be positive and at most request_log.max_total_mb"
            )
        if min(self.rotate_seconds, self.retention_hours, self.queue_mb) <= 0:
            raise ParamsError(
                "request_log.rotate_seconds, retention_hours and queue_mb must be positive"
            )


@pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)
class MonitorParams:
    """``imgpipe monitor``: the reference profile export writes, the drift tests on logged
    requests, and when they start a retraining run."""

    reference_images: int
    """Validation images in each exported version's reference profile."""
    embedding_dims: int
    """Principal components of the backbone's pooled features that the drift test compares."""
    min_requests: int
    """Fewer logged requests since the last check: no verdict and no retraining."""
    permutations: int
    """Of the MMD permutation test."""
    false_alarm_rate: float
    """The rate at which a check with no shift raises drift, for its three tests together
    (embedding MMD, predicted classes by chi-square, confidence by Kolmogorov-Smirnov): each
    test alarms below ``false_alarm_rate / 3`` (Bonferroni, as Alibi Detect corrects its
    feature-wise tests), so the stated rate is the check's, not each test's."""
    max_requests: int
    """Logged images a check compares at most: a uniform sample (reservoir) of everything
    logged since the last check, streamed file by file, so the check's memory and time stay
    bounded however much traffic there was; every request is still counted."""
    max_accuracy_drop: float
    """With labelled feedback: retrain when the live accuracy's upper 95 % bound is this far
    below the champion's test accuracy."""
    input_mostly: float
    """Great Expectations ``mostly`` of the input checks: the fraction of logged images that
    must be in range (size, mode, brightness)."""
    directory: str
    """Reports and state: which log files were read, the open retraining."""

    def __post_init__(self) -> None:
        for name in (
            "reference_images",
            "embedding_dims",
            "min_requests",
            "permutations",
            "max_requests",
        ):
            if getattr(self, name) < 1:
                raise ParamsError(f"monitor.{name} must be at least 1, got {getattr(self, name)}")
        if self.max_requests < self.min_requests:
            raise ParamsError(
                f"monitor.max_requests ({self.max_requests}) must be at least min_requests "
                f"({self.min_requests})"
            )
        for name in ("false_alarm_rate", "max_accuracy_drop", "input_mostly"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ParamsError(f"monitor.{name} must be in (0, 1], got {getattr(self, name)}")


def _where(name: str, loc: tuple[Any, ...]) -> str:
    return ".".join([name, *(str(part) for part in loc)])


def section(cls: type[T], name: str, params: dict[str, Any]) -> T:
    """The typed view ``cls`` of ``params[name]``: every key required, none unknown, each of its
    declared type (strict: ``"42"`` is no int, ``true`` no number). Errors name the key."""
    if name not in params:
        raise ParamsError(
            f"params section '{name}' is missing (found: {', '.join(params) or 'none'})"
        )
    raw = params[name]
    if not isinstance(raw, dict):
        raise ParamsError(f"params section '{name}' must be a mapping, got {raw!r}")
    try:
        return cls(**raw)
    except pydantic.ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = _where(name, error["loc"])
            if error["type"] == "missing":
                problems.append(f"{where} is missing")
            elif error["type"] == "unexpected_keyword_argument":
                expected = ", ".join(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
                problems.append(f"unknown key {where}; expected some of: {expected}")
            elif not error["loc"]:  # a check across keys (__post_init__) says what it needs
                problems.append(str(error["msg"]).removeprefix("Value error, "))
            else:
                problems.append(f"{where}: {error['msg']}, got {error.get('input')!r}")
        raise ParamsError("; ".join(problems)) from None


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ParamsError(f"params file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(params, dict):
        raise ParamsError(f"{path} must hold a mapping of sections")
    return params


SECTIONS: dict[str, type] = {
    "data": DataParams,
    "ingest": IngestParams,
    "validate": ValidateParams,
    "model": ModelParams,
    "augment": AugmentParams,
    "train": TrainParams,
    "finetune": FinetuneParams,
    "evaluate": EvaluateParams,
    "export": ExportParams,
    "serving": ServingParams,
    "request_log": RequestLogParams,
    "monitor": MonitorParams,
}
"""Every params.yaml section and its typed view."""


def sections(names: Iterable[str], params: dict[str, Any]) -> dict[str, Any]:
    """The typed views of the sections ``names`` of ``params`` (see ``section``)."""
    return {name: section(SECTIONS[name], name, params) for name in names}


PROFILES = Path("profiles")
"""Profiles: YAML files of overrides on params.yaml, section by section (``profiles/full.yaml``)."""


def profile_path(name: str) -> Path:
    """A profile by name (``full`` -> ``profiles/full.yaml``) or by path."""
    path = Path(name)
    return path if path.suffix in (".yaml", ".yml") else PROFILES / f"{name}.yaml"


def with_profile(params: dict[str, Any], name: str) -> dict[str, Any]:
    """``params`` with the profile's overrides applied: a profile changes only the keys it
    names. An unknown section or key, or a wrong type, is an error naming the profile and the
    key; the result is validated whole, as the pipeline validates params.yaml."""
    path = profile_path(name)
    return _overridden(params, load_params(path), str(path))


def set_value(path: Path, section_name: str, key: str, value: Any) -> None:
    """Set ``section_name.key`` of the params file ``path`` to ``value`` (YAML on one line,
    flow style), keeping every other line and the key's comment as they are; the file is
    replaced atomically and read back to check it."""
    from imgpipe.core.fileio import write_text_atomic

    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    top = next(
        (i for i, line in enumerate(lines) if line.split("#")[0].rstrip() == f"{section_name}:"),
        None,
    )
    if top is None:
        raise ParamsError(f"{path}: no top-level section '{section_name}' to set {key} in")
    end = next(
        (i for i in range(top + 1, len(lines)) if lines[i][:1] not in (" ", "#", "\n")),
        len(lines),
    )
    prefix = f"  {key}:"
    at = next((i for i in range(top + 1, end) if lines[i].startswith(prefix)), None)
    if at is None:
        raise ParamsError(f"{path}: section '{section_name}' has no key '{key}' to set")
    follows = at + 1  # a block value's own lines, more deeply indented
    while follows < end and lines[follows].startswith("    "):
        follows += 1
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip()
    text = text.removesuffix("\n...").strip()
    _, hash_, comment = lines[at].partition("  #")
    line = f"{prefix} {text}" + (f"  #{comment}" if hash_ else "\n")
    lines[at:follows] = [line if line.endswith("\n") else line + "\n"]
    content = "".join(lines)
    written = (yaml.safe_load(content) or {}).get(section_name, {}).get(key)
    if written != value:
        raise ParamsError(f"{path}: {section_name}.{key} would read back as {written!r}")
    write_text_atomic(path, content)


def with_sets(params: dict[str, Any], sets: Iterable[str]) -> dict[str, Any]:
    """``params`` with ``section.key=value`` overrides (the values in YAML, as ``dvc exp run
    -S`` takes them), checked like a profile's."""
    overrides: dict[str, dict[str, Any]] = {}
    for item in sets:
        key, equals, value = item.partition("=")
        section_, dot, name = key.partition(".")
        if not (equals and dot and name):
            raise ParamsError(f"-S {item!r}: expected section.key=value")
        overrides.setdefault(section_, {})[name] = yaml.safe_load(value)
    return _overridden(params, overrides, "-S")


def _overridden(params: dict[str, Any], overrides: dict[str, Any], where: str) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in params.items()}
    for name_, values in overrides.items():
        if name_ not in SECTIONS or not isinstance(values, dict):
            raise ParamsError(f"{where}: '{name_}' is no params section")
        unknown = set(values) - set(merged.get(name_, {}))
        if unknown:
            raise ParamsError(f"{where}: unknown key {name_}.{sorted(unknown)[0]}")
        merged[name_] = {**merged[name_], **values}
    try:
        sections(SECTIONS, merged)
    except ParamsError as exc:
        raise ParamsError(f"{where}: {exc}") from None
    return merged


def set_flags(name: str) -> list[str]:
    """The profile as ``dvc exp run`` arguments: ``-S section.key=value`` for each override."""
    overrides = load_params(profile_path(name))
    flags = []
    for name_, values in overrides.items():
        for key, value in values.items():
            text = yaml.safe_dump(value, default_flow_style=True).strip()
            flags += ["-S", f"{name_}.{key}={text.removesuffix('...').strip()}"]
    return flags
