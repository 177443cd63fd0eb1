"""Candidate against champion, image by image: the difference in accuracy and in balanced
accuracy on the test images both models may be scored on, with a paired bootstrap interval.

A point of accuracy on a few hundred test images is a handful of images, and the same recipe
retrained with another seed moves by more than that; so the gate does not ask "is the candidate
at most x below the champion" of two point estimates, it asks whether the candidate is worse
than the champion by more than a non-inferiority margin at a stated confidence. Both models are
resampled together (the same images in every bootstrap sample), which is what makes the
interval as narrow as the test set allows.

>>> import numpy as np
>>> labels = np.array([0, 1, 1, 0])
>>> compare(labels, np.array([0, 1, 0, 0]), labels, classes=2, samples=200,
...         confidence=0.9, seed=0)["accuracy"]["difference"]
-0.25
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from imgpipe.core.errors import InputError

if TYPE_CHECKING:
    from imgpipe.core.params import EvaluateParams

GATED = ("accuracy", "balanced_accuracy")
"""The metrics the gate compares with the champion's."""
CHUNK = 256
"""Bootstrap samples drawn at a time (a chunk's weights are CHUNK x images integers)."""


def _balanced(weights: np.ndarray, correct: np.ndarray, onehot: np.ndarray) -> np.ndarray:
    """Balanced accuracy of each weighted resample: the mean recall over the classes the
    resample holds."""
    hits = weights @ (onehot * correct[:, None])
    counts = weights @ onehot
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(counts > 0, hits / counts, np.nan)
    return np.nanmean(recall, axis=1)


def compare(
    labels: np.ndarray,
    candidate: np.ndarray,
    champion: np.ndarray,
    *,
    classes: int,
    samples: int,
    confidence: float,
    seed: int = 0,
) -> dict[str, Any]:
    """The candidate's minus the champion's accuracy and balanced accuracy on the same images
    (``labels``, and each model's predicted class per image), each with its two-sided
    ``confidence`` interval from ``samples`` paired bootstrap resamples."""
    labels, candidate, champion = (np.asarray(a) for a in (labels, candidate, champion))
    n = len(labels)
    if n == 0:
        raise InputError("no test image to compare the candidate and the champion on")
    onehot = np.eye(classes)[labels]
    right = {"candidate": candidate == labels, "champion": champion == labels}
    whole = np.ones((1, n))
    point = {
        "accuracy": {k: float(v.mean()) for k, v in right.items()},
        "balanced_accuracy": {k: float(_balanced(whole, v, onehot)[0]) for k, v in right.items()},
    }
    rng = np.random.default_rng(seed)
    drawn: dict[str, list[np.ndarray]] = {"accuracy": [], "balanced_accuracy": []}
    for start in range(0, samples, CHUNK):
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=min(CHUNK, samples - start))
        weights = weights.astype(np.float64)
        c, h = right["candidate"], right["champion"]
        drawn["accuracy"].append((weights @ (c.astype(float) - h)) / n)
        drawn["balanced_accuracy"].append(
            _balanced(weights, c, onehot) - _balanced(weights, h, onehot)
        )
    tail = (1.0 - confidence) / 2
    result: dict[str, Any] = {"images": n, "confidence": confidence, "samples": samples}
    for metric, values in drawn.items():
        spread = np.concatenate(values)
        low, high = np.quantile(spread, [tail, 1.0 - tail])
        result[metric] = {
            "candidate": point[metric]["candidate"],
            "champion": point[metric]["champion"],
            "difference": point[metric]["candidate"] - point[metric]["champion"],
            "low": float(low),
            "high": float(high),
        }
    result["discordant"] = {
        "candidate_only": int((right["candidate"] & ~right["champion"]).sum()),
        "champion_only": int((right["champion"] & ~right["candidate"]).sum()),
    }
    return result


def worse_beyond(difference: dict[str, float], margin: float) -> bool:
    """Whether the whole interval lies below ``-margin``: the candidate is worse than the
    champion by more than the margin, beyond what the test set's noise explains."""
    return difference["high"] < -margin


def bless(
    candidate: dict[str, Any],
    champion: dict[str, Any] | None,
    comparison: dict[str, Any] | None,
    params: EvaluateParams,
) -> dict[str, Any]:
    """The gate's decision, with one reason per check: the floors on the whole test split,
    then, with a champion, non-inferiority on the images both may be scored on."""

    def floor(metric: str, minimum: float) -> dict[str, Any]:
        value = candidate[metric]
        passed = value >= minimum
        return {
            "check": f"min_{metric}",
            "passed": passed,
            "value": value,
            "threshold": minimum,
            "reason": f"{metric} {value:.4f} {'>=' if passed else '<'} minimum {minimum:.4f}",
        }

    checks = [
        floor("accuracy", params.min_accuracy),
        floor("balanced_accuracy", params.min_balanced_accuracy),
    ]
    if champion is not None and comparison is not None:
        checks += _against_champion(champion, comparison, params)
    return {
        "blessed": all(c["passed"] for c in checks),
        "checks": checks,
        "candidate": {k: candidate[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")},
        "champion": champion,
        "comparison": comparison,
        "thresholds": dataclasses.asdict(params) | {"slice_by": list(params.slice_by)},
    }


def _against_champion(
    champion: dict[str, Any], comparison: dict[str, Any], params: EvaluateParams
) -> list[dict[str, Any]]:
    version, images = champion["version"], comparison["images"]
    checks = [_labels_kept(champion, params)] if champion.get("labels_known") else []
    where = (
        "test images neither trained on"
        if champion["lineage"]
        else "test images (the champion's training images are unknown)"
    )
    if images < params.min_compared_images:
        return [
            *checks,
            {
                "check": "comparable",
                "passed": False,
                "value": images,
                "threshold": params.min_compared_images,
                "reason": (
                    f"cannot compare with champion v{version}: only {images} {where} "
                    f"({champion['excluded']} excluded), fewer than "
                    f"evaluate.min_compared_images {params.min_compared_images}"
                ),
            },
        ]
    margin = params.non_inferiority_margin
    for metric in GATED:
        d = comparison[metric]
        worse = worse_beyond(d, margin)
        checks.append(
            {
                "check": f"non_inferior_{metric}",
                "passed": not worse,
                "value": d["difference"],
                "threshold": -margin,
                "interval": [d["low"], d["high"]],
                "reason": (
                    f"{metric} {d['candidate']:.4f} vs champion v{version} {d['champion']:.4f} "
                    f"on {images} {where}: difference "
                    f"{d['difference']:+.4f} ({comparison['confidence']:.0%} interval "
                    f"{d['low']:+.4f} to {d['high']:+.4f}), "
                    + (
                        f"worse beyond the {margin} margin"
                        if worse
                        else f"not worse beyond the {margin} margin"
                    )
                ),
            }
        )
    return checks


def _labels_kept(champion: dict[str, Any], params: EvaluateParams) -> dict[str, Any]:
    """Whether the images the champion trained on kept their labels in today's data."""
    changed, known = champion["relabelled"], champion["labels_known"]
    fraction = changed / known
    passed = fraction <= params.max_relabelled_fraction
    moves = ", ".join(f"{k}: {n}" for k, n in champion["relabelled_by_class"].items())
    return {
        "check": "labels_kept",
        "passed": passed,
        "value": fraction,
        "threshold": params.max_relabelled_fraction,
        "reason": (
            f"{changed} of the {known} images champion v{champion['version']} trained on that "
            f"are still in the data carry another label now ({fraction:.2%}"
            + (f"; {moves}" if moves else "")
            + "), "
            + (
                f"within evaluate.max_relabelled_fraction {params.max_relabelled_fraction}"
                if passed
                else (
                    f"more than evaluate.max_relabelled_fraction "
                    f"{params.max_relabelled_fraction}: review the relabelling, then raise the "
                    "limit for this run if it is meant"
                )
            )
        ),
    }
