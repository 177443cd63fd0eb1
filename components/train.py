"""train: the frozen-base phase. The base's pooled features are computed once per materialised
image (and cached on disk by content), the head trains on them, and the stage writes the full
model (base + head), so no later stage needs the cache.

Training the head on cached features is the same math as ``fit`` through the frozen base: the
base runs in inference mode either way, so each image's features are a constant.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
from tqdm import tqdm

from imgpipe.core.fileio import atomic_path, sha256_file, write_json_atomic
from imgpipe.core.params import ModelParams, TrainParams
from imgpipe.data.datasets import epoch_batches, image_dataset
from imgpipe.data.labels import read_labels
from imgpipe.data.manifest import LABELS, SHARDS
from imgpipe.data.tfrecords import count_records, split_files
from imgpipe.evaluation.metrics import validation_scores
from imgpipe.model import backbones
from imgpipe.model.distribute import scaled, strategy
from imgpipe.model.training import (
    CURVES,
    MODEL,
    EpochLogger,
    assemble,
    build_head,
    class_weights,
    plot_curves,
    write_history,
)

log = logging.getLogger(__name__)

EXTRACT_BATCH = 64


def feature_key(files: Sequence[str], model: ModelParams, size: int) -> str:
    digest = hashlib.sha256(json.dumps([model.backbone, model.weights, size]).encode())
    if model.weights and Path(model.weights).is_file():
        digest.update(sha256_file(model.weights).encode())
    for name in files:
        digest.update(sha256_file(name).encode())
    return digest.hexdigest()[:24]


def extract_features(
    base: keras.Model, dataset: Any, total: int, desc: str, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled base features (inference mode) and labels for every example of ``dataset``."""
    import tensorflow as tf

    pool = keras.layers.GlobalAveragePooling2D()

    @tf.function(reduce_retracing=True)
    def forward(images: Any) -> Any:
        return pool(base(images, training=False))

    features, labels = [], []
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for images, y in dataset:
            features.append(forward(images).numpy())
            labels.append(y.numpy())
            bar.update(int(y.shape[0]))
    return np.concatenate(features).astype(np.float32), np.concatenate(labels).astype(np.int32)


def cached_features(
    cache_dir: Path,
    files: Sequence[str],
    base: keras.Model,
    model: ModelParams,
    size: int,
    desc: str,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    path = Path(cache_dir) / f"{feature_key(files, model, size)}.npz"
    if path.is_file():
        with np.load(path) as cached:
            log.info("%s: %d cached feature vectors from %s", desc, len(cached["labels"]), path)
            return cached["features"], cached["labels"]
    total = count_records(files)
    x, y = extract_features(base, image_dataset(files, size, EXTRACT_BATCH), total, desc, progress)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, features=x, labels=y)
    return x, y


def fit(
    model: keras.Model,
    x: Any,
    y: np.ndarray,
    validation: tuple[Any, np.ndarray],
    params: TrainParams,
    num_classes: int,
    callbacks: Sequence[Any] = (),
    epochs: int | None = None,
    replicas: int = 1,
) -> keras.callbacks.History:
    """Compile and fit ``model`` on in-memory ``x`` (cached features or images): Adam, sparse
    categorical cross-entropy, class weights, a seeded per-epoch shuffle. The same function
    trains the head on features and, in tests, the whole frozen model on images. Under a
    strategy of ``replicas`` replicas (``model`` built in its scope) the batch and rate scale
    by imgpipe.model.distribute.scaled."""
    import tensorflow as tf

    batch_size, learning_rate = scaled(params.batch_size, params.learning_rate, replicas)
    keras.utils.set_random_seed(params.seed)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    examples = tf.data.Dataset.from_tensor_slices((x, y))
    total_epochs = epochs or params.epochs
    train = epoch_batches(
        lambda seed: examples.shuffle(len(y), seed=seed, reshuffle_each_iteration=False).batch(
            batch_size
        ),
        params.seed,
        total_epochs,
    )
    val = tf.data.Dataset.from_tensor_slices(validation).batch(batch_size)
    weights = class_weights(y, num_classes) if params.class_weights else None
    return model.fit(
        train,
        validation_data=val,
        epochs=total_epochs,
        steps_per_epoch=math.ceil(len(y) / batch_size),
        class_weight=weights,
        callbacks=list(callbacks),
        shuffle=False,  # the dataset shuffles itself, seeded
        verbose=0,
    )


MIN_LEARNING_RATE = 1e-6
"""ReduceLROnPlateau's floor, a named constant rather than a param: it only bounds the
reductions. With params.yaml's defaults it is never reached: from 0.001 at a factor of 0.3 it
takes six reductions, each after 3 epochs without progress, and early stopping ends the run
after 6 such epochs."""


def standard_callbacks(params: TrainParams, checkpoint: Path) -> list[Any]:
    return [
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=params.early_stopping_patience, restore_best_weights=True
        ),
        keras.callbacks.ModelCheckpoint(
            str(checkpoint), monitor="val_loss", save_best_only=True, save_weights_only=True
        ),
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss",
            factor=params.reduce_lr_factor,
            patience=params.reduce_lr_patience,
            min_lr=MIN_LEARNING_RATE,
        ),
    ]


def run(
    *,
    augmented: Path,
    dataset: Path,
    out: Path,
    summary: Path,
    history: Path,
    feature_cache: Path,
    model: ModelParams,
    train: TrainParams,
    progress: bool = True,
) -> dict[str, Any]:
    """Frozen-base training on the ``augmented`` shards, validated on ``dataset``'s val split.

    ``out`` receives model.keras (base + head), head.best.weights.h5 (the best epoch's head,
    saved by ModelCheckpoint) and curves.png; ``history`` the per-epoch CSV that DVC plots;
    ``feature_cache`` keeps base features keyed by content across runs (never a stage output).
    Returns the metrics also written to ``summary``."""
    model_params, params = model, train
    labels = read_labels(dataset / LABELS)
    size = backbones.image_size(model_params)
    base = backbones.create(model_params)
    base.trainable = False

    started = time.perf_counter()
    train_files = split_files(augmented, "train")
    val_files = split_files(dataset / SHARDS, "val")
    x, y = cached_features(
        feature_cache,
        train_files,
        base,
        model_params,
        size,
        "train: base features (train)",
        progress,
    )
    vx, vy = cached_features(
        feature_cache,
        val_files,
        base,
        model_params,
        size,
        "train: base features (val)",
        progress,
    )
    features_seconds = time.perf_counter() - started

    distribution = strategy()
    replicas = distribution.num_replicas_in_sync
    keras.utils.set_random_seed(params.seed)  # the head's initial weights, too, come from the seed
    with distribution.scope():
        head = build_head(
            x.shape[1], len(labels), params.dropout, params.hidden_units, params.seed, params.head
        )
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as staged, distribution.scope():
        staged.mkdir()
        callbacks = [
            *standard_callbacks(params, staged / "head.best.weights.h5"),
            EpochLogger("frozen", 0, params.epochs, rows, progress),
        ]
        fit(head, x, y, (vx, vy), params, len(labels), callbacks, replicas=replicas)
        head_seconds = time.perf_counter() - started
        scores = validation_scores(vy, head.predict(vx, batch_size=256, verbose=0))
        assemble(base, head).save(staged / MODEL)
        plot_curves(rows, staged / CURVES, f"frozen {model_params.backbone} base, {size}px")
    write_history(history, rows)
    best = int(np.argmin([r["val_loss"] for r in rows]))
    metrics = {
        "frozen": {
            **{name: round(value, 6) for name, value in scores.items()},
            "epochs": len(rows),
            "best_epoch": best,
            "train_images": len(y),
            "image_size": size,
            "replicas": replicas,
            "feature_seconds": round(features_seconds, 2),
            "head_seconds": round(head_seconds, 2),
        }
    }
    write_json_atomic(summary, metrics)
    return metrics


def metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The frozen phase's final figures, for MLflow."""
    return {f"frozen.{k}": v for k, v in summary["frozen"].items()}


def log_to_mlflow(out: Path, history: Path, model: ModelParams) -> None:
    import mlflow

    mlflow.set_tag("backbone", model.backbone)
    mlflow.log_artifact(str(out / CURVES), "train")
    mlflow.log_artifact(str(history), "train")


def describe(summary: dict[str, Any]) -> str:
    frozen = summary["frozen"]
    return (
        f"frozen base, head val accuracy {frozen['val_accuracy']:.4f} after "
        f"{frozen['epochs']} epochs; model: {MODEL}"
    )
