"""Classification metrics in plain NumPy: one definition for the evaluate stage, the champion
comparison, the metadata slices and the TFLite parity report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, classes: int) -> np.ndarray:
    """``cm[actual, predicted]`` counts."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    return np.bincount(y_true * classes + y_pred, minlength=classes * classes).reshape(
        classes, classes
    )


def calibration_bins(
    y_true: np.ndarray, probs: np.ndarray, bins: int
) -> list[dict[str, float | int]]:
    """Equal-width bins of the top-1 confidence: count, mean confidence and accuracy in each."""
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
    """Sum over bins of |accuracy - confidence| weighted by the bin's share of images."""
    rows = calibration_bins(y_true, probs, bins)
    total = max(1, len(y_true))
    return float(sum(r["count"] / total * abs(r["accuracy"] - r["confidence"]) for r in rows))


def classification_metrics(
    y_true: Sequence[int], probs: np.ndarray, labels: Sequence[str], bins: int = 10
) -> dict[str, Any]:
    """Accuracy, balanced accuracy (mean recall), macro-F1, expected calibration error and
    per-class precision/recall/F1/support. Class averages run over the classes present in
    ``y_true``, so a slice without some class is not punished for it."""
    y_true = np.asarray(y_true, np.int64)
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or probs.shape != (len(y_true), len(labels)):
        raise ValueError(
            f"expected probabilities of shape ({len(y_true)}, {len(labels)}), got {probs.shape}"
        )
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, len(labels))
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = support > 0
    return {
        "images": len(y_true),
        "accuracy": float(tp.sum() / max(1, len(y_true))),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "ece": expected_calibration_error(y_true, probs, bins),
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


def rounded(obj: Any, digits: int = 4) -> Any:
    """``obj`` with every float rounded, for reports people read."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [rounded(v, digits) for v in obj]
    return obj
