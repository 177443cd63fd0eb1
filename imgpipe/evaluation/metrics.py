"""Classification metrics: one definition for the evaluate stage, the champion comparison, the
metadata slices and the TFLite parity report.

The counts and scores come from scikit-learn (``sklearn.metrics``); only the reliability bins
of the top-1 confidence, and the expected calibration error over them, are computed here (see
``calibration_bins`` for why).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from sklearn import metrics as skm

from imgpipe.core.errors import InputError


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, classes: int) -> np.ndarray:
    """``cm[actual, predicted]`` counts over class indices ``0 .. classes - 1``."""
    return skm.confusion_matrix(
        np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64), labels=np.arange(classes)
    )


def calibration_bins(
    y_true: np.ndarray, probs: np.ndarray, bins: int
) -> list[dict[str, float | int]]:
    """Equal-width bins of the top-1 confidence, ``[lower, upper)`` (the last one closed):
    count, mean confidence and accuracy in each, empty bins included.

    Hand-written because ``sklearn.calibration.calibration_curve`` cannot give this table: it
    returns the means of the non-empty bins only (no counts, which the reliability table and
    the ECE weights need, and no way to tell which bin a mean belongs to), it takes one
    binary outcome per image rather than the top-1 of a multi-class model, and its bins are
    closed on the right, so a confidence on an edge would land one bin lower than here.
    """
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    index = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    rows = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        rows.append(
            {
                "bin": b,
                "lower": b / bins,
                "upper": (b + 1) / bins,
                "count": count,
                "confidence": float(confidence[members].mean()) if count else 0.0,
                "accuracy": float(correct[members].mean()) if count else 0.0,
            }
        )
    return rows


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int) -> float:
    """Sum over bins of |accuracy - confidence| weighted by the bin's share of images
    (scikit-learn has no ECE; it needs the bins above)."""
    rows = calibration_bins(y_true, probs, bins)
    total = max(1, len(y_true))
    return float(sum(r["count"] / total * abs(r["accuracy"] - r["confidence"]) for r in rows))


def classification_metrics(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, labels: Sequence[str], bins: int = 10
) -> dict[str, Any]:
    """Accuracy, balanced accuracy (mean recall), macro-F1, expected calibration error and
    per-class precision/recall/F1/support.

    Class averages run over the classes present in ``y_true``, so a slice without some class
    is not punished for it. A score whose denominator is zero (precision of a class never
    predicted, recall of a class absent from ``y_true``) is 0.
    """
    actual = np.asarray(y_true, np.int64)
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or probs.shape != (len(actual), len(labels)):
        raise InputError(
            f"expected probabilities of shape ({len(actual)}, {len(labels)}), got {probs.shape}"
        )
    return {
        **decision_metrics(actual, probs.argmax(axis=1), labels),
        "ece": expected_calibration_error(actual, probs, bins) if len(actual) else 0.0,
    }


def decision_metrics(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, labels: Sequence[str]
) -> dict[str, Any]:
    """The figures of a decision alone (class indices into ``labels``): accuracy, balanced
    accuracy, macro-F1 and per-class precision/recall/F1/support, averaged as in
    ``classification_metrics``."""
    actual = np.asarray(y_true, np.int64)
    predicted = np.asarray(y_pred, np.int64)
    if not len(actual):  # sklearn refuses empty input: no image, every score 0
        scores = dict.fromkeys(("accuracy", "balanced_accuracy", "macro_f1"), 0.0)
        zero = {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
        return {"images": 0, **scores, "per_class": {label: dict(zero) for label in labels}}
    # Every class, by index, so that a class absent from this slice still has its row.
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        actual, predicted, labels=np.arange(len(labels)), zero_division=0.0
    )
    # Balanced accuracy is the macro recall over the classes present in y_true: what
    # skm.balanced_accuracy_score computes, which has no labels argument and warns on every
    # slice that lacks a class the model predicted.
    present = np.unique(actual)
    averaged = {"labels": present, "average": "macro", "zero_division": 0.0}
    return {
        "images": len(actual),
        "accuracy": float(skm.accuracy_score(actual, predicted)),
        "balanced_accuracy": float(skm.recall_score(actual, predicted, **averaged)),
        "macro_f1": float(skm.f1_score(actual, predicted, **averaged)),
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
    }


def group_index(
    groups: Mapping[str, Sequence[str]], labels: Sequence[str], where: str = "class_groups"
) -> np.ndarray:
    """For each class of ``labels``, the index of its group in ``groups`` (name -> classes):
    every class in exactly one group. An unknown, repeated or left-out class is an InputError
    naming it and ``where`` the groups were declared."""
    unknown = sorted({c for members in groups.values() for c in members} - set(labels))
    if unknown:
        raise InputError(f"{where} names class(es) {unknown} that are not among {list(labels)}")
    owner: dict[str, str] = {}
    for name, members in groups.items():
        for label in members:
            if label in owner:
                raise InputError(f"{where}: class {label} is in {owner[label]} and {name}")
            owner[label] = name
    left_out = [label for label in labels if label not in owner]
    if left_out:
        raise InputError(f"{where} leaves out class(es) {left_out}: put each in one group")
    names = list(groups)
    return np.array([names.index(owner[label]) for label in labels], np.int64)


def group_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    labels: Sequence[str],
    groups: Mapping[str, Sequence[str]],
) -> dict[str, Any]:
    """``decision_metrics`` of the groups of classes: an image's actual and predicted group are
    those of its actual and predicted class (ELPV's 2-class task: functional = defect 0 or
    1/3, defective = 2/3 or 1)."""
    index = group_index(groups, labels)
    actual, predicted = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    return decision_metrics(index[actual], index[predicted], list(groups))


def rounded(obj: Any, digits: int = 4) -> Any:
    """``obj`` with every float rounded, for reports people read."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [rounded(v, digits) for v in obj]
    return obj


def validation_scores(y_true: Sequence[int] | np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean recall over the classes present) and cross-entropy
    loss of ``probs`` on validation labels, from one pass of predictions: the figures a
    training phase reports, so that a recipe's accuracy/balanced-accuracy trade-off is chosen
    on validation. The loss is Keras' sparse categorical cross-entropy (probabilities clipped
    to [1e-7, 1 - 1e-7])."""
    actual = np.asarray(y_true, np.int64)
    probs = np.asarray(probs, np.float64)
    names = [str(i) for i in range(probs.shape[1])]
    scores = classification_metrics(actual, probs, names)
    picked = np.clip(probs[np.arange(len(actual)), actual], 1e-7, 1 - 1e-7)
    return {
        "val_accuracy": float(scores["accuracy"]),
        "val_balanced_accuracy": float(scores["balanced_accuracy"]),
        "val_loss": float(-np.log(picked).mean()),
    }


PRIOR_SCALES = np.round(np.arange(-2.0, 2.0001, 0.05), 2)
"""The scales ``tau`` that prior_correction tries: -2 (toward rare classes) to +2 (toward common
ones), in steps of 0.05."""


def class_log_prior(class_counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """log of the training classes' frequencies; 0 for a class absent from training (its
    logit is left alone by a prior correction)."""
    counts = np.asarray(class_counts, np.float64)
    return np.where(counts > 0, np.log(np.maximum(counts, 1) / counts.sum()), 0.0)


def decision_score(actual: np.ndarray, predicted: np.ndarray, balance: float) -> float:
    """``(1 - balance) * accuracy + balance * balanced accuracy`` (the mean recall over the
    classes present): what a decision fitted for ``finetune.objective`` maximises."""
    accuracy = float((predicted == actual).mean())
    recalls = [(predicted[actual == c] == c).mean() for c in np.unique(actual)]
    return (1.0 - balance) * accuracy + balance * float(np.mean(recalls))


def prior_correction(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    class_counts: Sequence[int] | np.ndarray,
    balance: float,
) -> tuple[float, np.ndarray]:
    """The logit offset ``tau * log(prior)`` (prior: the training split's class frequencies)
    whose argmax decision maximises ``(1 - balance) * accuracy + balance * balanced accuracy``
    on these validation labels, and its ``tau``: one number, fitted on validation, that trades
    accuracy for balanced accuracy (a prior correction, Menon et al. 2021's logit adjustment
    with a fitted scale). Among equal scores the smallest ``|tau|`` wins, so a correction that
    does not help is none. Adding the offset to the output layer's bias applies it in the
    served graph; classes absent from training keep their logit."""
    actual = np.asarray(y_true, np.int64)
    log_prior = class_log_prior(class_counts)
    log_probs = np.log(np.clip(np.asarray(probs, np.float64), 1e-12, 1.0))
    best: tuple[float, float, np.ndarray] = (-np.inf, 0.0, np.zeros_like(log_prior))
    for tau in sorted(PRIOR_SCALES, key=abs):
        offset = tau * log_prior
        score = decision_score(actual, (log_probs + offset).argmax(axis=1), balance)
        if score > best[0] + 1e-12:
            best = (score, float(tau), offset)
    return best[1], best[2]


def decision_text(summary: Mapping[str, Any]) -> str:
    """``served (objective accuracy) accuracy 0.7260, balanced 0.5837; argmax 0.7778, balanced
    0.4740; functional/defective: served 0.8539 (balanced ...), argmax ...``: the test figures
    of both decisions in an evaluate summary, and of its class groups when declared (what
    ``imgpipe summary`` and the stage's log print)."""
    test, own = summary["test"], summary.get("argmax")
    text = (
        f"served (objective {test.get('objective', 'not recorded')}) accuracy "
        f"{test['accuracy']:.4f}, balanced {test['balanced_accuracy']:.4f}"
    )
    if own:
        text += f"; argmax {own['accuracy']:.4f}, balanced {own['balanced_accuracy']:.4f}"
    groups = summary.get("groups")
    if groups:
        names = "/".join(groups["served"]["per_class"])
        text += f"; {names}: " + ", ".join(
            f"{decided} {m['accuracy']:.4f} (balanced {m['balanced_accuracy']:.4f})"
            for decided, m in groups.items()
        )
    return text


def correction_text(result: Mapping[str, Any]) -> str:
    """``0.8015 (balanced 0.6072), tau -0.10``: the prior-corrected validation figures of a
    finetune summary (or of its MLflow metrics, ``finetune.`` prefix dropped); ``""`` when no
    correction was fitted."""
    if "prior_tau" not in result:
        return ""
    return (
        f"{result['corrected_val_accuracy']:.4f} "
        f"(balanced {result['corrected_val_balanced_accuracy']:.4f}), "
        f"tau {result['prior_tau']:+.2f}"
    )


def shift_probabilities(
    probs: np.ndarray, offset: np.ndarray | float = 0.0, temperature: float = 1.0
) -> np.ndarray:
    """softmax((log(probs) + offset) / temperature): the probabilities of a softmax layer whose
    bias moved by ``offset`` and whose kernel and bias were then divided by ``temperature``."""
    logits = (np.log(np.clip(np.asarray(probs, np.float64), 1e-12, 1.0)) + offset) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    shifted = np.exp(logits)
    return shifted / shifted.sum(axis=1, keepdims=True)


TEMPERATURE_BOUNDS = (0.05, 20.0)
"""The search interval of ``fit_temperature``: wide enough for any softmax seen in practice."""


def fit_temperature(
    y_true: Sequence[int] | np.ndarray, tempered: Callable[[float], np.ndarray]
) -> float:
    """The temperature T for which ``tempered(T)`` (a model's validation probabilities at
    temperature T) has the lowest cross-entropy on these labels: temperature scaling (Guo et
    al. 2017), one number that makes an over- (T > 1) or under-confident (T < 1) model's
    scores calibrated. For a softmax, ``lambda t: shift_probabilities(probs, 0, t)``."""
    from scipy.optimize import minimize_scalar

    actual = np.asarray(y_true, np.int64)

    def cross_entropy(log_t: float) -> float:
        picked = tempered(float(np.exp(log_t)))[np.arange(len(actual)), actual]
        return float(-np.log(np.clip(picked, 1e-12, 1.0)).mean())

    low, high = np.log(TEMPERATURE_BOUNDS)
    found = minimize_scalar(cross_entropy, bounds=(low, high), method="bounded")
    return float(np.exp(found.x))
