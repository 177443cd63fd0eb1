"""finetune: unfreeze the top of the base and train the whole classifier at a low learning rate.

The recipe is built not to depend on luck:

- every epoch sees a fresh random view of each training image (imgpipe.augmentation), drawn from
  the seed, the epoch and the image, instead of the few views augment materialised once;
- the learning rate warms up linearly from 0 (the first steps would otherwise undo the head
  trained in the frozen phase), then follows a cosine decay;
- the weights validated, checkpointed and kept are an exponential moving average of the trained
  ones (Keras' optimizer EMA), and by default the whole schedule runs and its last averaged
  weights are kept: no early stop decided by a few images of a small validation set;
- TensorFlow's op determinism is on: the same seed on the same machine gives the same model.

BatchNormalization layers stay frozen and in inference mode (their statistics would be ruined by
small batches). After every epoch the model, with its optimizer state, is checkpointed together
with the stopping state, so a run killed at any moment (even ``kill -9`` mid-epoch) continues
from the last finished epoch when rerun with the same inputs and params, instead of starting
over. After training, the decision (a prior correction, or an ordinal head's cut-points) and a
temperature fitted on validation are folded into the output layer (imgpipe.calibration).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from imgpipe import backbones
from imgpipe.calibration import fit_output
from imgpipe.datasets import image_dataset
from imgpipe.distribute import (
    FLOAT32,
    MIXED,
    cluster,
    is_chief,
    precision,
    scaled,
    set_precision,
    strategy,
)
from imgpipe.fileio import atomic_path, sha256_file, write_json_atomic
from imgpipe.manifest import MANIFEST, SHARDS
from imgpipe.metrics import correction_text, validation_scores
from imgpipe.params import RESUME_IGNORES, AugmentParams, FinetuneParams, ModelParams
from imgpipe.tfrecords import count_records, split_files
from imgpipe.training import (
    CURVES,
    HEAD_NAME,
    MODEL,
    EpochLogger,
    base_of,
    deterministic,
    plot_curves,
    read_history,
    write_history,
)

log = logging.getLogger(__name__)

STATE = "state.json"
TEMPERATURE = "temperature.json"
"""Beside the model: the temperature and prior offset folded into its output layer (evaluate
reports the test ECE the scores had without the temperature)."""


def unfreeze_top(model: keras.Model, backbone: str, layers: int) -> int:
    """Make the top ``layers`` layers of the base trainable, moving the cut down to the start of
    its block so no block is half frozen; BatchNormalization stays frozen. Returns the number
    of base layers made trainable."""
    base = base_of(model)
    inner = backbones.inner_base(base)
    cuts = backbones.cut_points(backbones.get(backbone), base)
    wanted = len(inner.layers) - layers
    start = max([c for c in cuts if c <= wanted], default=cuts[0] if cuts else 0)
    base.trainable = True
    for layer in base.layers:
        if layer is not inner:
            layer.trainable = False  # the wrappers' preprocessing layers
    inner.trainable = True
    trainable = 0
    for index, layer in enumerate(inner.layers):
        layer.trainable = index >= start and not isinstance(layer, keras.layers.BatchNormalization)
        trainable += int(layer.trainable and bool(layer.weights))
    return trainable


def fingerprint(
    train_model: Path,
    files: list[str],
    model: ModelParams,
    params: FinetuneParams,
    views: AugmentParams,
    replicas: int,
    policy: str = FLOAT32,
) -> str:
    """What a checkpoint must match to be resumed: the starting model, the data, the params
    of training and of its views (not ``prior_balance`` or ``calibrate``, which act after it:
    changing them reuses the epochs), the number of replicas (which sets the global batch and
    rate, whatever ``workers`` asked) and the precision actually used (``mixed_precision:
    null`` means another one on another machine)."""
    training: dict[str, Any] = {
        k: v for k, v in dataclasses.asdict(params).items() if k not in RESUME_IGNORES
    }
    training["replicas"] = replicas
    training["precision"] = policy
    drawn = {k: v for k, v in dataclasses.asdict(views).items() if k in VIEW_PARAMS}
    digest = hashlib.sha256(
        json.dumps([dataclasses.asdict(model), training, drawn], sort_keys=True).encode()
    )
    for path in [str(train_model), *files]:
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


VIEW_PARAMS = (
    "flip_horizontal",
    "flip_vertical",
    "rotate_90",
    "rotation_degrees",
    "zoom",
    "brightness",
    "contrast",
)
"""The augment params that shape fine-tuning's per-epoch views (the others, such as augment's
own seed and view count, concern only the materialised set of the frozen phase)."""


class AveragedWeights(keras.callbacks.SwapEMAWeights):
    """Validation and the epoch's checkpoint see the optimizer's moving average of the
    weights; training goes on from the trained weights. Between ``on_epoch_end`` and the next
    ``on_epoch_begin`` the model holds the average and the optimizer the trained weights, and
    that is how checkpoints store them: a run ``resumed`` from one starts in that state."""

    def __init__(self, resumed: bool) -> None:
        super().__init__(swap_on_epoch=True)
        self._ema_weights_in_model = resumed


class ResumableCheckpoint(keras.callbacks.Callback):
    """A checkpoint each epoch plus, with a ``patience``, early stopping on ``monitor``
    (``val_loss``: lower is better, ``val_accuracy``: higher is better), both resumable: the
    epoch's model (with optimizer state), the kept model and the stopping state survive the
    process. Without a patience every epoch runs and the last one is kept.

    Order makes it crash-safe: the epoch's model is written first, then ``state.json`` (one
    atomic rename) points to it, then older files go. A kill at any point leaves a state that
    names files which exist. In a multi-worker job every worker keeps the same state (the
    monitored value is the job's, read across workers by ``fit_multi_worker``, so all stop
    together) but only the chief writes (``write``), into the folder all of them resume from.
    """

    def __init__(
        self,
        directory: Path,
        key: str,
        monitor: str,
        patience: int | None,
        state: dict[str, Any],
        write: bool = True,
    ) -> None:
        super().__init__()
        self.directory, self.key, self.patience, self.write = directory, key, patience, write
        self.monitor = monitor
        self.sign = 1.0 if monitor.endswith("loss") else -1.0  # minimise sign * value
        self.best = state.get("best", math.inf)
        self.wait = state.get("wait", 0)
        self.best_file = state.get("best_checkpoint")
        self.rows: list[dict[str, Any]] = state.get("history", [])

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = self.sign * float((logs or {}).get(self.monitor, self.sign * math.inf))
        last = f"epoch-{epoch:03d}.keras"
        if self.patience is None or value < self.best:
            self.best, self.wait, self.best_file = value, 0, last
        else:
            self.wait += 1
        stop = self.patience is not None and self.wait >= self.patience
        if stop:
            self.model.stop_training = True
        if not self.write:
            return
        with atomic_path(self.directory / last) as tmp:
            self.model.save(tmp)
        write_json_atomic(
            self.directory / STATE,
            {
                "fingerprint": self.key,
                "epoch": epoch,
                "checkpoint": last,
                "best_checkpoint": self.best_file,
                "best": self.best,
                "wait": self.wait,
                "stopped_early": stop,
                "history": self.rows,
            },
        )
        for old in self.directory.glob("epoch-*.keras"):
            if old.name not in (last, self.best_file):
                old.unlink()


def _load_state(directory: Path, key: str, write: bool = True) -> dict[str, Any]:
    """The resumable state in ``directory`` if it matches ``key``; else none, and (when this
    process ``write``s) the folder emptied."""
    state_file = directory / STATE
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        if state.get("fingerprint") == key and (directory / state["checkpoint"]).is_file():
            return state
        log.info(
            "finetune: checkpoints in %s are for other inputs or params; starting over", directory
        )
    if write:
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
    return {}


def prepare(
    frozen_model: Path,
    model_params: ModelParams,
    params: FinetuneParams,
    steps_per_epoch: int,
    learning_rate: float,
    policy: str = FLOAT32,
) -> tuple[keras.Model, int]:
    """The frozen-phase model with its top ``unfreeze_layers`` unfrozen, compiled for
    fine-tuning in ``policy`` (mixed precision: the head stays float32 and the loss is scaled
    dynamically): Adam on ``schedule``'s rate, averaging the weights when ``ema_momentum`` is
    set. Returns it and the trainable base layers."""
    model = keras.models.load_model(frozen_model, compile=False)
    trainable = unfreeze_top(model, model_params.backbone, params.unfreeze_layers)
    set_precision(model, policy, keep_float32=HEAD_NAME)
    averaged = params.ema_momentum is not None
    optimizer = keras.optimizers.Adam(
        schedule(params, steps_per_epoch, learning_rate),
        use_ema=averaged,
        ema_momentum=params.ema_momentum if averaged else 0.99,
    )
    if policy == MIXED:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(
        optimizer=optimizer,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model, trainable


def schedule(
    params: FinetuneParams, steps_per_epoch: int, learning_rate: float
) -> keras.optimizers.schedules.LearningRateSchedule:
    """A linear warm-up from 0 to ``learning_rate`` over ``warmup_epochs``, then a cosine decay
    to ``learning_rate * final_lr_fraction`` at the end of the last epoch."""
    total = max(1, params.epochs * steps_per_epoch)
    warmup = min(total - 1, round(params.warmup_epochs * steps_per_epoch))
    return keras.optimizers.schedules.CosineDecay(
        0.0 if warmup else learning_rate,
        decay_steps=total - warmup,
        alpha=params.final_lr_fraction,
        warmup_target=learning_rate if warmup else None,
        warmup_steps=warmup,
    )


def run(
    *,
    trained: Path,
    dataset: Path,
    frozen_history: Path,
    out: Path,
    summary: Path,
    history: Path,
    checkpoints: Path,
    model: ModelParams,
    finetune: FinetuneParams,
    augment: AugmentParams,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune the ``trained`` frozen-phase model on fresh views (``augment``'s transforms)
    of ``dataset``'s train split each epoch, validated on its val split. ``out`` receives
    model.keras (the kept epoch, its output layer carrying the prior correction and the
    temperature fitted on validation when set) and curves.png (both phases); ``checkpoints``
    holds epoch-NNN.keras and state.json, kept across runs (DVC ``persist``): a rerun with the
    same inputs and params resumes from them."""
    model_params, params, views = model, finetune, augment
    distribution = strategy()  # first: a multi-worker strategy must precede every other TF op
    chief = is_chief()
    replicas = distribution.num_replicas_in_sync
    policy = precision(params.mixed_precision)
    size = backbones.image_size(model_params)
    train_files = split_files(dataset / SHARDS, "train")
    val_files = split_files(dataset / SHARDS, "val")
    batch_size, learning_rate = scaled(params.batch_size, params.learning_rate, replicas)
    key = fingerprint(trained, train_files, model_params, params, views, replicas, policy)
    state = _load_state(checkpoints, key, write=chief)
    frozen_rows = read_history(frozen_history)
    offset = int(max((r["step"] for r in frozen_rows), default=-1)) + 1

    keras.utils.set_random_seed(params.seed)
    deterministic()
    n_train, n_val = count_records(train_files), count_records(val_files)
    steps = math.ceil(n_train / batch_size)
    with distribution.scope():
        if state:
            initial_epoch = int(state["epoch"]) + 1
            log.info("finetune: resuming after epoch %d from %s", initial_epoch - 1, checkpoints)
            network = keras.models.load_model(checkpoints / state["checkpoint"])
            trainable = sum(
                int(layer.trainable and bool(layer.weights))
                for layer in backbones.inner_base(base_of(network)).layers
            )
        else:
            initial_epoch = 0
            network, trainable = prepare(
                trained, model_params, params, steps, learning_rate, policy
            )

    checkpoint = ResumableCheckpoint(
        checkpoints, key, params.monitor, params.early_stopping_patience, state, write=chief
    )
    logger = EpochLogger("finetune", offset, params.epochs, checkpoint.rows, progress, steps)
    # First: validation, the logger and the checkpoint all see the averaged weights.
    callbacks: list[keras.callbacks.Callback] = [logger, checkpoint]
    if params.ema_momentum is not None:
        callbacks.insert(0, AveragedWeights(resumed=bool(state)))
    started = time.perf_counter()
    if initial_epoch < params.epochs and not state.get("stopped_early"):
        train_batches = image_dataset(
            train_files,
            size,
            batch_size,
            shuffle_seed=params.seed,
            epochs=params.epochs,
            first_epoch=initial_epoch,
            count=n_train,
            views=views,
        )
        val_batches = image_dataset(val_files, size, batch_size, count=n_val)
        try:
            if cluster() is None:
                network.fit(
                    train_batches,
                    steps_per_epoch=steps,
                    validation_data=val_batches,
                    epochs=params.epochs,
                    initial_epoch=initial_epoch,
                    callbacks=callbacks,
                    shuffle=False,  # the dataset shuffles itself, seeded
                    verbose=0,
                )
            else:
                fit_multi_worker(
                    network,
                    distribution,
                    train_batches,
                    val_batches,
                    steps,
                    range(initial_epoch, params.epochs),
                    callbacks,
                )
        except Exception as error:
            lost_worker(error, checkpoints, len(checkpoint.rows))
            raise
    seconds = time.perf_counter() - started
    rows = checkpoint.rows
    if not chief:  # the chief saves the model and reports; a worker's part ends with training
        return {"finetune": {"epochs": len(rows), "replicas": replicas, "precision": policy}}

    if checkpoint.best_file is None:
        raise RuntimeError(f"finetune: no epoch was checkpointed in {checkpoints}")
    # The served model needs no optimizer state: load without it, compile for evaluation only.
    best = keras.models.load_model(checkpoints / checkpoint.best_file, compile=False)
    set_precision(best, FLOAT32, keep_float32=HEAD_NAME)  # what export and serving expect
    head = best.get_layer(HEAD_NAME)
    output = head.get_layer("probabilities")
    # The probabilities and the output layer's inputs of every validation image, in one pass.
    probe = keras.Model(best.inputs, [best.outputs[0], best.get_layer("gap").output])
    to_output = keras.Model(head.inputs, output.input)
    val_true, val_probs, val_features = [], [], []
    for images, labels in image_dataset(val_files, size, 64):
        batch_probs, pooled = probe.predict_on_batch(images)
        val_true.append(labels.numpy())
        val_probs.append(batch_probs)
        val_features.append(to_output.predict_on_batch(pooled))
    val_labels, probs = np.concatenate(val_true), np.concatenate(val_probs)
    scores = validation_scores(val_labels, probs)
    fitted = fit_output(
        output,
        val_labels,
        probs,
        np.concatenate(val_features),
        train_class_counts(dataset, probs.shape[1]),
        params.prior_balance,
        params.calibrate,
    )
    with atomic_path(out) as staged:
        staged.mkdir()
        best.save(staged / MODEL)
        write_json_atomic(staged / TEMPERATURE, {"temperature": fitted["temperature"]})
        plot_curves(
            [*frozen_rows, *rows],
            staged / CURVES,
            f"{model_params.backbone} {size}px: frozen phase, then fine-tuning",
        )
    write_history(history, rows)
    epochs_run = len(rows) - sum(1 for r in rows if r["epoch"] < initial_epoch)
    metrics = {
        "finetune": {
            **{name: round(value, 6) for name, value in scores.items()},
            **fitted,
            "epochs": len(rows),
            "best_epoch": kept_epoch(rows, params),
            "averaged_weights": params.ema_momentum is not None,
            "resumed_from_epoch": initial_epoch,
            "trainable_base_layers": trainable,
            "replicas": replicas,
            "precision": policy,
            "seconds": round(seconds, 2),
            "images_per_second": round(epochs_run * steps * batch_size / seconds, 1)
            if epochs_run and seconds
            else None,
        }
    }
    write_json_atomic(summary, metrics)
    return metrics


def fit_multi_worker(
    model: keras.Model,
    distribution: Any,
    train: Any,
    validation: Any,
    steps: int,
    epochs: range,
    callbacks: list[keras.callbacks.Callback],
) -> None:
    """``fit``'s epoch loop under MultiWorkerMirroredStrategy, which Keras 3's own ``fit``
    does not run (it averages scalar logs along an axis: keras-team/keras#20585). Each step is
    the model's own ``train_step`` (``test_step`` for validation) run on every replica, so the
    math is fit's. The logs are the metrics read afterwards, outside the replicas: their
    variables are summed across every replica of every worker on reading, so each worker sees
    the job's figures (not its own slice) and all of them stop early at the same epoch."""
    import tensorflow as tf

    @tf.function
    def train_step(iterator: Any) -> None:
        distribution.run(model.train_step, args=(next(iterator),))

    @tf.function
    def test_step(batch: Any) -> None:
        distribution.run(model.test_step, args=(batch,))

    def results(prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in model.get_metrics_result().items()}

    hooks = keras.callbacks.CallbackList(callbacks, model=model, epochs=epochs.stop, steps=steps)
    batches = iter(distribution.experimental_distribute_dataset(train))
    model.stop_training = False
    hooks.on_train_begin()
    for epoch in epochs:
        model.reset_metrics()
        hooks.on_epoch_begin(epoch)
        for step in range(steps):
            hooks.on_train_batch_begin(step)
            train_step(batches)
            hooks.on_train_batch_end(step)
        logs = results()
        model.reset_metrics()
        hooks.on_test_begin()
        for batch in distribution.experimental_distribute_dataset(validation):
            test_step(batch)
        hooks.on_test_end()
        hooks.on_epoch_end(epoch, logs | results("val_"))
        if model.stop_training:
            break
    hooks.on_train_end()


def lost_worker(error: Exception, checkpoints: Path, epoch: int) -> None:
    """In a multi-worker job, turn the error a dead or unreachable peer causes (a collective
    or the coordination service failing) into one that says so and how to continue."""
    import tensorflow as tf

    peer_errors = (
        tf.errors.UnavailableError,
        tf.errors.DeadlineExceededError,
        tf.errors.AbortedError,
        tf.errors.CancelledError,
        tf.errors.InternalError,
    )
    if cluster() is not None and isinstance(error, peer_errors):
        raise RuntimeError(
            f"finetune: the multi-worker job lost a worker during epoch {epoch} "
            f"({type(error).__name__}: {str(error).splitlines()[0][:300]}); "
            f"rerun the job: it resumes from the last checkpoint in {checkpoints}"
        ) from error


def train_class_counts(dataset: Path, classes: int) -> np.ndarray:
    """Images per class index in the training split of ingest's manifest (the prior a
    prior correction divides out)."""
    with open(dataset / MANIFEST, newline="", encoding="utf-8") as handle:
        indices = [
            int(row["label_index"]) for row in csv.DictReader(handle) if row["split"] == "train"
        ]
    return np.bincount(np.asarray(indices, np.int64), minlength=classes)


def kept_epoch(rows: list[dict[str, Any]], params: FinetuneParams) -> int:
    """The epoch ResumableCheckpoint keeps: the last one, or with early stopping the first with
    the best ``monitor`` value."""
    if not rows:
        return -1
    if params.early_stopping_patience is None:
        return int(rows[-1]["epoch"])
    values = [r[params.monitor] for r in rows]
    return int(
        rows[int(np.argmin(values) if params.monitor.endswith("loss") else np.argmax(values))][
            "epoch"
        ]
    )


def metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The fine-tuning phase's final figures, for MLflow."""
    tuned = summary["finetune"]
    return {
        f"finetune.{k}": v
        for k, v in tuned.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def log_to_mlflow(out: Path, history: Path, dataset: Path, model: ModelParams) -> None:
    """Final metrics, the curves of both phases and the model with its signature (inferred
    from two validation images)."""
    import mlflow
    from mlflow.models import infer_signature

    mlflow.set_tag("backbone", model.backbone)
    mlflow.log_artifact(str(out / CURVES), "finetune")
    mlflow.log_artifact(str(history), "finetune")
    val = split_files(dataset / SHARDS, "val")
    example = next(iter(image_dataset(val, backbones.image_size(model), 2)))[0].numpy()
    network = keras.models.load_model(out / MODEL)
    signature = infer_signature(example, network.predict(example, verbose=0))
    mlflow.tensorflow.log_model(
        network,
        name="model",
        signature=signature,
        input_example=example,
        pip_requirements=[f"tensorflow=={_version('tensorflow')}", f"keras=={keras.__version__}"],
    )


def describe(summary: dict[str, Any]) -> str:
    result = summary["finetune"]
    if "val_accuracy" not in result:  # a non-chief worker of a multi-worker job
        return f"{result['epochs']} epochs trained as a worker; the chief writes the model"
    corrected = correction_text(result)
    corrected = f"; prior-corrected val accuracy {corrected}" if corrected else ""
    return (
        f"val accuracy {result['val_accuracy']:.4f} after {result['epochs']} epochs "
        f"({result['trainable_base_layers']} base layers trained){corrected}; model: {MODEL}"
    )


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
