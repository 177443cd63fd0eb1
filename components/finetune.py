"""finetune: unfreeze the top of the base and train the whole classifier at a low learning rate.

The recipe is built not to depend on luck:

- every epoch sees a fresh random view of each training image (imgpipe.data.augmentation), drawn
  from the seed, the epoch and the image, instead of the few views augment materialised once;
- the learning rate warms up linearly from 0 (the first steps would otherwise undo the head
  trained in the frozen phase), then follows a cosine decay;
- the weights validated, checkpointed and kept are an exponential moving average of the trained
  ones (Keras' optimizer EMA), and by default the whole schedule runs and its last averaged
  weights are kept: no early stop decided by a few images of a small validation set;
- TensorFlow's op determinism is on: the same seed on the same machine gives the same model.

BatchNormalization layers stay frozen and in inference mode (their statistics would be ruined by
small batches). After every epoch the model, with its optimizer state, is checkpointed together
with the stopping state (imgpipe.model.checkpoints), so a run killed at any moment (even ``kill -9``
mid-epoch) continues from the last finished epoch when rerun with the same inputs and params,
instead of starting over. Several workers run fit's epoch loop of imgpipe.model.distribute. After
training, the decision (a prior correction, or an ordinal head's cut-points) and a temperature
fitted on validation are folded into the output layer (imgpipe.evaluation.calibration).

The production run (``finetune.train_on``) trains on every non-test image, train and val, with
the same fixed schedule; having no held-out image of its own, it folds in the decision and
temperature that ``imgpipe crossval --apply`` fitted on out-of-fold predictions of those same
images under the same recipe (``finetune.decision``, checked by ``training_digest``).
"""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from imgpipe.core.errors import InputError
from imgpipe.core.fileio import atomic_path, write_json_atomic
from imgpipe.core.params import (
    PER_EPOCH,
    AugmentParams,
    FinetuneParams,
    ModelParams,
    TrainParams,
)
from imgpipe.data.datasets import image_dataset
from imgpipe.data.labels import read_labels
from imgpipe.data.lineage import TRAINING_SPLITS, manifest_labels, training_digest
from imgpipe.data.manifest import LABELS, MANIFEST, SHARDS, read_manifest
from imgpipe.data.tfrecords import count_records, split_files
from imgpipe.evaluation.calibration import Decision, fit_output, fold_fitted
from imgpipe.evaluation.metrics import correction_text, validation_scores
from imgpipe.model import backbones
from imgpipe.model.checkpoints import (
    AveragedWeights,
    ResumableCheckpoint,
    fingerprint,
    kept_epoch,
    load_state,
)
from imgpipe.model.distribute import (
    FLOAT32,
    MIXED,
    cluster,
    fit_multi_worker,
    is_chief,
    lost_worker,
    precision,
    scaled,
    set_precision,
    strategy,
)
from imgpipe.model.training import (
    CURVES,
    DECISION,
    HEAD_NAME,
    MODEL,
    POOLED_LAYER,
    EpochLogger,
    base_of,
    deterministic,
    plot_curves,
    read_history,
    require_quantizable,
    write_history,
)

log = logging.getLogger(__name__)

VAL_PREDICTIONS = "val_predictions.csv"
"""Beside the model: the network's own probabilities (before any fitted decision or
temperature) of every validation image, by sha256: a cross-validation fold's out-of-fold
predictions (``imgpipe crossval``)."""


HELD_OUT, ALL_NON_TEST = "train", "train+val"
"""What trains the model (``finetune.train_on``, resolved by ``training_images``)."""


def training_images(
    dataset: Path, params: FinetuneParams, recipe: dict[str, Any], head: str
) -> tuple[str, str]:
    """What trains the model, and why: ``ALL_NON_TEST`` when ``params.train_on`` allows it and
    ``params.decision`` was fitted out-of-fold on ``dataset``'s non-test images under
    ``recipe`` (the typed model, augment, train and finetune sections); else ``HELD_OUT``. An
    explicit ``train+val`` that cannot be had is an error that says what to do."""
    if params.train_on == HELD_OUT:
        return HELD_OUT, "finetune.train_on: train"
    fitted = params.decision
    images = manifest_labels(dataset / MANIFEST, TRAINING_SPLITS)
    problem = ""
    if fitted is None:
        problem = "finetune.decision is null: no decision was fitted out-of-fold yet"
    elif params.early_stopping_patience is not None:
        problem = "early stopping needs held-out images"
    elif fitted.fitted_on != training_digest(images, recipe):
        problem = (
            f"finetune.decision ({fitted.source}) was fitted on other images or under another "
            f"recipe than these {len(images)} non-test images and params"
        )
    elif head == "ordinal" and fitted.tau is not None:
        problem = "an ordinal head takes no out-of-fold prior correction"
    if not problem:
        assert fitted is not None
        return ALL_NON_TEST, f"all {len(images)} non-test images; decision from {fitted.source}"
    if params.train_on == ALL_NON_TEST:
        raise InputError(
            f"finetune.train_on is train+val, but {problem}. Fit it on this data and recipe "
            "with `imgpipe crossval --folds K --apply`, or set finetune.train_on: train"
        )
    return HELD_OUT, f"val held out ({problem})"


def write_val_predictions(
    path: Path, dataset: Path, sha256: list[str], labels: np.ndarray, probs: np.ndarray
) -> None:
    """``probs`` of ``dataset``'s validation images (``sha256`` and ``labels``: each image's,
    in the order predicted) as CSV: sha256, label, one probability column per class."""
    names = read_labels(dataset / LABELS)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["sha256", "label", *(f"p_{name}" for name in names)])
        for digest, label, row in zip(sha256, labels, probs, strict=True):
            writer.writerow([digest, names[label], *(f"{p:.6f}" for p in row)])


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
    train: TrainParams,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune the ``trained`` frozen-phase model on fresh views (``augment``'s transforms)
    of ``dataset``'s train split each epoch, validated on its val split (or, as
    ``training_images`` decides, of train and val with the out-of-fold decision). ``out`` receives
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
    recipe = {"model": model_params, "augment": views, "train": train, "finetune": params}
    trained_on, why = training_images(dataset, params, recipe, train.head)
    log.info("finetune: trains on %s: %s", trained_on, why)
    held_out = trained_on == HELD_OUT
    val_files = split_files(dataset / SHARDS, "val")
    train_files = split_files(dataset / SHARDS, "train") + ([] if held_out else val_files)
    if not held_out:
        val_files = []  # seen in training: no validation figure is computed on them
    batch_size, learning_rate = scaled(params.batch_size, params.learning_rate, replicas)
    key = fingerprint(trained, train_files, model_params, params, views, replicas, policy)
    state = load_state(checkpoints, key, write=chief)
    frozen_rows = read_history(frozen_history)
    offset = int(max((r["step"] for r in frozen_rows), default=-1)) + 1

    keras.utils.set_random_seed(params.seed)
    deterministic()
    n_train, n_val = count_records(train_files), count_records(val_files)
    classes = len(read_labels(dataset / LABELS))
    # augment.balance_classes: per_epoch: each epoch a class-balanced draw, the
    # quantization-aware epochs' too (else their natural order pulls the head back to the prior)
    balanced = classes if views.balance_classes == PER_EPOCH else None
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

    if params.quantization_aware_epochs:  # before the schedule, not after it
        require_quantizable(network, model_params)
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
            balanced=balanced,
        )
        val_batches = image_dataset(val_files, size, batch_size, count=n_val) if n_val else None
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
    quantized: dict[str, Any] = {}
    quantize_rows: list[dict[str, Any]] = []
    if params.quantization_aware_epochs:
        best, quantized = quantization_aware_phase(
            best,
            model_params,
            params,
            views,
            train_files,
            val_files,
            (size, batch_size, steps, n_train, n_val),
            learning_rate * params.final_lr_fraction,
            (offset + len(rows), quantize_rows, progress),
            balanced=balanced,
        )
    output = best.get_layer(HEAD_NAME).get_layer("probabilities")
    if held_out:
        scores, fitted, decision, predictions = fit_on_validation(
            best, dataset, val_files, size, params
        )
        fitted_on = "val"
    else:
        assert params.decision is not None
        fitted_on = f"out-of-fold: {params.decision.source}"
        temperature = params.decision.temperature if params.calibrate else 1.0
        tau = params.decision.tau
        decision = fold_fitted(
            output, temperature, tau, class_counts(dataset, classes, TRAINING_SPLITS)
        )
        scores, predictions = {}, None
        fitted = {"temperature": temperature, **({"prior_tau": tau} if tau is not None else {})}
    if params.quantization_aware_epochs:  # the output layer changed: measure its range again
        remeasure(best, train_files, size, batch_size, params.seed)
    with atomic_path(out) as staged:
        staged.mkdir()
        best.save(staged / MODEL)
        write_json_atomic(
            staged / DECISION,
            {
                "objective": params.objective,
                **decision,
                "fitted_on": fitted_on,
            },
        )
        if predictions is not None:
            write_val_predictions(staged / VAL_PREDICTIONS, dataset, *predictions)
        plot_curves(
            [*frozen_rows, *rows, *quantize_rows],
            staged / CURVES,
            f"{model_params.backbone} {size}px: frozen phase, then fine-tuning",
        )
    write_history(history, [*rows, *quantize_rows])
    epochs_run = len(rows) - sum(1 for r in rows if r["epoch"] < initial_epoch)
    metrics = {
        "finetune": {
            **{name: round(value, 6) for name, value in scores.items()},
            "trained_on": trained_on,
            "training_images": n_train,
            "objective": params.objective,
            **fitted,
            **quantized,
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


def fit_on_validation(
    model: keras.Model, dataset: Path, val_files: list[str], size: int, params: FinetuneParams
) -> tuple[dict[str, float], dict[str, Any], Decision, tuple[list[str], np.ndarray, np.ndarray]]:
    """Fit the decision and temperature on the held-out val split and fold them into ``model``'s
    output layer. Returns the validation figures (the network's own), the fitted figures, the
    decision, and the validation predictions (sha256s, labels, probabilities)."""
    head = model.get_layer(HEAD_NAME)
    output = head.get_layer("probabilities")
    # The probabilities and the output layer's inputs of every validation image, in one pass.
    probe = keras.Model(model.inputs, [model.outputs[0], model.get_layer(POOLED_LAYER).output])
    to_output = keras.Model(head.inputs, output.input)
    val_true, val_probs, val_features, val_ids = [], [], [], []
    for images, labels, digests in image_dataset(val_files, size, 64, with_ids=True):
        batch_probs, pooled = probe.predict_on_batch(images)
        val_true.append(labels.numpy())
        val_probs.append(batch_probs)
        val_features.append(to_output.predict_on_batch(pooled))
        val_ids += [d.decode() for d in digests.numpy()]
    val_labels, probs = np.concatenate(val_true), np.concatenate(val_probs)
    scores = validation_scores(val_labels, probs)
    fitted, decision = fit_output(
        output,
        val_labels,
        probs,
        np.concatenate(val_features),
        class_counts(dataset, probs.shape[1]),
        params.balance,
        params.calibrate,
    )
    return scores, fitted, decision, (val_ids, val_labels, probs)


RANGE_BATCHES = 16
"""Training batches whose activations set the quantized model's ranges before its first step
and after the output layer is refitted (a measurement, not a tunable: 512 images at the
default batch size)."""


def quantization_aware_phase(
    model: keras.Model,
    model_params: ModelParams,
    params: FinetuneParams,
    views: AugmentParams,
    train_files: list[str],
    val_files: list[str],
    shape: tuple[int, int, int, int, int],
    learning_rate: float,
    logged: tuple[int, list[dict[str, Any]], Any],
    teacher: keras.Model | None = None,
    balanced: int | None = None,
) -> tuple[keras.Model, dict[str, Any]]:
    """Quantization-aware fine-tuning (imgpipe.model.quantization): ``model`` folded into the form
    that computes what the full-integer TFLite model will, its ranges measured on training
    images, then ``params.quantization_aware_epochs`` more epochs of fresh views at the
    schedule's final rate, so the weights settle where int8 rounding leaves the decisions
    alone. Returns the quantized model and its figures (validation accuracy of the float
    model, of the quantized one before and after these epochs; none without ``val_files``).
    With a ``teacher`` (a distilled student's: imgpipe.model.distill), the epochs learn the
    teacher's probabilities of each view instead of its label; the teacher trained on every
    non-test image, so none is held out. ``logged``: the first epoch's number in the history,
    the history's rows to append to, and the progress bar (an EpochLogger's). ``balanced``:
    each epoch a class-balanced draw over that many classes, as fine-tuning's
    (``image_dataset``)."""
    from imgpipe.model import distill, quantization
    from imgpipe.model.training import quantization_aware

    size, batch_size, steps, n_train, n_val = shape
    if teacher is not None and val_files:
        raise ValueError("a teacher's student holds no image out: val_files must be empty")
    started = time.perf_counter()
    first_epoch, rows, progress = logged
    epochs = params.quantization_aware_epochs
    logger = EpochLogger("quantize", first_epoch, epochs, rows, progress, steps)
    val_batches = image_dataset(val_files, size, batch_size, count=n_val) if n_val else None

    def accuracy(network: keras.Model) -> float:
        if val_batches is None:
            return math.nan
        return float(network.evaluate(val_batches, verbose=0, return_dict=True)["accuracy"])

    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    float_accuracy = accuracy(model)
    quantized = quantization_aware(model, model_params)
    remeasure(quantized, train_files, size, batch_size, params.seed)
    quantized.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy" if teacher is None else distill.LOSS,
        metrics=["accuracy"],
    )
    start_accuracy = accuracy(quantized)
    batches = image_dataset(
        train_files,
        size,
        batch_size,
        shuffle_seed=params.seed,
        epochs=params.epochs + epochs,
        first_epoch=params.epochs,  # views no fine-tuning epoch drew
        count=n_train,
        views=views,
        balanced=balanced,
    )
    quantized.fit(
        batches if teacher is None else distill.soft_targets(batches, teacher),
        steps_per_epoch=steps,
        validation_data=val_batches,
        epochs=epochs,
        callbacks=[logger],
        shuffle=False,
        verbose=0,
    )
    quantization.refresh_bounds(quantized)
    if val_batches is None:  # every non-test image trained: none is left to score
        log.info("finetune: quantization-aware, %d epoch(s) on every non-test image", epochs)
    else:
        log.info(
            "finetune: quantization-aware, val accuracy float %.4f, quantized %.4f -> %.4f",
            float_accuracy,
            start_accuracy,
            logger.rows[-1].get("val_accuracy", float("nan")),
        )
    figures = {"float_val_accuracy": float_accuracy, "quantized_start_val_accuracy": start_accuracy}
    return quantized, {
        "quantization_aware_epochs": epochs,
        **{name: round(value, 6) for name, value in figures.items() if not math.isnan(value)},
        "quantization_aware_seconds": round(time.perf_counter() - started, 2),
    }


def remeasure(model: keras.Model, train_files: list[str], size: int, batch: int, seed: int) -> None:
    """Measure every rounded kernel and every tracked activation range of a quantized model
    again, the ranges on ``RANGE_BATCHES`` shuffled training batches in inference mode."""
    from imgpipe.model import quantization

    batches = image_dataset(train_files, size, batch, shuffle_seed=seed).take(RANGE_BATCHES)
    quantization.measure(model, (images for images, _ in batches))


def class_counts(dataset: Path, classes: int, splits: tuple[str, ...] = (HELD_OUT,)) -> np.ndarray:
    """Images per class index in ``splits`` of ingest's manifest, the images that trained the
    model (the prior a prior correction divides out)."""
    indices = [int(row["label_index"]) for row in read_manifest(dataset / MANIFEST, splits)]
    return np.bincount(np.asarray(indices, np.int64), minlength=classes)


def metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The fine-tuning phase's final figures, for MLflow."""
    tuned = summary["finetune"]
    return {
        f"finetune.{k}": v
        for k, v in tuned.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def log_to_mlflow(out: Path, history: Path, model: ModelParams) -> None:
    """Final metrics, the curves of both phases and the model with its signature: a batch of
    float32 RGB images at the model's size (0-255, preprocessing inside) in, float32 class
    probabilities out. No input example: for images it is a megabyte of float pixels as JSON,
    which MLflow then reloads the model to try (4 s a run); the signature says what goes in."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    mlflow.set_tag("backbone", model.backbone)
    mlflow.log_artifact(str(out / CURVES), "finetune")
    mlflow.log_artifact(str(history), "finetune")
    network = keras.models.load_model(out / MODEL)
    size = backbones.image_size(model)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, size, size, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, network.output_shape[-1]))]),
    )
    mlflow.tensorflow.log_model(
        network,
        name="model",
        signature=signature,
        pip_requirements=[f"tensorflow=={_version('tensorflow')}", f"keras=={keras.__version__}"],
    )


def describe(summary: dict[str, Any]) -> str:
    result = summary["finetune"]
    if "trained_on" not in result:  # a non-chief worker of a multi-worker job
        return f"{result['epochs']} epochs trained as a worker; the chief writes the model"
    if result["trained_on"] == ALL_NON_TEST:
        return (
            f"trained on all {result['training_images']} non-test images for {result['epochs']} "
            f"epochs ({result['trainable_base_layers']} base layers trained), the decision "
            f"fitted out-of-fold, temperature {result['temperature']:.3f}; model: {MODEL}"
        )
    corrected = correction_text(result)
    corrected = f"; prior-corrected val accuracy {corrected}" if corrected else ""
    return (
        f"val accuracy {result['val_accuracy']:.4f} after {result['epochs']} epochs "
        f"({result['trainable_base_layers']} base layers trained){corrected}; model: {MODEL}"
    )


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
