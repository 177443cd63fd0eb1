"""imgpipe.evaluation.metrics against a small example worked out by hand: four classes, one (c)
never predicted, one (d) absent from the labels and the predictions, a confidence on a bin edge.

    actual  predicted  top-1 confidence  correct
    a       a          0.9               yes
    a       a          0.6               yes
    a       b          0.7
    b       b          0.5 (an edge)     yes
    b       a          0.4
    c       a          0.4
    c       b          0.8
    c       b          0.3
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from imgpipe.evaluation.metrics import (
    calibration_bins,
    classification_metrics,
    confusion_matrix,
    expected_calibration_error,
    group_index,
    group_metrics,
    prior_correction,
    shift_probabilities,
)

LABELS = ["a", "b", "c", "d"]
Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 2, 2])
PROBS = np.array(
    [
        [0.9, 0.05, 0.03, 0.02],
        [0.6, 0.2, 0.1, 0.1],
        [0.2, 0.7, 0.05, 0.05],
        [0.3, 0.5, 0.1, 0.1],
        [0.4, 0.3, 0.2, 0.1],
        [0.4, 0.3, 0.2, 0.1],
        [0.1, 0.8, 0.05, 0.05],
        [0.25, 0.3, 0.25, 0.2],
    ]
)


def test_confusion_matrix_counts_actual_by_predicted_for_every_class():
    """Rows are actual, columns predicted; classes never seen still get their row and column."""
    cm = confusion_matrix(Y_TRUE, PROBS.argmax(axis=1), len(LABELS))
    np.testing.assert_array_equal(
        cm,
        [
            [2, 1, 0, 0],
            [1, 1, 0, 0],
            [1, 2, 0, 0],
            [0, 0, 0, 0],
        ],
    )
    assert cm.dtype.kind == "i"


def test_classification_metrics_match_the_hand_computed_values():
    """precision = tp / predicted, recall = tp / actual, 0 where the denominator is 0 (c is
    never predicted, d never occurs); class averages run over the classes present in the
    labels (a, b, c), so d does not pull them down:
    balanced accuracy (2/3 + 1/2 + 0) / 3 = 7/18, macro-F1 (4/7 + 1/3 + 0) / 3 = 19/63."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zero_division is decided, not warned about
        m = classification_metrics(Y_TRUE, PROBS, LABELS, bins=2)

    assert m["images"] == 8
    assert m["accuracy"] == pytest.approx(3 / 8)
    assert m["balanced_accuracy"] == pytest.approx(7 / 18)
    assert m["macro_f1"] == pytest.approx(19 / 63)
    expected = {
        "a": (2 / 4, 2 / 3, 4 / 7, 3),
        "b": (1 / 4, 1 / 2, 1 / 3, 2),
        "c": (0.0, 0.0, 0.0, 3),
        "d": (0.0, 0.0, 0.0, 0),
    }
    assert list(m["per_class"]) == LABELS
    for label, (precision, recall, f1, support) in expected.items():
        got = m["per_class"][label]
        assert got["precision"] == pytest.approx(precision), label
        assert got["recall"] == pytest.approx(recall), label
        assert got["f1"] == pytest.approx(f1), label
        assert got["support"] == support and isinstance(got["support"], int), label
    assert all(type(m[k]) is float for k in ("accuracy", "balanced_accuracy", "macro_f1", "ece"))


def test_a_slice_is_scored_on_its_own_classes():
    """The two b images alone: a is predicted once but absent, so only b's recall (1/2) and F1
    (precision 1/1, recall 1/2: 2/3) are averaged, without a warning about it."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics(Y_TRUE[3:5], PROBS[3:5], LABELS, bins=2)
    assert m["accuracy"] == pytest.approx(1 / 2)
    assert m["balanced_accuracy"] == pytest.approx(1 / 2)
    assert m["macro_f1"] == pytest.approx(2 / 3)
    assert m["per_class"]["a"]["precision"] == 0.0 and m["per_class"]["a"]["support"] == 0


def test_calibration_bins_are_left_closed_and_keep_empty_bins():
    """Two bins: [0, 0.5) holds the three wrong 0.3-0.4 images; [0.5, 1] the other five (0.5,
    on the edge, included), mean confidence 3.5/5 = 0.7, accuracy 3/5. ECE = 3/8 * |0 - 1.1/3|
    + 5/8 * |0.6 - 0.7| = 0.2. With four bins the first is empty and still listed."""
    two = calibration_bins(Y_TRUE, PROBS, 2)
    assert [(r["bin"], r["lower"], r["upper"], r["count"]) for r in two] == [
        (0, 0.0, 0.5, 3),
        (1, 0.5, 1.0, 5),
    ]
    assert two[0]["confidence"] == pytest.approx(1.1 / 3) and two[0]["accuracy"] == 0.0
    assert two[1]["confidence"] == pytest.approx(0.7) and two[1]["accuracy"] == pytest.approx(0.6)
    assert expected_calibration_error(Y_TRUE, PROBS, 2) == pytest.approx(0.2)
    assert classification_metrics(Y_TRUE, PROBS, LABELS, bins=2)["ece"] == pytest.approx(0.2)

    four = calibration_bins(Y_TRUE, PROBS, 4)
    assert [r["count"] for r in four] == [0, 3, 3, 2]
    assert (four[0]["confidence"], four[0]["accuracy"]) == (0.0, 0.0)


def test_no_images_scores_zero_and_a_wrong_shape_is_named():
    """An empty set of images scores 0 throughout (scikit-learn would refuse it); probabilities
    of the wrong shape are an error naming both shapes."""
    m = classification_metrics([], np.zeros((0, 4)), LABELS)
    assert m["images"] == 0 and m["accuracy"] == m["balanced_accuracy"] == m["ece"] == 0.0
    assert m["per_class"]["a"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    with pytest.raises(ValueError, match=r"expected probabilities of shape \(8, 3\), got \(8, 4\)"):
        classification_metrics(Y_TRUE, PROBS, LABELS[:3])


def _skewed_validation(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 3-class validation set (80/15/5%) scored by a model that leans to the common class:
    the rare classes' true scores are real but smaller than the common class's bias."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1, 2], [160, 30, 10])
    logits = rng.normal(0.0, 1.0, (len(y), 3))
    logits[np.arange(len(y)), y] += 2.0
    logits[:, 0] += 1.5  # the common class's extra bias
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs, np.array([800, 150, 50])


def _scores(y: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    scores = classification_metrics(y, probs, ["a", "b", "c"])
    return scores["accuracy"], scores["balanced_accuracy"]


def test_prior_correction_trades_accuracy_for_balanced_accuracy_as_weighted():
    """balance 1 fits a negative scale (toward the rare classes) that raises balanced accuracy;
    balance 0 never lowers accuracy; each chosen offset is tau * log(prior), and the corrected
    probabilities are the softmax of the shifted log-probabilities (rows sum to 1)."""
    y, probs, counts = _skewed_validation()
    accuracy, balanced = _scores(y, probs)
    log_prior = np.log(counts / counts.sum())

    tau, shift = prior_correction(y, probs, counts, balance=1.0)
    assert tau < 0
    np.testing.assert_allclose(shift, tau * log_prior)
    corrected = shift_probabilities(probs, shift)
    np.testing.assert_allclose(corrected.sum(axis=1), 1.0)
    np.testing.assert_array_equal(corrected.argmax(axis=1), (np.log(probs) + shift).argmax(axis=1))
    assert _scores(y, corrected)[1] > balanced + 0.05

    tau0, shift0 = prior_correction(y, probs, counts, balance=0.0)
    assert _scores(y, shift_probabilities(probs, shift0))[0] >= accuracy
    assert tau0 > tau


def test_prior_correction_that_cannot_help_is_none():
    """A model already right on every validation image keeps its decision: tau 0, no shift,
    whatever the weight; a class absent from training gets no offset."""
    y = np.array([0, 0, 1, 2])
    probs = np.eye(3)[y] * 0.9 + 0.1 / 3
    for balance in (0.0, 0.5, 1.0):
        tau, shift = prior_correction(y, probs, [2, 1, 1], balance)
        assert tau == 0.0 and not shift.any()
    _, shift = prior_correction(*_skewed_validation()[:2], [800, 150, 0], balance=1.0)
    assert shift[2] == 0.0


def test_fitted_temperature_calibrates_an_overconfident_model():
    """Scores built to be overconfident (calibrated logits tripled): the temperature fitted on
    them is near 3, lowers the ECE several-fold and keeps every decision."""
    from imgpipe.evaluation.metrics import (
        expected_calibration_error,
        fit_temperature,
        shift_probabilities,
    )

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4000, 4)) * 1.5
    calibrated = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(4, p=p) for p in calibrated])
    overconfident = shift_probabilities(calibrated, 0.0, 1 / 3)

    temperature = fit_temperature(labels, lambda t: shift_probabilities(overconfident, 0.0, t))
    tempered = shift_probabilities(overconfident, 0.0, temperature)
    before = expected_calibration_error(labels, overconfident, 10)
    after = expected_calibration_error(labels, tempered, 10)
    assert 2.6 < temperature < 3.4, temperature
    assert before > 0.1 and after < before / 4, (before, after)
    assert (tempered.argmax(axis=1) == overconfident.argmax(axis=1)).all()


def test_group_metrics_score_the_groups_of_the_actual_and_predicted_classes():
    """Groups {a, b} and {c, d} of the worked example: the b predicted a and the a predicted b
    count as right, the three c images (predicted a or b) as wrong: 5 of 8, and the group of c
    and d has recall 0."""
    groups = {"ab": ["a", "b"], "cd": ["c", "d"]}
    m = group_metrics(Y_TRUE, PROBS.argmax(axis=1), LABELS, groups)
    assert m["images"] == 8 and m["accuracy"] == pytest.approx(5 / 8)
    assert m["per_class"]["ab"]["recall"] == 1.0 and m["per_class"]["cd"]["recall"] == 0.0
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    assert list(group_index(groups, LABELS)) == [0, 0, 1, 1]


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ({"ab": ["a", "b"], "ce": ["c", "e"]}, r"names class\(es\) \['e'\]"),
        ({"ab": ["a", "b"], "bc": ["b", "c", "d"]}, "class b is in ab and bc"),
        ({"ab": ["a", "b"], "c": ["c"]}, r"leaves out class\(es\) \['d'\]"),
    ],
)
def test_class_groups_that_do_not_partition_the_classes_are_refused_by_name(groups, message):
    from imgpipe.core.errors import InputError

    with pytest.raises(InputError, match=message):
        group_index(groups, LABELS, "evaluate.class_groups")


def test_the_decision_objective_is_accuracy_by_default_and_a_weight_otherwise():
    """params.yaml's default serves the network's own decision (nothing fitted); a named or
    weighted objective fits one; a weight outside (0, 1] or an unknown name is refused."""
    from conftest import params

    from imgpipe.core.params import ParamsError

    assert params("finetune").objective == "accuracy" and params("finetune").balance is None
    assert params("finetune", objective="balanced_accuracy").balance == 1.0
    assert params("finetune", objective=0.25).balance == 0.25
    for wrong in (0.0, 1.5, "balanced"):
        with pytest.raises(ParamsError, match=r"finetune\.objective"):
            params("finetune", objective=wrong)
