"""What the two training phases share: the classifier's shape, class weights, per-epoch MLflow
logging, progress, the history file DVC plots and the curves figure."""

from __future__ import annotations

import csv
import itertools
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
from tqdm import tqdm

from imgpipe.model.backbones import BASE_NAME
from imgpipe.model.ordinal import OrdinalProbabilities
from imgpipe.model.quantization import FakeQuant, QuantizedDense

HISTORY_COLUMNS = (
    "step",
    "phase",
    "epoch",
    "loss",
    "accuracy",
    "val_loss",
    "val_accuracy",
    "learning_rate",
    "seconds",
)
HEAD_NAME = "head"
POOLED_LAYER = "gap"
"""The layer whose output is the backbone's pooled features (the head's input, the embedding)."""
MODEL, CURVES = "model.keras", "curves.png"
"""What train and finetune write into their output folder (the model, both phases' curves)."""
DECISION = "decision.json"
"""Beside finetune's model (and an ensemble's or a student's): the objective, and the
temperature and decision folded into its output layer (imgpipe.evaluation.calibration.Decision):
evaluate scores the network's own decision beside the served one, and the test ECE the scores
had without the temperature."""


def build_head(
    feature_dim: int,
    num_classes: int,
    dropout: float,
    hidden_units: int,
    seed: int,
    output: str = "softmax",
    quantized: bool = False,
) -> keras.Model:
    """Dropout -> [Dense(hidden, relu) -> Dropout] -> the ``probabilities`` layer, on pooled
    base features; the same layers serve the cached-feature and the end-to-end model. The
    output is Dense(num_classes, softmax), or with ``output="ordinal"`` a cumulative-logit
    layer for ordered labels (imgpipe.model.ordinal): class probabilities either way.

    ``quantized`` (softmax only): the form quantization-aware fine-tuning trains, rounding the
    features, the kernels and the logits as TFLite's integer model stores them; its
    ``probabilities`` layer then gives the logits and a Softmax layer follows."""
    if quantized and output != "softmax":
        raise ValueError("a quantized head has a softmax output")
    dense = QuantizedDense if quantized else keras.layers.Dense

    def stored(x: Any, name: str) -> Any:
        return FakeQuant(name=name)(x) if quantized else x

    inputs = keras.Input((feature_dim,), name="pooled_features")
    x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(stored(inputs, "features_quant"))
    if hidden_units:
        x = stored(dense(hidden_units, activation="relu", name="hidden")(x), "hidden_quant")
        x = keras.layers.Dropout(dropout, seed=seed + 1, name="hidden_dropout")(x)
    if output == "ordinal":
        outputs = OrdinalProbabilities(num_classes, name="probabilities")(x)
    elif quantized:
        logits = stored(dense(num_classes, name="probabilities")(x), "logits_quant")
        outputs = keras.layers.Softmax(name="softmax")(logits)
    else:
        outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=HEAD_NAME)


def assemble(base: keras.Model, head: keras.Model) -> keras.Model:
    """image -> base (frozen in inference mode unless unfrozen later) -> GAP -> head."""
    inputs = keras.Input(base.input_shape[1:], name="image")
    features = base(inputs, training=False)
    pooled = keras.layers.GlobalAveragePooling2D(name=POOLED_LAYER)(features)
    return keras.Model(inputs, head(pooled), name="classifier")


def require_quantizable(model: keras.Model, model_params: Any) -> None:
    """Raise, naming the params, unless quantization-aware fine-tuning can fold ``model``: an
    EfficientNet-Lite backbone and a softmax head."""
    from imgpipe.core.errors import InputError
    from imgpipe.model import backbones, efficientnet_lite

    if model_params.backbone not in efficientnet_lite.VARIANTS:
        raise backbones.BackboneError(
            f"finetune.quantization_aware_epochs: quantization-aware fine-tuning is built for "
            f"the EfficientNet-Lite backbones ({', '.join(efficientnet_lite.VARIANTS)}), not "
            f"model.backbone {model_params.backbone}: set it to 0 (export then quantizes "
            "after training)"
        )
    if isinstance(model.get_layer(HEAD_NAME).get_layer("probabilities"), OrdinalProbabilities):
        raise InputError(
            "finetune.quantization_aware_epochs needs train.head: softmax (the ordinal head "
            "has no quantized form): set it to 0"
        )


def quantization_aware(model: keras.Model, model_params: Any) -> keras.Model:
    """``model`` (a trained classifier with a softmax head) in the form that computes what the
    full-integer TFLite model will (imgpipe.model.quantization): BatchNormalization folded into the
    convolutions, kernels rounded to int8, every stored tensor rounded to 256 levels. The same
    layers train as in ``model``; the ranges of the activations are still to be measured
    (``quantization.measure``)."""
    from imgpipe.model import backbones

    require_quantizable(model, model_params)
    head = model.get_layer(HEAD_NAME)
    output = head.get_layer("probabilities")
    dropout = head.get_layer("dropout")
    hidden = [layer for layer in head.layers if layer.name == "hidden"]
    quantized_head = build_head(
        int(head.inputs[0].shape[-1]),
        output.units,
        dropout.rate,
        hidden[0].units if hidden else 0,
        dropout.seed or 0,
        quantized=True,
    )
    for name in ("probabilities", *(["hidden"] if hidden else [])):
        source, target = head.get_layer(name), quantized_head.get_layer(name)
        target.kernel.assign(source.kernel)
        target.bias.assign(source.bias)
        target.refresh_bound()
        target.trainable = source.trainable
    return assemble(backbones.quantized_base(model_params, base_of(model)), quantized_head)


def deterministic() -> None:
    """TensorFlow's op determinism: ops run with deterministic kernels (an op that has none
    raises instead of varying), so one seed gives one model on one machine."""
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()


def base_of(model: keras.Model) -> keras.Model:
    return model.get_layer(BASE_NAME)


def class_weights(labels: Sequence[int] | np.ndarray, num_classes: int) -> dict[int, float]:
    """Inverse-frequency weights, mean 1 over the examples: n / (classes * n_class)."""
    counts = Counter(int(y) for y in labels)
    total = len(labels)
    return {c: total / (num_classes * counts[c]) if counts[c] else 0.0 for c in range(num_classes)}


class EpochLogger(keras.callbacks.Callback):
    """Per-epoch loss, accuracy and learning rate of one phase on the shared step axis, to the
    history rows (and MLflow when a run is active); a tqdm bar over epochs, and one over the
    batches of each epoch when ``steps`` is given (long epochs)."""

    def __init__(
        self,
        phase: str,
        step_offset: int,
        epochs: int,
        rows: list[dict[str, Any]],
        progress: bool = True,
        steps: int | None = None,
    ) -> None:
        super().__init__()
        self.phase, self.step_offset, self.rows = phase, step_offset, rows
        self.steps, self.progress = steps, progress
        self.bar = tqdm(total=epochs, desc=f"{phase}: epochs", unit="epoch", disable=not progress)
        self.batches: tqdm | None = None
        self._start = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()
        if self.bar.n == 0 and epoch:
            self.bar.update(epoch)  # resumed: show the epochs already done
        if self.steps:
            self.batches = tqdm(
                total=self.steps,
                desc=f"{self.phase}: epoch {epoch}",
                unit="batch",
                leave=False,
                disable=not self.progress,
            )

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.batches is not None:
            self.batches.update(1)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.batches is not None:
            self.batches.close()
        logs = dict(logs or {})
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        metrics = ("loss", "accuracy", "val_loss", "val_accuracy")
        row = {
            "step": self.step_offset + epoch,
            "phase": self.phase,
            "epoch": epoch,
            **{k: float(logs[k]) for k in metrics if k in logs},
            "learning_rate": lr,
            "seconds": round(time.perf_counter() - self._start, 3),
        }
        self.rows.append(row)
        log_epoch(row)
        # val accuracy where images are held out; the training accuracy where every non-test
        # image trains (the production run)
        shown = "val_accuracy" if "val_accuracy" in row else "accuracy"
        if shown in row:
            self.bar.set_postfix(
                {"val_acc" if shown == "val_accuracy" else "acc": f"{row[shown]:.3f}"}
            )
        self.bar.update(1)

    def on_train_end(self, logs: dict | None = None) -> None:
        self.bar.close()


def log_epoch(row: dict[str, Any]) -> None:
    import mlflow

    if mlflow.active_run() is None:
        return
    metrics: dict[str, float] = {
        k: row[k]
        for k in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")
        if k in row
    }
    mlflow.log_metrics(metrics, step=int(row["step"]))


def write_history(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    from imgpipe.core.fileio import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(
            f, fieldnames=list(HISTORY_COLUMNS), lineterminator="\n", restval=""
        )
        writer.writeheader()
        writer.writerows(rows)


def read_history(path: Path) -> list[dict[str, Any]]:
    if not Path(path).is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [
            {k: (v if k == "phase" else float(v) if v else np.nan) for k, v in row.items()}
            for row in csv.DictReader(f)
        ]


def plot_curves(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Loss and accuracy of every phase on one step axis, a line where each phase starts."""
    from imgpipe.core import figures

    plt = figures.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    steps = [r["step"] for r in rows]
    for ax, (key, label) in zip(
        axes,
        (("loss", "loss"), ("accuracy", "accuracy"), ("learning_rate", "learning rate")),
        strict=True,
    ):
        ax.plot(steps, [r.get(key, np.nan) for r in rows], "o-", ms=3, label=f"train {label}")
        if key != "learning_rate":
            ax.plot(
                steps, [r.get(f"val_{key}", np.nan) for r in rows], "o-", ms=3, label=f"val {label}"
            )
        else:
            ax.set_yscale("log")
        for r0, r1 in itertools.pairwise(rows):
            if r1["phase"] != r0["phase"]:
                ax.axvline((r0["step"] + r1["step"]) / 2, color="grey", ls="--", lw=1)
        ax.set_xlabel("epoch (both phases)")
        ax.set_title(label)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    figures.save(fig, path)
