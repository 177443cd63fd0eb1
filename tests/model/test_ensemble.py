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
