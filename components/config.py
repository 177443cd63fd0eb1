"""Typed views of ``params.yaml``: the single home of every tunable number.

Each stage reads only its own section. Unknown or mistyped keys are errors that name the key,
so a typo in ``params.yaml`` never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

DEFAULT_PARAMS = Path("params.yaml")

T = TypeVar("T")


class ParamsError(ValueError):
    """A params.yaml section is missing, has an unknown key or a value of the wrong type."""


@dataclasses.dataclass(frozen=True)
class DataParams:
    """Where the raw images are."""

    source: str = "data"
    """A folder of class folders (``<source>/<label>/<image>``) or a CSV manifest
    (``filepath,label[,metadata...]``, paths relative to the CSV's folder)."""
    metadata_csv: str | None = None
    """Optional CSV with ``filepath`` plus metadata columns, joined on ``filepath`` (relative
    to the source folder). Used with a folder source."""


@dataclasses.dataclass(frozen=True)
class IngestParams:
    seed: int = 42
    val_fraction: float = 0.15
    test_fraction: float = 0.25
    stratify_by: tuple[str, ...] = ("label",)
    max_pixels: int = 50_000_000
    """Images whose header claims more pixels are quarantined as decompression bombs."""
    images_per_shard: int = 512

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


@dataclasses.dataclass(frozen=True)
class ValidateParams:
    labels: tuple[str, ...] = ()
    """The expected label set; empty accepts whatever labels the data has."""
    min_images_per_class: int = 10
    """Error level: a class with fewer images in any split stops the pipeline."""
    min_side: int = 32
    max_side: int = 8192
    max_imbalance_ratio: float = 20.0
    """Warning level: largest class count / smallest class count."""


@dataclasses.dataclass(frozen=True)
class ModelParams:
    """Shared by augment, train, finetune and export: what the network sees."""

    backbone: str = "efficientnet_lite0"
    weights: str | None = "imagenet"
    """``imagenet``, a local weights file, or null for random initialisation (tests)."""
    image_size: int | None = None
    """Square input size in pixels; null takes the backbone's native size."""


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    seed: int = 7
    views_per_image: int = 1
    """K augmented views per training image, beside the original."""
    balance_classes: bool = True
    """Oversample smaller classes (each copy freshly augmented) up to the largest class."""
    flip_horizontal: bool = True
    flip_vertical: bool = True
    rotate_90: bool = True
    """Random multiples of 90 degrees (label-preserving for square, symmetric subjects)."""
    rotation_degrees: float = 5.0
    zoom: float = 0.1
    """Largest relative zoom in (crop) or out (pad), e.g. 0.1 = +-10%."""
    brightness: float = 0.1
    """Largest brightness change as a fraction of the range."""
    contrast: float = 0.1
    preview_images: int = 8
    images_per_shard: int = 1024

    def __post_init__(self) -> None:
        if self.views_per_image < 0 or not 0 <= self.zoom < 0.5:
            raise ParamsError("augment.views_per_image must be >= 0 and augment.zoom in [0, 0.5)")


@dataclasses.dataclass(frozen=True)
class TrainParams:
    """Frozen-base phase: the head trains on cached base features."""

    seed: int = 42
    batch_size: int = 64
    epochs: int = 40
    learning_rate: float = 1e-3
    dropout: float = 0.2
    hidden_units: int = 0
    """0: GAP -> Dropout -> Dense; >0 adds Dense(hidden_units, relu) -> Dropout before it."""
    class_weights: bool = True
    early_stopping_patience: int = 6
    reduce_lr_patience: int = 3
    reduce_lr_factor: float = 0.3


@dataclasses.dataclass(frozen=True)
class FinetuneParams:
    seed: int = 42
    batch_size: int = 32
    epochs: int = 4
    learning_rate: float = 1e-5
    """Peak learning rate; cosine decay to ``learning_rate * final_lr_fraction``."""
    final_lr_fraction: float = 0.1
    unfreeze_layers: int = 30
    """Top N layers of the base become trainable (rounded up to a block boundary);
    BatchNormalization layers stay frozen, in inference mode."""
    early_stopping_patience: int = 2
    monitor: str = "val_accuracy"
    """What picks the best epoch and stops early: ``val_accuracy`` (higher is better) or
    ``val_loss``. On ELPV the validation loss rises while accuracy still improves (the training
    set is class-balanced, validation is not), so loss would keep a less accurate epoch."""

    def __post_init__(self) -> None:
        if self.monitor not in ("val_accuracy", "val_loss"):
            raise ParamsError(
                f"finetune.monitor must be val_accuracy or val_loss, got {self.monitor!r}"
            )


@dataclasses.dataclass(frozen=True)
class EvaluateParams:
    """Test-split evaluation and the blessing gate (the only reader of the test split)."""

    batch_size: int = 64
    slice_by: tuple[str, ...] = ()
    """Manifest metadata columns to slice the metrics by (ELPV: module_type)."""
    calibration_bins: int = 10
    misclassified_examples: int = 16
    """How many of the most confidently misclassified test images the grid shows."""
    min_accuracy: float = 0.0
    """Blessing, absolute: the candidate's test accuracy must reach this."""
    min_balanced_accuracy: float = 0.0
    max_regression: float = 0.01
    """Blessing, relative: accuracy and balanced accuracy may fall at most this far below the
    champion's, both measured here on the same test split."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.calibration_bins < 1 or self.misclassified_examples < 0:
            raise ParamsError(
                "evaluate.batch_size and evaluate.calibration_bins must be positive, "
                "evaluate.misclassified_examples >= 0"
            )
        for name in ("min_accuracy", "min_balanced_accuracy", "max_regression"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ParamsError(f"evaluate.{name} must be in [0, 1], got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class ExportParams:
    warmup_images: int = 4
    """Real validation images in the TF Serving warmup file (one request each, bytes signature)."""
    representative_images: int = 200
    """Training images that calibrate the int8 TFLite model's quantisation ranges."""
    int8: bool = True
    data_description: str = ""
    """For the model card: what the images are and where they come from."""
    data_licence: str = "unknown"
    """For the model card: the training data's licence (ELPV: CC-BY-NC-SA-4.0)."""

    def __post_init__(self) -> None:
        if not 1 <= self.warmup_images <= 1000 or self.representative_images < 1:
            raise ParamsError(
                "export.warmup_images must be in [1, 1000] (TF Serving's limit) and "
                "export.representative_images >= 1"
            )


@dataclasses.dataclass(frozen=True)
class ServingParams:
    """Shared by export, push and the serving configs."""

    model_name: str = "imgpipe"
    """TF Serving model name and MLflow registered model name."""
    model_base_path: str = "models"
    """Push target, TF Serving layout: ``<model_base_path>/<model_name>/<version>/``."""

    def __post_init__(self) -> None:
        import re

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.model_name):
            raise ParamsError(
                f"serving.model_name must be letters, digits, '_', '.' or '-', "
                f"got {self.model_name!r}"
            )


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ParamsError(f"{where} must be a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ParamsError(f"{where} must be {getattr(tp, '__name__', tp)}, got {value!r}")


def section(cls: type[T], name: str, params: dict[str, Any]) -> T:
    """Build the dataclass ``cls`` from ``params[name]``, checking every key and type."""
    raw = params.get(name) or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"params section '{name}' must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ParamsError(
            f"unknown key(s) in params section '{name}': {', '.join(unknown)}; "
            f"expected some of: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    values = {k: _coerce(v, hints[k], f"{name}.{k}") for k, v in raw.items()}
    return cls(**values)


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
