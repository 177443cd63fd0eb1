"""``imgpipe ensemble``: models averaged in one, exported and served like one."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import class_pattern, encode_image, params

from commands import main

pytestmark = pytest.mark.slow

IMAGE_SIZE = 32
LABELS = ("a", "b", "c")


def _member(folder: Path, seed: int, classes: int = len(LABELS)) -> tuple[Any, Path]:
    """A Lite0 classifier (ImageNet base, head seeded by ``seed``) as finetune leaves one: its
    model file and the decision file beside it."""
    import keras

    from imgpipe.model import backbones
    from imgpipe.model.training import MODEL, assemble, build_head

    keras.utils.set_random_seed(seed)
    base = backbones.create(
        params("model", backbone="efficientnet_lite0", weights="imagenet", image_size=IMAGE_SIZE)
    )
    model = assemble(base, build_head(1280, classes, 0.0, 0, seed))
    folder.mkdir(parents=True)
    model.save(folder / MODEL)
    decision = {"objective": "accuracy", "temperature": 1.3, "offset": [0.0] * classes}
    (folder / "decision.json").write_text(json.dumps(decision))
    return model, folder / MODEL


def test_the_ensemble_serves_the_mean_of_its_members_probabilities(tmp_path, capsys):
    """Two members with different heads: the ensemble's model file gives the mean of their
    probabilities, and so does its SavedModel's bytes signature on PNGs (decoded in the graph
    as in training); its embedding is both members' pooled features side by side; its
    decision file folds in nothing beyond the members' own. Members that do not fit together
    are refused by name."""
    import keras

    from imgpipe.data.datasets import decode_and_resize
    from imgpipe.export.savedmodel import SavedModelClassifier, write_saved_model
    from imgpipe.model.training import POOLED_LAYER

    one, first = _member(tmp_path / "seed1", 1)
    two, second = _member(tmp_path / "seed2", 2)
    out = tmp_path / "ensemble"
    assert main(["ensemble", str(first), str(second), "--out", str(out)]) == 0
    assert "the mean of 2 models' probabilities" in capsys.readouterr().out
    decision = json.loads((out / "decision.json").read_text())
    assert decision == {
        "objective": "accuracy",
        "temperature": 1.0,
        "offset": [0.0, 0.0, 0.0],
        "members": [str(first), str(second)],
    }

    encoded = [encode_image(class_pattern(i, 40, seed=i), "PNG") for i in range(4)]
    images = np.stack([decode_and_resize(e, IMAGE_SIZE).numpy() for e in encoded])
    members = [m.predict(images, verbose=0) for m in (one, two)]
    assert np.abs(members[0] - members[1]).max() > 1e-3  # else a mean proves nothing
    averaged = keras.models.load_model(out / "model.keras", compile=False)
    np.testing.assert_allclose(averaged.predict(images, verbose=0), np.mean(members, 0), atol=1e-6)

    write_saved_model(averaged, LABELS, IMAGE_SIZE, tmp_path / "served", 10**7)
    served = SavedModelClassifier(tmp_path / "served")
    np.testing.assert_allclose(served.predict_bytes(encoded), np.mean(members, 0), atol=1e-5)
    pooled = [
        keras.Model(m.inputs, m.get_layer(POOLED_LAYER).output).predict(images, verbose=0)
        for m in (one, two)
    ]
    np.testing.assert_allclose(served.embed_bytes(encoded), np.hstack(pooled), atol=1e-4)

    _, other = _member(tmp_path / "four", 3, classes=4)
    balanced = tmp_path / "balanced" / second.name  # the second member, fitted for another goal
    balanced.parent.mkdir()
    shutil.copyfile(second, balanced)
    decided = {"objective": "balanced_accuracy", "temperature": 1.3, "offset": [0.0] * 3}
    (balanced.parent / "decision.json").write_text(json.dumps(decided))
    for members, reason in (
        ([first, other], r"four/model.keras: takes .* and gives 4 classes, but .*seed1"),
        ([first, balanced], "serve different objectives"),
        ([first], "at least two models; got 1"),
        ([first, tmp_path / "none.keras"], "none.keras: no such model file"),
    ):
        argv = ["ensemble", *map(str, members), "--out", str(tmp_path / "bad")]
        assert main(argv) == 1
        error = capsys.readouterr().err
        assert re.search(reason, error), error
    assert not (tmp_path / "bad").exists()


def test_a_student_learns_the_ensemble_and_its_int8_file_serves_its_classes(
    tmp_path, capsys, monkeypatch
):
    """``imgpipe distill`` on a tiny project: the student starts from train's frozen-phase
    model and ends nearer the teacher's probabilities than it started (mean KL divergence over
    the non-test images, where a student fitted to the labels would not follow a teacher of
    random heads); it leaves finetune's folder (model, a decision that folds in nothing, the
    curves, the history of both phases); its quantization-aware int8 TFLite file gives the
    SavedModel's class on the test images. A teacher of other classes is refused by name."""
    import keras
    import yaml
    from conftest import PROJECT, build_tiny_project

    from imgpipe.data.datasets import decode_and_resize, image_dataset
    from imgpipe.data.manifest import MANIFEST, read_manifest
    from imgpipe.data.tfrecords import read_split, split_files
    from imgpipe.export.tflite import TFLiteClassifier, write_tflite
    from imgpipe.model.ensemble import write_ensemble

    model = {"backbone": "efficientnet_lite0", "weights": "imagenet", "image_size": IMAGE_SIZE}
    project = build_tiny_project(
        tmp_path,
        dict.fromkeys(LABELS, 12),
        IMAGE_SIZE,
        model,
        {"epochs": 2, "batch_size": 8},
        val_fraction=0.2,
        test_fraction=0.2,
    )
    write_ensemble(
        [_member(tmp_path / f"seed{s}", s)[1] for s in (1, 2)], tmp_path / "outputs/ensemble"
    )
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    raw["model"].update(model)
    raw["finetune"].update(
        epochs=2,
        batch_size=8,
        learning_rate=1e-3,
        warmup_epochs=0.0,
        ema_momentum=None,  # a few steps: the average would still be the start
        unfreeze_layers=20,
        quantization_aware_epochs=1,
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)  # distill reads train's and ingest's outputs at DVC's paths

    assert main(["distill", "outputs/ensemble", "--out", "outputs/student"]) == 0
    assert "a student of outputs/ensemble trained on" in capsys.readouterr().out
    out = tmp_path / "outputs/student"
    assert sorted(p.name for p in out.iterdir()) == [
        "curves.png",
        "decision.json",
        "distill.json",
        "history.csv",
        "model.keras",
    ]
    decision = json.loads((out / "decision.json").read_text())
    assert decision["temperature"] == 1.0 and decision["offset"] == [0.0] * len(LABELS)
    assert decision["objective"] == "accuracy" and "outputs/ensemble" in decision["fitted_on"]
    summary = json.loads((out / "distill.json").read_text())["distill"]
    assert summary["epochs"] == 2 and summary["quantization_aware_epochs"] == 1
    non_test = read_manifest(project.ingest / MANIFEST, ("train", "val"))
    assert summary["training_images"] == len(non_test) and summary["trained_on"] == "train+val"
    history = (out / "history.csv").read_text()
    assert history.count(",distill,") == 2 and history.count(",quantize,") == 1

    shards = project.ingest / "shards"
    files = split_files(shards, "train") + split_files(shards, "val")
    images = np.concatenate([x.numpy() for x, _ in image_dataset(files, IMAGE_SIZE, 64)])
    teacher, start, learnt = (
        keras.models.load_model(path, compile=False)
        for path in (tmp_path / "outputs/ensemble/model.keras", project.model, out / "model.keras")
    )

    def divergence(p: np.ndarray, q: np.ndarray) -> float:
        return float(np.mean(np.sum(p * np.log(p / np.clip(q, 1e-7, None)), axis=1)))

    wanted = teacher.predict(images, verbose=0)
    before = divergence(wanted, start.predict(images, verbose=0))
    after = divergence(wanted, learnt.predict(images, verbose=0))
    assert after < 0.3 * before, (before, after)  # measured: 0.026 -> 0.0019

    # The device's file against the model it was converted from, on the same pixels.
    test = read_split(shards, "test").encoded
    pixels = np.stack([decode_and_resize(e, IMAGE_SIZE).numpy() for e in test])
    served = learnt.predict(pixels, verbose=0)
    [int8] = write_tflite(learnt, IMAGE_SIZE, tmp_path, [], int8=True, int8_weights=False).values()
    device = np.stack([TFLiteClassifier(int8)(x) for x in pixels])
    assert (device.argmax(1) == served.argmax(1)).mean() >= 0.9, (device, served)

    _member(tmp_path / "four", 3, classes=4)
    assert main(["distill", "four", "--out", "outputs/bad"]) == 1
    assert "four/model.keras: the teacher takes" in capsys.readouterr().err
    assert not (tmp_path / "outputs/bad").exists()
