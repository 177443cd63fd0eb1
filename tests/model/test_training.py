"""The training stages on a tiny, learnable data set: the frozen phase (train) and fine-tuning
(finetune), with the real offline Lite0 ImageNet weights at 64 px.

One module-scoped fixture runs ingest -> augment -> train once (in-process, about 15 s); the
tests then fine-tune from its model in-process, through the ``imgpipe finetune`` CLI (killed with
SIGKILL and rerun), and check that training the head on cached features is the same math as
training the frozen model end to end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import PROJECT, TinyProject, build_tiny_project, class_pattern, params, read_csv_rows

from imgpipe.core.params import load_params

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
IMAGE_SIZE = 64
CLASSES = {"a": 24, "b": 24, "c": 24}  # ingest 25% val, 10% test: 16 train, 6 val per class
MODEL = {"backbone": "efficientnet_lite0", "weights": "imagenet", "image_size": IMAGE_SIZE}
TRAIN = {"seed": 42, "batch_size": 16, "epochs": 3, "learning_rate": 0.001}
FINETUNE = {
    "seed": 42,
    "batch_size": 16,
    "epochs": 2,
    "learning_rate": 0.0001,
    "unfreeze_layers": 20,
    "early_stopping_patience": 5,
    "quantization_aware_epochs": 0,  # the float schedule; its quantized epoch has a test of its own
}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> TinyProject:
    """ingest -> augment (1 view per image) -> train (3 epochs, frozen base) on 3 classes of
    64x64 class-pattern PNGs (different stripes and tints), with Lite0's ImageNet weights."""
    p = build_tiny_project(
        tmp_path_factory.mktemp("training"),
        CLASSES,
        IMAGE_SIZE,
        MODEL,
        TRAIN,
        val_fraction=0.25,
        test_fraction=0.1,
    )
    raw = load_params(PROJECT / "params.yaml")
    for name, overrides in (("model", MODEL), ("train", TRAIN), ("finetune", FINETUNE)):
        raw[name] = {**raw[name], **overrides}
    (p.root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def _finetune(
    project: TinyProject,
    out: Path,
    model: Any,
    tuning: Any,
    dataset: Path | None = None,
    augment: Any = None,
) -> dict:
    """The finetune stage on ``project``'s frozen model (and ``dataset``, else its ingest
    output; ``augment``, else the default augment params), writing under ``out``; its
    summary."""
    from components import finetune

    return finetune.run(
        trained=project.model,
        dataset=dataset or project.ingest,
        frozen_history=project.train_history,
        out=out / "finetune",
        summary=out / "finetune.json",
        history=out / "finetune_history.csv",
        checkpoints=out / "checkpoints",
        model=model,
        finetune=tuning,
        augment=augment or params("augment"),
        train=params("train", **TRAIN),
        progress=False,
    )["finetune"]


def _assert_reports_best_epoch(metrics: dict, history: Path, monitor: str = "val_loss") -> None:
    """The stage's model is its best epoch (the first with the lowest val_loss or highest
    val_accuracy), and its metrics say so."""
    values = [float(r[monitor]) for r in read_csv_rows(history)]
    best = int(np.argmin(values) if monitor == "val_loss" else np.argmax(values))
    assert metrics["best_epoch"] == best, (metrics, values)
    assert metrics[monitor] == pytest.approx(values[best], rel=2e-3, abs=2e-6), (metrics, values)


def _weights_by_layer(model) -> dict[str, list[np.ndarray]]:
    """Every layer of the classifier's base, by name, with all its variables (BatchNorm moving
    mean and variance included)."""
    from imgpipe.model import backbones
    from imgpipe.model.training import base_of

    inner = backbones.inner_base(base_of(model))
    return {layer.name: [np.asarray(v) for v in layer.weights] for layer in inner.layers}


def test_learns_and_finetune_changes_only_the_unfrozen_layers(project, tmp_path):
    """A learnable signal: frozen-phase and fine-tuned val accuracy both >= 0.8 on 3 classes
    (chance 1/3; 18 val images). Fine-tuning changes only what it unfroze: every base layer
    that was not trainable, and every BatchNormalization layer (weights and moving statistics),
    is bit-identical between outputs/train/model.keras and outputs/finetune/model.keras, while
    at least one unfrozen layer changed.

    The prior correction (``finetune.objective`` a weight of balanced accuracy) is fitted
    without the test split: its shards are deleted from the copy of ingest's output that
    finetune reads. The saved model's output bias is the best epoch's plus tau * log(training
    prior) (on these balanced classes that offset shifts every logit alike, so tau is 0;
    tests/code/test_metrics.py fits non-zero ones), and decision.json says what was folded in.

    It fine-tunes in mixed precision, forced on this CPU: the epochs ran with the base in
    float16 and the head in float32 under dynamic loss scaling (the checkpoints record it),
    and the saved model, the one export reads, is float32 in every layer and output."""
    import shutil

    import keras

    from components import finetune
    from imgpipe.data.manifest import SHARDS
    from imgpipe.data.tfrecords import split_files
    from imgpipe.model import backbones
    from imgpipe.model.training import HEAD_NAME, base_of

    frozen = json.loads(project.train_metrics.read_text())["frozen"]
    assert frozen["val_accuracy"] >= 0.8, frozen
    assert frozen["epochs"] == TRAIN["epochs"]
    assert frozen["train_images"] == 2 * 16 * len(CLASSES)  # 16 per class, each plus one view
    _assert_reports_best_epoch(frozen, project.train_history)

    history = tmp_path / "finetune_history.csv"
    sealed = shutil.copytree(project.ingest, tmp_path / "ingest")
    for shard in split_files(sealed / SHARDS, "test"):
        Path(shard).unlink()
    tuning = params("finetune", **FINETUNE, mixed_precision=True, objective=0.5)
    assert tuning.balance == 0.5
    metrics = _finetune(project, tmp_path, params("model", **MODEL), tuning, dataset=sealed)
    assert metrics["precision"] == "mixed_float16", metrics
    assert metrics["val_accuracy"] >= 0.8, metrics
    assert metrics["epochs"] == FINETUNE["epochs"] and metrics["resumed_from_epoch"] == 0
    _assert_reports_best_epoch(metrics, history, monitor="val_accuracy")

    before = keras.models.load_model(project.model, compile=False)
    after = keras.models.load_model(tmp_path / "finetune" / "model.keras", compile=False)
    # Which layers fine-tuning trained: what unfreeze_top decides for these params ...
    reference = keras.models.load_model(project.model, compile=False)
    count = finetune.unfreeze_top(reference, MODEL["backbone"], FINETUNE["unfreeze_layers"])
    inner_ref = backbones.inner_base(base_of(reference))
    trained = {layer.name for layer in inner_ref.layers if layer.trainable and layer.weights}
    # ... which the saved model records too, and the metrics report.
    inner_after = backbones.inner_base(base_of(after))
    assert {layer.name for layer in inner_after.layers if layer.trainable and layer.weights} == (
        trained
    )
    assert count == len(trained) == metrics["trainable_base_layers"]
    assert 0 < len(trained) < len(inner_ref.layers) // 4, trained
    batchnorm = {
        layer.name
        for layer in inner_ref.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    }
    assert not trained & batchnorm

    w_before, w_after = _weights_by_layer(before), _weights_by_layer(after)
    assert w_before.keys() == w_after.keys()
    frozen_layers = [name for name in w_before if name not in trained and w_before[name]]
    assert len(frozen_layers) > 50
    assert {name for name in batchnorm if w_before[name]} <= set(frozen_layers)
    for name in frozen_layers:
        for a, b in zip(w_before[name], w_after[name], strict=True):
            assert a.tobytes() == b.tobytes(), f"frozen layer {name} changed during fine-tuning"
    changed = [
        name
        for name in trained
        if any(not np.array_equal(a, b) for a, b in zip(w_before[name], w_after[name], strict=True))
    ]
    assert changed, "fine-tuning changed none of the layers it unfroze"

    best = keras.models.load_model(
        tmp_path / "checkpoints" / f"epoch-{metrics['best_epoch']:03d}.keras"
    )
    counts = np.array([16] * len(CLASSES))  # training images per class, before augment's views
    kernel, bias = after.get_layer(HEAD_NAME).get_layer("probabilities").get_weights()
    kept_kernel, kept_bias = best.get_layer(HEAD_NAME).get_layer("probabilities").get_weights()
    temperature = metrics["temperature"]
    assert tuning.calibrate and temperature > 0 and temperature != 1.0, metrics
    np.testing.assert_allclose(kernel * temperature, kept_kernel, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        bias * temperature - kept_bias,
        metrics["prior_tau"] * np.log(counts / counts.sum()),
        atol=1e-5,
    )
    assert {"corrected_val_accuracy", "corrected_val_balanced_accuracy"} <= metrics.keys()
    decision = json.loads((tmp_path / "finetune" / "decision.json").read_text())
    # The network's own validation probabilities, by image: a fold's out-of-fold predictions.
    held_out = read_csv_rows(tmp_path / "finetune" / "val_predictions.csv")
    val_rows = [r for r in read_csv_rows(sealed / "manifest.csv") if r["split"] == "val"]
    assert sorted(r["sha256"] for r in held_out) == sorted(r["sha256"] for r in val_rows)
    labels = {r["sha256"]: r["label"] for r in val_rows}
    assert all(r["label"] == labels[r["sha256"]] for r in held_out)
    sums = [sum(float(v) for k, v in r.items() if k.startswith("p_")) for r in held_out]
    assert np.allclose(sums, 1.0, atol=1e-4)
    assert decision["objective"] == 0.5
    assert decision["temperature"] == pytest.approx(temperature, abs=1e-6)  # the summary rounds
    np.testing.assert_allclose(decision["offset"], bias * temperature - kept_bias, atol=1e-5)
    assert metrics["val_ece"] <= metrics["val_ece_uncalibrated"] + 1e-6, metrics

    # Mixed precision while training; float32 in what the stage hands on.
    assert isinstance(best.optimizer, keras.optimizers.LossScaleOptimizer)
    computing = {
        layer.dtype_policy.name
        for layer in base_of(best).layers
        if not isinstance(layer, keras.layers.InputLayer)
    }
    assert computing == {"mixed_float16"}, computing
    head = best.get_layer(HEAD_NAME)
    assert {layer.dtype_policy.name for layer in [head, *head.layers]} == {"float32"}
    saved = [after, *after.layers, *base_of(after).layers, *after.get_layer(HEAD_NAME).layers]
    assert {layer.dtype_policy.name for layer in saved} == {"float32"}
    assert after(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)).dtype == "float32"


def test_warmup_averaging_and_same_seed_same_weights(project, tmp_path):
    """The first fine-tuning step's rate is 0, the peak comes after ``warmup_epochs``, then
    the cosine decays it. The weights finetune validates, checkpoints and keeps are the moving
    average: with a momentum of nearly 1 they stay within a hair of the frozen phase's, while
    the same run without averaging keeps weights that moved. And a second run with the same
    seed (fresh checkpoints) ends with the same weights bit for bit: op determinism, seeded
    views and order."""
    import keras

    from components import finetune

    tuning = params(
        "finetune",
        **{**FINETUNE, "epochs": 1, "early_stopping_patience": None},
        warmup_epochs=0.5,
        ema_momentum=0.999999,
        calibrate=False,
    )
    rate = finetune.schedule(tuning, steps_per_epoch=10, learning_rate=1e-3)
    assert float(rate(0)) == 0.0 < float(rate(1)) < float(rate(4)) < 1e-3
    assert float(rate(5)) == pytest.approx(1e-3)
    assert float(rate(9)) < 1e-3

    start = keras.models.load_model(project.model, compile=False)

    def kept(run: str, momentum: float | None) -> list[np.ndarray]:
        """The kept weights, fine-tuned with ``momentum``."""
        averaged = dataclasses.replace(tuning, ema_momentum=momentum)
        summary = _finetune(project, tmp_path / run, params("model", **MODEL), averaged)
        assert summary["averaged_weights"] == (momentum is not None), summary
        model = keras.models.load_model(tmp_path / run / "finetune" / "model.keras", compile=False)
        return [np.asarray(w) for w in model.weights]

    def drift(weights: list[np.ndarray]) -> float:
        """How far ``weights`` are from the frozen phase's."""
        return max(
            float(np.abs(np.asarray(a) - b).max())
            for a, b in zip(start.weights, weights, strict=True)
        )

    averaged = kept("averaged", 0.999999)
    trained = kept("trained", None)
    assert drift(trained) > 1e-4 and drift(averaged) < drift(trained) / 100
    again = kept("again", None)
    for x, y in zip(trained, again, strict=True):
        assert x.tobytes() == y.tobytes()


def test_the_production_run_trains_on_train_and_val_with_the_out_of_fold_decision(
    project, tmp_path
):
    """With a decision fitted out-of-fold for these images and this recipe
    (``finetune.decision``), ``train_on: auto`` trains on every non-test image, computes no
    validation figure on images it trained on, and folds that decision in: the temperature,
    and the prior correction's tau times the log prior of train and val. Fitted for other
    images or another recipe, auto holds val out and says why; train+val refuses, naming the
    command that fits it. Seeds do not make another recipe; epochs or one label do."""
    import keras

    from components import finetune
    from imgpipe.core.errors import InputError
    from imgpipe.core.params import FittedDecision
    from imgpipe.data.lineage import TRAINING_SPLITS, manifest_labels, training_digest
    from imgpipe.evaluation.metrics import class_log_prior
    from imgpipe.model.training import HEAD_NAME

    model, views, frozen = params("model", **MODEL), params("augment"), params("train", **TRAIN)
    base = params(
        "finetune", **{**FINETUNE, "epochs": 1, "early_stopping_patience": None}, objective=1.0
    )
    images = manifest_labels(project.ingest / "manifest.csv", TRAINING_SPLITS)
    recipe = {"model": model, "augment": views, "train": frozen, "finetune": base}
    digest = training_digest(images, recipe)
    fitted = FittedDecision(1.0, temperature=1.5, tau=0.5, fitted_on=digest, source="a test")
    tuning = dataclasses.replace(base, decision=fitted)

    summary = _finetune(project, tmp_path / "all", model, tuning)
    assert summary["trained_on"] == "train+val", summary
    assert summary["training_images"] == len(images) > 0
    assert "val_accuracy" not in summary and (summary["temperature"], summary["prior_tau"]) == (
        1.5,
        0.5,
    )
    out = tmp_path / "all" / "finetune"
    assert not (out / "val_predictions.csv").exists()
    decision = json.loads((out / "decision.json").read_text())
    rows = read_csv_rows(project.ingest / "manifest.csv")
    counts = np.bincount([int(r["label_index"]) for r in rows if r["split"] != "test"], None, 3)
    assert decision["offset"] == pytest.approx(0.5 * class_log_prior(counts))
    assert decision["fitted_on"] == "out-of-fold: a test"

    def output(path: Path) -> Any:
        network = keras.models.load_model(path, compile=False)
        return network.get_layer(HEAD_NAME).get_layer("probabilities")

    trained = output(tmp_path / "all" / "checkpoints" / "epoch-000.keras")
    served = output(out / "model.keras")
    np.testing.assert_allclose(served.kernel.numpy() * 1.5, trained.kernel.numpy(), rtol=1e-5)
    np.testing.assert_allclose(
        served.bias.numpy() * 1.5, trained.bias.numpy() + decision["offset"], atol=1e-5
    )

    other = dataclasses.replace(
        fitted, fitted_on=training_digest({**images, "0" * 64: "a"}, recipe)
    )
    held, why = finetune.training_images(
        project.ingest, dataclasses.replace(tuning, decision=other), recipe, "softmax"
    )
    assert held == "train" and "other images or under another recipe" in why
    with pytest.raises(InputError, match="imgpipe crossval --folds K --apply"):
        finetune.training_images(
            project.ingest,
            dataclasses.replace(tuning, decision=other, train_on="train+val"),
            recipe,
            "softmax",
        )
    assert finetune.training_images(project.ingest, tuning, recipe, "ordinal")[0] == "train"
    reseeded = {**recipe, "finetune": dataclasses.replace(base, seed=7)}
    longer = {**recipe, "finetune": dataclasses.replace(base, epochs=3)}
    relabelled = {**images, next(iter(images)): "c" if next(iter(images.values())) != "c" else "a"}
    assert training_digest(images, reseeded) == digest
    digests = {digest, training_digest(images, longer), training_digest(relabelled, recipe)}
    assert len(digests) == 3  # another schedule, another label: each its own recipe


def test_quantization_aware_finetuning_serves_what_the_int8_model_computes(
    project, tmp_path, monkeypatch
):
    """With ``quantization_aware_epochs`` the kept model is the folded, int8-simulating form:
    right after folding it decides like the float model; it trains one more epoch (logged as
    the quantize phase), takes the prior correction and temperature, and the full-integer
    TFLite model converted from it (uint8 in and out, no float tensor, no calibration images)
    gives the same class as the Keras model on every validation image. With
    ``augment.balance_classes: per_epoch`` the quantize epoch draws class-balanced like the
    fine-tuning epochs: in the data's own order it would pull the head back to the prior."""
    import keras

    from components import finetune
    from imgpipe.data.datasets import image_dataset
    from imgpipe.data.manifest import SHARDS
    from imgpipe.data.tfrecords import split_files
    from imgpipe.export.tflite import TFLiteClassifier, write_tflite
    from imgpipe.model import quantization
    from imgpipe.model.backbones import BackboneError
    from imgpipe.model.training import quantization_aware, require_quantizable

    val = split_files(project.ingest / SHARDS, "val")
    images = np.concatenate([x.numpy() for x, _ in image_dataset(val, IMAGE_SIZE, 64)])
    frozen = keras.models.load_model(project.model, compile=False)
    folded = quantization_aware(frozen, params("model", **MODEL))
    quantization.measure(folded, [images])
    agree = np.mean(
        folded.predict(images, verbose=0).argmax(1) == frozen.predict(images, verbose=0).argmax(1)
    )
    assert agree >= 0.9, agree
    with pytest.raises(BackboneError, match=r"quantization_aware_epochs.*mobilenet_v2"):
        require_quantizable(frozen, params("model", backbone="mobilenet_v2"))

    tuning = params(
        "finetune",
        **{
            **FINETUNE,
            "epochs": 1,
            "early_stopping_patience": None,
            "quantization_aware_epochs": 1,
        },
    )
    drawn: list[tuple[int, int | None]] = []  # the training epochs' draws: (first, balanced)

    def recorded(*args: Any, **kwargs: Any) -> Any:
        if "epochs" in kwargs:  # not the batches that measure the int8 ranges
            drawn.append((kwargs.get("first_epoch", 0), kwargs.get("balanced")))
        return image_dataset(*args, **kwargs)

    monkeypatch.setattr(finetune, "image_dataset", recorded)
    per_epoch = params("augment", balance_classes="per_epoch")
    summary = _finetune(project, tmp_path, params("model", **MODEL), tuning, augment=per_epoch)
    assert drawn == [(0, len(CLASSES)), (1, len(CLASSES))], drawn
    assert summary["quantization_aware_epochs"] == 1 and "float_val_accuracy" in summary
    phases = [r["phase"] for r in read_csv_rows(tmp_path / "finetune_history.csv")]
    assert phases == ["finetune", "quantize"], phases
    model = keras.models.load_model(tmp_path / "finetune" / "model.keras", compile=False)
    assert quantization.is_quantized(model)

    paths = write_tflite(model, IMAGE_SIZE, tmp_path, [], int8=True, int8_weights=True)
    assert set(paths) == {"int8"}  # a quantized graph has no float32 or int8-weights form
    int8 = TFLiteClassifier(paths["int8"])
    assert int8.input["dtype"] == np.uint8 and int8.output["dtype"] == np.uint8
    details = int8.interpreter.get_tensor_details()
    assert not [d["name"] for d in details if d["dtype"] == np.float32]
    served = model.predict(images, verbose=0)
    integer = np.stack([int8(image) for image in images])
    assert (integer.argmax(1) == served.argmax(1)).all(), (integer, served)
    assert np.abs(integer - served).max() < 0.05


def test_head_on_cached_features_equals_frozen_model_on_images():
    """The frozen phase's shortcut is exact: train.fit of the head alone on
    train.extract_features(images) ends with the same head weights (atol 1e-4, measured ~1e-6)
    as train.fit of assemble(frozen base, copy of the head) on the images themselves: same initial
    weights, data order, batch size and seed, 3 epochs, dropout 0.2 (both Dropout layers are
    seeded alike, so the masks match). The base, frozen, keeps every weight and BN statistic."""
    import keras
    import tensorflow as tf

    from components import train
    from imgpipe.model import backbones, training

    size, per_class = 48, 12

    def images(seed0: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        x = [class_pattern(c, size, seed=seed0 + i) for c in range(3) for i in range(n)]
        return np.stack(x).astype(np.float32), np.repeat(np.arange(3), n).astype(np.int32)

    x_img, y = images(0, per_class)
    vx_img, vy = images(1000, 3)
    base = backbones.create(
        params("model", backbone="efficientnet_lite0", weights="imagenet", image_size=size)
    )
    base.trainable = False
    base_before = [np.asarray(w).copy() for w in base.weights]

    def features(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        ds = tf.data.Dataset.from_tensor_slices((x, labels)).batch(16)
        f, order = train.extract_features(base, ds, len(labels), "features", progress=False)
        np.testing.assert_array_equal(order, labels)
        return f

    x_feat, vx_feat = features(x_img, y), features(vx_img, vy)
    train_params = params(
        "train", seed=3, batch_size=8, epochs=3, learning_rate=0.003, dropout=0.2, hidden_units=0
    )
    keras.utils.set_random_seed(train_params.seed)
    head = training.build_head(x_feat.shape[1], 3, train_params.dropout, 0, train_params.seed)
    twin = training.build_head(x_feat.shape[1], 3, train_params.dropout, 0, train_params.seed)
    twin.set_weights(head.get_weights())
    initial = [w.copy() for w in head.get_weights()]

    cached = train.fit(head, x_feat, y, (vx_feat, vy), train_params, 3)
    end_to_end_model = training.assemble(base, twin)
    assert len(end_to_end_model.trainable_weights) == 2  # the head's kernel and bias only
    end_to_end = train.fit(end_to_end_model, x_img, y, (vx_img, vy), train_params, 3)

    for w_cached, w_e2e, w0 in zip(head.get_weights(), twin.get_weights(), initial, strict=True):
        assert np.abs(w_cached - w0).max() > 1e-3, "the head barely trained: nothing to compare"
        np.testing.assert_allclose(w_cached, w_e2e, rtol=0, atol=1e-4)
    np.testing.assert_allclose(
        cached.history["loss"], end_to_end.history["loss"], rtol=1e-3, atol=1e-5
    )
    assert cached.history["accuracy"] == end_to_end.history["accuracy"]
    for a, b in zip(base_before, base.weights, strict=True):
        assert a.tobytes() == np.asarray(b).tobytes()
    assert training.base_of(end_to_end_model) is base  # where later stages find the base


def _cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
        MLFLOW_EXPERIMENT_NAME="imgpipe-tests",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    return env


def test_finetune_cli_resumes_after_kill_9(project, tmp_path):
    """``imgpipe finetune`` killed with SIGKILL right after epoch 0's checkpoint, then rerun
    with the same command, resumes instead of starting over: metrics say resumed_from_epoch
    >= 1, the history CSV holds epochs 0, 1, 2 exactly once each, on the step axis right after
    the frozen phase's last step, and the final model exists."""
    params = yaml.safe_load((project.root / "params.yaml").read_text())
    params["finetune"].update(epochs=3, unfreeze_layers=40)  # slower epochs: time to kill
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    checkpoints = tmp_path / "outputs" / "finetune_checkpoints"
    metrics_file = tmp_path / "metrics" / "finetune.json"
    history_file = tmp_path / "metrics" / "finetune_history.csv"
    command = [
        str(VENV_BIN / "imgpipe"),
        "finetune",
        "--params", str(tmp_path / "params.yaml"),
        "--trained", str(project.model),
        "--dataset", str(project.ingest),
        "--frozen-history", str(project.train_history),
        "--out", str(tmp_path / "outputs" / "finetune"),
        "--summary", str(metrics_file),
        "--history", str(history_file),
        "--checkpoints", str(checkpoints),
    ]  # fmt: skip
    env = _cli_env(tmp_path)
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 (closed below)
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    state_file = checkpoints / "state.json"
    deadline = time.monotonic() + 300
    state = None
    try:
        while time.monotonic() < deadline and first.poll() is None:
            if state_file.is_file():
                state = json.loads(state_file.read_text())
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"no checkpoint state before exit/timeout: {_tail(tmp_path / 'first.log')}")
        os.kill(first.pid, signal.SIGKILL)
        assert first.wait(timeout=60) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        log.close()
    assert state["epoch"] == 0, state
    assert not metrics_file.exists(), "the killed run must not have finished"
    killed_state = json.loads(state_file.read_text())
    assert killed_state["epoch"] < 2, killed_state

    second = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400
    )
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming after epoch" in second.stderr, second.stderr
    metrics = json.loads(metrics_file.read_text())["finetune"]
    assert metrics["resumed_from_epoch"] == killed_state["epoch"] + 1 >= 1, metrics
    assert metrics["epochs"] == 3
    rows = read_csv_rows(history_file)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2], rows
    assert {r["phase"] for r in rows} == {"finetune"}
    frozen_rows = read_csv_rows(project.train_history)
    last_frozen = max(int(r["step"]) for r in frozen_rows)
    assert last_frozen == TRAIN["epochs"] - 1
    assert [int(r["step"]) for r in rows] == [last_frozen + 1 + e for e in range(3)]
    assert all(r["val_loss"] and r["loss"] for r in rows)
    assert (tmp_path / "outputs" / "finetune" / "model.keras").is_file()
    final_state = json.loads(state_file.read_text())
    assert final_state["epoch"] == 2 and len(final_state["history"]) == 3


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@pytest.mark.slow
def test_train_is_deterministic_by_seed(project, tmp_path):
    """Two more train.run calls with the same seed (features now from the cache) give the same
    head weights bit for bit: the head's initial weights come from the seed, not the process.
    (Both run here, so both see this process's TensorFlow settings: finetune turns on op
    determinism process-wide.)"""
    import keras

    from components import train
    from imgpipe.model.training import HEAD_NAME
    from imgpipe.model.training import MODEL as MODEL_FILE

    heads = []
    for run in ("a", "b"):
        train.run(
            augmented=project.augment / "shards",
            dataset=project.ingest,
            out=tmp_path / run / "train",
            summary=tmp_path / run / "train.json",
            history=tmp_path / run / "history.csv",
            feature_cache=project.feature_cache,
            model=params("model", **MODEL),
            train=params("train", **TRAIN),
            progress=False,
        )
        heads.append(
            keras.models.load_model(tmp_path / run / "train" / MODEL_FILE).get_layer(HEAD_NAME)
        )
    for a, b in zip(heads[0].get_weights(), heads[1].get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_full_profile_loads_and_its_first_epoch_runs(tmp_path):
    """Guards the full-budget profile: profiles/full.yaml applies over params.yaml and
    validates, ``imgpipe profile full`` turns it into ``dvc exp run -S`` flags, and its model,
    training and fine-tuning settings run a first epoch each on tiny data (the whole base
    unfrozen)."""
    from imgpipe.core.params import FinetuneParams, load_params, section, set_flags, with_profile

    full = with_profile(load_params(PROJECT / "params.yaml"), str(PROJECT / "profiles/full.yaml"))
    flags = set_flags(str(PROJECT / "profiles/full.yaml"))
    assert flags[:2] == ["-S", "model.image_size=null"], flags
    p = build_tiny_project(
        tmp_path,
        {"a": 6, "b": 6},
        48,
        full["model"],
        {**full["train"], "epochs": 1},
        val_fraction=0.25,
        test_fraction=0.1,
    )
    tuned = _finetune(
        p,
        tmp_path,
        params("model", **full["model"]),
        # the profile's own settings; the quantization-aware epoch (not the profile's) has
        # its own test, test_quantization_aware_finetuning_serves_what_the_int8_model_computes
        section(
            FinetuneParams,
            "finetune",
            {"finetune": {**full["finetune"], "epochs": 1, "quantization_aware_epochs": 0}},
        ),
    )
    import keras

    from imgpipe.model import backbones
    from imgpipe.model.training import base_of

    inner = backbones.inner_base(base_of(keras.models.load_model(p.model, compile=False)))
    weighted = [
        layer
        for layer in inner.layers
        if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert tuned["epochs"] == 1
    assert tuned["trainable_base_layers"] == len(weighted), tuned  # the whole base


def test_a_profile_with_an_unknown_key_is_an_error_naming_it(tmp_path):
    from imgpipe.core.params import ParamsError, load_params, with_profile

    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune:\n  learning_rte: 0.001\n")
    with pytest.raises(ParamsError, match=r"bad\.yaml: unknown key finetune\.learning_rte"):
        with_profile(load_params(PROJECT / "params.yaml"), str(bad))


def test_the_averaged_weights_shim_resumes_with_the_average_in_the_model(tmp_path):
    """A checkpoint written at an epoch's end holds the average in the model and the trained
    weights in the optimizer. AveragedWeights tells Keras's SwapEMAWeights so, through its one
    private attribute, when a run resumes from one: the first epoch then trains from the
    trained weights, not from the average. Fails when a Keras upgrade renames or changes it."""
    import keras
    import numpy as np

    from imgpipe.model.checkpoints import AveragedWeights

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.1, use_ema=True, ema_momentum=0.5), "mse")
    x, y = np.random.rand(32, 2).astype("float32"), np.random.rand(32, 1).astype("float32")
    checkpoint = tmp_path / "epoch.keras"
    seen: dict[str, list[np.ndarray]] = {}

    class Checkpoint(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                seen["average"] = [w.copy() for w in self.model.get_weights()]
                self.model.save(checkpoint)
                self.model.stop_training = True

    model.fit(
        x, y, epochs=4, batch_size=8, verbose=0, callbacks=[AveragedWeights(False), Checkpoint()]
    )

    def first_epoch_starts_from(resumed: bool) -> list[np.ndarray]:
        loaded = keras.models.load_model(checkpoint, compile=True)
        callback = AveragedWeights(resumed)
        callback.set_model(loaded)
        callback.set_params({"epochs": 4})
        callback.on_epoch_begin(2)
        return loaded.get_weights()

    def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
        return all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))

    assert same(first_epoch_starts_from(False), seen["average"])
    assert not same(first_epoch_starts_from(True), seen["average"])


def test_every_fake_quant_is_found_inside_nested_models():
    """quantization.all_layers walks nested models through Keras's public ``layers``."""
    import keras

    from imgpipe.model.quantization import FakeQuant, all_layers, is_quantized

    inner_in = keras.Input((4,))
    inner = keras.Model(inner_in, FakeQuant(name="q")(keras.layers.Dense(4)(inner_in)))
    outer_in = keras.Input((4,))
    outer = keras.Model(outer_in, keras.layers.Dense(2)(inner(outer_in)))
    assert is_quantized(outer)
    assert [layer.name for layer in all_layers(outer) if isinstance(layer, FakeQuant)] == ["q"]
    plain_in = keras.Input((4,))
    assert not is_quantized(keras.Model(plain_in, keras.layers.Dense(2)(plain_in)))
