"""The ordinal head (imgpipe.model.ordinal): the layer's probabilities and its NumPy twin, the
cut-points refitted on validation, and the whole path on tiny ordered classes: train with
``train.head: ordinal``, fine-tune, evaluate, export, serve; every artifact gives evaluate's
class."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import build_tiny_project, params

from imgpipe.evaluation.calibration import fit_cutpoints
from imgpipe.model.ordinal import OrdinalProbabilities, probabilities


def test_layer_gives_class_probabilities_that_its_numpy_twin_reproduces():
    """Non-negative, summing to 1, equal to ``probabilities`` on the layer's own scores and
    cut-points (after new ones are set), which increase."""
    layer = OrdinalProbabilities(4, name="probabilities")
    features = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    layer(features)
    layer.set_decision(np.array([-0.5, 0.1, 2.0]), temperature=1.7)
    got = np.asarray(layer(features))
    assert got.shape == (64, 4) and (got >= 0).all()
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)
    cut = np.asarray(layer.cutpoints())
    np.testing.assert_allclose(cut, [-0.5, 0.1, 2.0], atol=1e-5)
    np.testing.assert_allclose(got, probabilities(layer.scores(features), cut, 1.7), atol=1e-5)
    with pytest.raises(ValueError, match="cut-points must increase"):
        layer.set_decision(np.array([0.0, -1.0, 1.0]), 1.0)


def test_cutpoints_fitted_on_validation_are_monotone_and_decide_better():
    """Scores of four ordered classes whose boundaries lie away from the starting cut-points:
    the refitted cut-points increase and the decision's accuracy rises well above the
    start's."""
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(4), [300, 60, 30, 150])
    scores = labels * 2.0 + 3.0 + rng.normal(scale=0.6, size=len(labels))
    start = np.array([-1.0, 0.0, 1.0])

    def accuracy(cut: np.ndarray) -> float:
        return float((probabilities(scores, cut).argmax(axis=1) == labels).mean())

    cut = fit_cutpoints(labels, scores, start, balance=0.5)
    assert np.all(np.diff(cut) > 0), cut
    assert accuracy(start) < 0.6 and accuracy(cut) > 0.9, (accuracy(start), accuracy(cut))


IMAGE_SIZE = 48
CLASSES = {"a": 24, "b": 24, "c": 24}
MODEL = {"backbone": "efficientnet_lite0", "weights": "imagenet", "image_size": IMAGE_SIZE}


@pytest.mark.slow
def test_ordinal_head_through_finetune_evaluate_export_and_serving(tmp_path):
    """``train.head: ordinal`` on three ordered class patterns: fine-tuning refits monotone
    cut-points (objective balanced accuracy) and a temperature on validation, and evaluate
    scores the trained cut-points beside them (the same decision when the refit kept them);
    the Keras model (evaluate's predictions), the exported SavedModel, the local TF Serving
    stand-in and the TFLite float model give the same class on every test image, and the same
    probabilities within 1e-4."""
    from components import evaluate, export, finetune
    from imgpipe.export.savedmodel import saved_model_dir
    from serving.client import ServingClient
    from serving.process import ServerProcess, model_config

    frozen = {"seed": 42, "batch_size": 16, "epochs": 6, "learning_rate": 0.003, "head": "ordinal"}
    project = build_tiny_project(
        tmp_path,
        CLASSES,
        IMAGE_SIZE,
        MODEL,
        frozen,
        val_fraction=0.25,
        test_fraction=0.25,
    )
    model = params("model", **MODEL)
    tuned = finetune.run(
        trained=project.model,
        dataset=project.ingest,
        frozen_history=project.train_history,
        out=tmp_path / "finetune",
        summary=tmp_path / "finetune.json",
        history=tmp_path / "finetune_history.csv",
        checkpoints=tmp_path / "checkpoints",
        model=model,
        finetune=params(  # the ordinal head has no quantized form
            "finetune",
            epochs=1,
            batch_size=16,
            unfreeze_layers=20,
            quantization_aware_epochs=0,
            objective=1.0,  # the cut-points refitted for balanced accuracy
        ),
        augment=params("augment"),
        train=params("train", **frozen),
        progress=False,
    )["finetune"]
    cut = tuned["cutpoints"]
    assert len(cut) == len(CLASSES) - 1 and np.all(np.diff(cut) > 0), tuned
    assert tuned["temperature"] != 1.0 and tuned["val_accuracy"] >= 0.6, tuned

    serving = params("serving", model_name="ordered", model_base_path=str(tmp_path / "models"))
    evaluate.run(
        tuned=tmp_path / "finetune" / "model.keras",
        decision=tmp_path / "finetune" / "decision.json",
        dataset=project.ingest,
        out=tmp_path / "evaluate",
        summary=tmp_path / "evaluate.json",
        confusion=tmp_path / "confusion.csv",
        calibration=tmp_path / "calibration.csv",
        evaluate=params("evaluate", slice_by=[], class_groups={}, misclassified_examples=2),
        model=model,
        serving=serving,
        champion=None,
    )
    report = export.run(
        tuned=tmp_path / "finetune" / "model.keras",
        dataset=project.ingest,
        evaluation=tmp_path / "evaluate.json",
        out=tmp_path / "export",
        summary=tmp_path / "export.json",
        export=params(
            "export", int8=False, int8_weights=False, warmup_images=2, representative_images=8
        ),
        model=model,
        serving=serving,
        monitor=params("monitor", reference_images=8, embedding_dims=4),
        progress=False,
    )
    assert report["parity"]["tflite_float32"]["top1_agreement"] == 1.0, report["parity"]
    assert report["parity"]["tflite_float32"]["max_abs_probability_diff"] < 1e-4

    with open(tmp_path / "evaluate" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    files = {Path(r["filepath"]).name: r for r in rows}
    sources = {p.name: p for p in (tmp_path / "data").rglob("*.png")}
    names = sorted(files)
    encoded = [sources[n].read_bytes() for n in names]
    wanted = [files[n]["predicted"] for n in names]
    keras_probs = np.array(
        [[float(files[n][k]) for k in files[n] if k.startswith("p_")] for n in names]
    )
    assert len(set(wanted)) > 1, wanted  # the model tells the classes apart

    saved = saved_model_dir(tmp_path / "export", "ordered")
    config = model_config(tmp_path / "models.config", "ordered", str(saved.parent))
    with (
        ServerProcess(["--model_config_file", str(config)], tmp_path / "server") as server,
        ServingClient(server.address, timeout=60) as client,
    ):
        served = client.predict_bytes(encoded, model="ordered")
    assert [n.decode() for n in served["class_name"]] == wanted
    np.testing.assert_allclose(served["probabilities"], keras_probs, atol=1e-4)
    evaluation = json.loads((tmp_path / "evaluate.json").read_text())
    summary = evaluation["test"]
    assert summary["temperature"] == pytest.approx(tuned["temperature"], rel=1e-6)
    # evaluate also scored the network's own cut-points (asked again with the trained ones).
    decision = json.loads((tmp_path / "finetune" / "decision.json").read_text())
    assert summary["objective"] == 1.0 and len(decision["trained_cutpoints"]) == len(cut)
    # Recomputed here: the fine-tuned network asked again with its trained cut-points (at the
    # fitted temperature) on the test images, its argmax against their labels.
    import keras

    from components.evaluate import predict_keras
    from imgpipe.model import ordinal
    from imgpipe.model.training import HEAD_NAME

    own = evaluation["argmax"]
    network = keras.models.load_model(tmp_path / "finetune" / "model.keras", compile=False)
    output = network.get_layer(HEAD_NAME).get_layer(ordinal.NAME)
    output.set_decision(np.array(decision["trained_cutpoints"]), float(decision["temperature"]))
    trained = predict_keras(network, encoded, MODEL["image_size"], 8)
    columns = [k[2:] for k in files[names[0]] if k.startswith("p_")]
    truth = np.array([columns.index(files[n]["label"]) for n in names])
    expected = float((trained.argmax(axis=1) == truth).mean())
    assert own["accuracy"] == pytest.approx(expected), (own, expected)
