"""The blessing gate's comparison with the champion (imgpipe.evaluation.gate), on made-up
predictions with known answers: paired bootstrap intervals, non-inferiority, the minimum of
comparable images and the labels the champion learnt from. No TensorFlow; evaluate's use of it
against a real registry is in test_export_registry."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import params

from imgpipe.evaluation import gate

CLASSES = 4
N = 400
GATE = {"min_accuracy": 0.0, "min_balanced_accuracy": 0.0, "min_compared_images": 100}


def _labels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CLASSES, N)


def _predictions(labels: np.ndarray, accuracy: float, seed: int) -> np.ndarray:
    """Right on the first ``accuracy`` share of the images (in a seeded order), a wrong class
    on the rest."""
    order = np.random.default_rng(seed).permutation(len(labels))
    wrong = order[round(accuracy * len(labels)) :]
    predicted = labels.copy()
    predicted[wrong] = (labels[wrong] + 1) % CLASSES
    return predicted


def _decide(
    candidate: np.ndarray,
    champion: np.ndarray,
    labels: np.ndarray,
    lineage: dict | None = None,
    **overrides,
) -> dict:
    evaluate = params("evaluate", **{**GATE, **overrides})
    comparison = gate.compare(
        labels, candidate, champion, classes=CLASSES, samples=1000, confidence=0.95
    )
    figures = {
        "accuracy": comparison["accuracy"]["candidate"],
        "balanced_accuracy": comparison["balanced_accuracy"]["candidate"],
        "macro_f1": 0.0,
    }
    champion_figures = {"version": 1, "excluded": 0, "images": len(labels), "lineage": True}
    champion_figures.update(lineage or {})
    return gate.bless(figures, champion_figures, comparison, evaluate)


def _failed(blessing: dict) -> set[str]:
    return {c["check"] for c in blessing["checks"] if not c["passed"]}


def test_a_candidate_equal_to_the_champion_is_blessed_with_a_zero_difference():
    labels = _labels()
    same = _predictions(labels, 0.8, seed=1)
    blessing = _decide(same, same, labels)
    assert blessing["blessed"], blessing["checks"]
    difference = blessing["comparison"]["accuracy"]
    assert difference["difference"] == 0.0 and difference["low"] == 0.0 == difference["high"]


def test_one_worse_by_far_more_than_the_margin_is_refused():
    labels = _labels()
    blessing = _decide(_predictions(labels, 0.6, seed=1), _predictions(labels, 0.8, seed=1), labels)
    assert not blessing["blessed"]
    assert _failed(blessing) == {"non_inferior_accuracy", "non_inferior_balanced_accuracy"}
    check = next(c for c in blessing["checks"] if c["check"] == "non_inferior_accuracy")
    assert check["value"] == pytest.approx(-0.2)
    assert check["interval"][1] < -0.02 and "worse beyond the 0.02 margin" in check["reason"]


def test_one_worse_by_less_than_the_noise_is_blessed():
    """Two models of equal skill making different mistakes: the candidate's point figure is
    lower by more than the margin, but the interval reaches above it: blessed."""
    labels = _labels()
    candidate, champion = _predictions(labels, 0.77, seed=1), _predictions(labels, 0.80, seed=2)
    blessing = _decide(candidate, champion, labels)
    check = next(c for c in blessing["checks"] if c["check"] == "non_inferior_accuracy")
    assert check["value"] == pytest.approx(-0.03) and check["value"] < -0.02
    assert check["interval"][0] < -0.03 < check["interval"][1] and check["interval"][1] > -0.02
    assert blessing["blessed"], blessing["checks"]
    # Even with no margin at all: the interval reaches above 0, the gap may be noise.
    assert _decide(candidate, champion, labels, non_inferiority_margin=0.0)["blessed"]


def test_the_interval_is_paired():
    """The same 5 % of images lost: the unpaired figures would overlap widely, the paired
    interval is a single value, because both models are resampled on the same images."""
    labels = _labels()
    champion = _predictions(labels, 0.85, seed=3)
    candidate = champion.copy()
    right = np.flatnonzero(champion == labels)[:20]
    candidate[right] = (labels[right] + 1) % CLASSES
    comparison = gate.compare(
        labels, candidate, champion, classes=CLASSES, samples=1000, confidence=0.95
    )
    assert comparison["discordant"] == {"candidate_only": 0, "champion_only": 20}
    assert comparison["accuracy"]["high"] < 0  # every resample sees the candidate lose
    assert comparison["accuracy"]["difference"] == pytest.approx(-20 / N)


def test_below_the_minimum_of_images_the_gate_cannot_compare():
    labels = _labels()[:60]
    same = _predictions(labels, 0.8, seed=1)
    blessing = _decide(same, same, labels)
    assert not blessing["blessed"] and _failed(blessing) == {"comparable"}
    assert (
        "cannot compare with champion v1: only 60 test images" in blessing["checks"][-1]["reason"]
    )


def test_balanced_accuracy_difference_weighs_each_class_alike():
    """The candidate loses every image of the rarest class: a small accuracy difference, a
    quarter of balanced accuracy."""
    labels = np.array([0] * 190 + [1] * 100 + [2] * 100 + [3] * 10)
    champion = labels.copy()
    candidate = labels.copy()
    candidate[labels == 3] = 0
    comparison = gate.compare(
        labels, candidate, champion, classes=CLASSES, samples=500, confidence=0.9
    )
    assert comparison["accuracy"]["difference"] == pytest.approx(-10 / 400)
    assert comparison["balanced_accuracy"]["difference"] == pytest.approx(-0.25)


def test_the_champions_images_under_other_labels_refuse_beyond_the_limit():
    """Relabelled training images cannot be seen in the accuracy on today's labels (the test
    labels moved too): the gate counts them against the champion's record."""
    labels = _labels()
    same = _predictions(labels, 0.8, seed=1)
    relabelled = {
        "labels_known": 1000,
        "relabelled": 140,
        "relabelled_by_class": {"a -> d": 140},
    }
    blessing = _decide(same, same, labels, relabelled)
    assert not blessing["blessed"] and _failed(blessing) == {"labels_kept"}
    (check,) = [c for c in blessing["checks"] if c["check"] == "labels_kept"]
    assert check["value"] == pytest.approx(0.14)
    assert "140 of the 1000 images champion v1 trained on" in check["reason"]
    assert "a -> d: 140" in check["reason"] and "review the relabelling" in check["reason"]
    # A reviewed relabelling goes through with the limit raised for that run.
    assert _decide(same, same, labels, relabelled, max_relabelled_fraction=0.2)["blessed"]
    # A few fixed labels stay within the default limit.
    few = {**relabelled, "relabelled": 5, "relabelled_by_class": {"a -> b": 5}}
    assert _decide(same, same, labels, few)["blessed"]


def test_without_the_champions_lineage_the_reason_says_the_whole_test_split():
    labels = _labels()
    same = _predictions(labels, 0.8, seed=1)
    blessing = _decide(same, same, labels, {"lineage": False})
    assert blessing["blessed"]
    reasons = " ".join(c["reason"] for c in blessing["checks"])
    assert "training images are unknown" in reasons and "neither trained on" not in reasons
    assert "labels_kept" not in {c["check"] for c in blessing["checks"]}


def test_push_reads_the_exports_weights_digest_and_names_a_missing_or_garbled_one(tmp_path):
    """push registers a candidate by the ``weights.sha256`` export wrote beside its SavedModel
    (the champion exported again is not registered again): an export folder without it, or
    with something else in it, is an error naming the file, before anything is recorded."""
    from imgpipe.core.errors import InputError
    from imgpipe.export.savedmodel import WEIGHTS, read_weights_digest

    with pytest.raises(InputError, match=f"{WEIGHTS}: no such file .*export again"):
        read_weights_digest(tmp_path)
    (tmp_path / WEIGHTS).write_text("not a digest\n")
    with pytest.raises(InputError, match=f"{WEIGHTS}: not a sha256 hex digest"):
        read_weights_digest(tmp_path)
    (tmp_path / WEIGHTS).write_text("ab" * 32 + "\n")
    assert read_weights_digest(tmp_path) == "ab" * 32
