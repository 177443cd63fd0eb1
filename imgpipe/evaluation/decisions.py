"""Decision rules compared out-of-fold: which way of turning a model's probabilities into a
class serves an objective, scored on images that no fitted number saw.

The network's own decision is its argmax. An objective that weighs the rare classes
(``finetune.objective``: balanced accuracy, or a weight ``w`` of it beside accuracy) needs a
decision fitted on labelled predictions. Each rule below is fitted on the out-of-fold
predictions of all folds but one (``imgpipe crossval``) and decides the fold left out, so a
rule with more free numbers gets no credit for fitting noise:

- ``prior``: one scale ``tau`` of the log training prior added to the logits, what finetune
  serves (:func:`imgpipe.evaluation.metrics.prior_correction`);
- ``prior_by``: a prior correction per value of a metadata column (ELPV: the module type, mono
  or poly), each with that value's own prior and ``tau``, a per-type decision;
- ``offsets``: a free logit offset per class (``K - 1`` numbers);
- ``cutpoints``: for ordered classes, the expected class position ``sum_k p_k k / (K - 1)``
  (ELPV: the expected defect probability), a regression read-out, cut at ``K - 1`` points.

Free numbers are fitted by coordinate ascent on a grid, each in turn, until a round gains
nothing. Pure NumPy: it reads predictions, never a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from imgpipe.evaluation.metrics import (
    PRIOR_SCALES,
    class_log_prior,
    decision_score,
    prior_correction,
    shift_probabilities,
)

RULES = ("argmax", "prior", "prior_by", "offsets", "cutpoints")
"""Every rule :func:`compare` knows; ``argmax`` fits nothing and is the yardstick."""
OFFSET_GRID = np.round(np.arange(-3.0, 3.0001, 0.1), 2)
"""Per-class logit offsets tried, relative to the first class's: ±3 holds every offset ELPV's
fitted prior correction makes (at most 2.5), in steps finer than a few hundred images can
tell apart."""
CUT_QUANTILES = np.linspace(0.01, 0.99, 99)
"""Cut-points tried: these quantiles of the fitted images' expected positions."""
ROUNDS = 5
"""Coordinate-ascent rounds at most (on ELPV's folds the search settles in two or three)."""

Decider = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(probabilities, strata) -> predicted class indices."""
Rule = Callable[[np.ndarray, np.ndarray, np.ndarray, float], Decider]
"""(labels, probabilities, strata, balance) -> a decider fitted on them."""


def coordinate_ascent(
    score: Callable[[np.ndarray], float],
    start: np.ndarray,
    candidates: Callable[[np.ndarray, int], np.ndarray],
    rounds: int = ROUNDS,
) -> np.ndarray:
    """Coordinate ascent from ``start``: each coordinate ``i`` in turn set to the best of
    ``candidates(current, i)`` (ties keep the current value), until a round changes nothing or
    ``rounds`` have run."""
    current = np.asarray(start, np.float64).copy()
    best = score(current)
    for _ in range(rounds):
        moved = False
        for i in range(len(current)):
            for value in candidates(current, i):
                trial = current.copy()
                trial[i] = value
                trial_score = score(trial)
                if trial_score > best + 1e-12:
                    best, current, moved = trial_score, trial, True
        if not moved:
            break
    return current


def _argmax(labels: np.ndarray, probs: np.ndarray, strata: np.ndarray, balance: float) -> Decider:
    return lambda p, s: p.argmax(axis=1)


def _prior(labels: np.ndarray, probs: np.ndarray, strata: np.ndarray, balance: float) -> Decider:
    counts = np.bincount(labels, minlength=probs.shape[1])
    _, shift = prior_correction(labels, probs, counts, balance)
    return lambda p, s: shift_probabilities(p, shift).argmax(axis=1)


def _prior_by(labels: np.ndarray, probs: np.ndarray, strata: np.ndarray, balance: float) -> Decider:
    """A prior correction per stratum, each with its own training prior and its own ``tau``,
    the ``tau`` fitted together for the objective over all images (a stratum's own balanced
    accuracy is not the objective's); a stratum unseen in fitting gets the pooled correction."""
    log_probs = np.log(np.clip(probs, 1e-12, 1.0))
    k = probs.shape[1]
    counts = np.bincount(labels, minlength=k)
    pooled_tau, pooled = prior_correction(labels, probs, counts, balance)
    values = list(np.unique(strata))
    priors = np.stack(
        [class_log_prior(np.bincount(labels[strata == v], minlength=k)) for v in values]
    )
    where = np.searchsorted(values, strata)

    def decide_with(taus: np.ndarray, lp: np.ndarray, at: np.ndarray) -> np.ndarray:
        return (lp + taus[at, None] * priors[at]).argmax(axis=1)

    taus = coordinate_ascent(
        lambda t: decision_score(labels, decide_with(t, log_probs, where), balance),
        np.full(len(values), pooled_tau),
        lambda current, i: PRIOR_SCALES,
    )

    def decide(p: np.ndarray, s: np.ndarray) -> np.ndarray:
        lp = np.log(np.clip(p, 1e-12, 1.0))
        predicted = (lp + pooled).argmax(axis=1)
        known = np.isin(s, values)
        if known.any():
            predicted[known] = decide_with(taus, lp[known], np.searchsorted(values, s[known]))
        return predicted

    return decide


def _offsets(labels: np.ndarray, probs: np.ndarray, strata: np.ndarray, balance: float) -> Decider:
    """A logit offset per class but the first (the first is the reference), from the
    prior correction's as a start."""
    log_probs = np.log(np.clip(probs, 1e-12, 1.0))
    counts = np.bincount(labels, minlength=probs.shape[1])
    tau, _ = prior_correction(labels, probs, counts, balance)
    start = tau * class_log_prior(counts)
    start = np.clip(start - start[0], OFFSET_GRID[0], OFFSET_GRID[-1])
    offset = coordinate_ascent(  # the first class's offset stays 0: the reference
        lambda o: decision_score(labels, (log_probs + o).argmax(axis=1), balance),
        start,
        lambda current, i: OFFSET_GRID if i else np.zeros(0),
    )
    return lambda p, s: (np.log(np.clip(p, 1e-12, 1.0)) + offset).argmax(axis=1)


def expected_position(probs: np.ndarray) -> np.ndarray:
    """``sum_k p_k k / (K - 1)``: where in the ordered classes the probability mass sits, from 0
    (the first class) to 1 (the last)."""
    return probs @ np.linspace(0.0, 1.0, probs.shape[1])


def _cutpoints(
    labels: np.ndarray, probs: np.ndarray, strata: np.ndarray, balance: float
) -> Decider:
    """``K - 1`` cut-points on the expected position, from the classes' midpoints as a start;
    their order is kept by sorting before cutting."""
    position = expected_position(probs)
    k = probs.shape[1]
    grid = np.quantile(position, CUT_QUANTILES)
    cuts = coordinate_ascent(
        lambda c: decision_score(labels, np.searchsorted(np.sort(c), position), balance),
        (np.arange(k - 1) + 0.5) / (k - 1),
        lambda current, i: grid,
    )
    return lambda p, s: np.searchsorted(np.sort(cuts), expected_position(p))


FIT: dict[str, Rule] = {
    "argmax": _argmax,
    "prior": _prior,
    "prior_by": _prior_by,
    "offsets": _offsets,
    "cutpoints": _cutpoints,
}


def nested(
    rule: str,
    labels: np.ndarray,
    probs: np.ndarray,
    folds: np.ndarray,
    balance: float,
    strata: np.ndarray | None = None,
) -> np.ndarray:
    """Each image's class under ``rule`` fitted on the other folds' labels and predictions."""
    strata = np.zeros(len(labels), np.int64) if strata is None else np.asarray(strata)
    predicted = np.empty(len(labels), np.int64)
    for fold in np.unique(folds):
        fitted, held = folds != fold, folds == fold
        decide = FIT[rule](labels[fitted], probs[fitted], strata[fitted], balance)
        predicted[held] = decide(probs[held], strata[held])
    return predicted


def compare(
    labels: np.ndarray,
    probs: np.ndarray,
    folds: np.ndarray,
    classes: Sequence[str],
    balance: float,
    strata: np.ndarray | None = None,
    rules: Sequence[str] = RULES,
) -> dict[str, dict[str, Any]]:
    """Every rule's out-of-fold figures: accuracy, balanced accuracy and the objective over all
    images, each class's recall, and the accuracy, balanced accuracy and objective of each
    fold (their spread is the noise a difference between rules must beat). ``prior_by``
    needs ``strata``."""
    unknown = sorted(set(rules) - set(FIT))
    if unknown:
        raise ValueError(f"unknown decision rules {unknown}; known: {list(FIT)}")
    if "prior_by" in rules and strata is None:
        raise ValueError("the prior_by rule needs strata (a metadata column's values)")
    figures: dict[str, dict[str, Any]] = {}
    for rule in rules:
        predicted = nested(rule, labels, probs, folds, balance, strata)
        per_fold = [
            (
                float((predicted[f] == labels[f]).mean()),
                decision_score(labels[f], predicted[f], 1.0),
                decision_score(labels[f], predicted[f], balance),
            )
            for f in (folds == fold for fold in np.unique(folds))
        ]
        figures[rule] = {
            "accuracy": float((predicted == labels).mean()),
            "balanced_accuracy": decision_score(labels, predicted, 1.0),
            "objective": decision_score(labels, predicted, balance),
            "recall": {
                name: float((predicted[labels == c] == c).mean())
                for c, name in enumerate(classes)
                if (labels == c).any()
            },
            "folds": {
                key: [round(row[i], 6) for row in per_fold]
                for i, key in enumerate(("accuracy", "balanced_accuracy", "objective"))
            },
        }
    return figures
