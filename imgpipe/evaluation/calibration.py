"""What is fitted on validation after training and folded into the output layer, so that the
exported graph (SavedModel, TF Serving, TFLite) returns the decisions and scores evaluate sees
(a run that trains on every non-test image folds in the decision fitted out-of-fold instead:
``fold_fitted``):

- softmax head: the prior correction (bias += tau * log prior) and a temperature (kernel and
  bias divided by T: calibrated scores, the same decisions);
- ordinal head (imgpipe.model.ordinal): a temperature fitted first, then the cut-points refitted
  for the decision at that temperature.

The decision is fitted only for an objective other than accuracy (``finetune.objective``); what
was folded in is written beside the model (``Decision``), so evaluate can also score the
network's own decision, the calibrated argmax.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypedDict

import numpy as np

from imgpipe.evaluation.metrics import (
    class_log_prior,
    decision_score,
    expected_calibration_error,
    fit_temperature,
    prior_correction,
    shift_probabilities,
    validation_scores,
)

ECE_BINS = 10
"""Bins of the validation ECE reported before and after calibration (evaluate's test figure
uses ``evaluate.calibration_bins``)."""


class Decision(TypedDict, total=False):
    """What ``fit_output`` folded into the output layer (finetune's decision.json, with the
    ``objective`` it was fitted for)."""

    objective: str | float
    temperature: float
    offset: list[float]
    """Softmax head: the logit offset added to the bias (zeros: the network's own decision)."""
    cutpoints: list[float]
    """Ordinal head: the cut-points served, and those the network trained."""
    trained_cutpoints: list[float]


def fit_output(
    output: Any,
    labels: np.ndarray,
    probs: np.ndarray,
    features: np.ndarray,
    class_counts: np.ndarray,
    balance: float | None,
    calibrate: bool,
) -> tuple[dict[str, Any], Decision]:
    """Fit on validation (``labels``; the model's ``probs``; ``features``, the output layer's
    inputs) and set on ``output`` (the head's ``probabilities`` layer) the decision and the
    temperature; ``balance`` weighs balanced accuracy against accuracy in the decision's fit
    (None: the trained decision). Returns the figures for the summary and the decision."""
    from imgpipe.model import ordinal

    if isinstance(output, ordinal.OrdinalProbabilities):
        return _fit_ordinal(output, labels, features, balance, calibrate)
    return _fit_softmax(output, labels, probs, class_counts, balance, calibrate)


def _figures(
    labels: np.ndarray, before: np.ndarray, after: np.ndarray, temperature: float
) -> dict[str, Any]:
    return {
        "temperature": round(temperature, 6),
        "val_ece_uncalibrated": round(expected_calibration_error(labels, before, ECE_BINS), 6),
        "val_ece": round(expected_calibration_error(labels, after, ECE_BINS), 6),
    }


def _corrected(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    scores = validation_scores(labels, probs)
    return {f"corrected_{k}": round(v, 6) for k, v in scores.items() if k != "val_loss"}


def _fit_softmax(
    output: Any,
    labels: np.ndarray,
    probs: np.ndarray,
    class_counts: np.ndarray,
    balance: float | None,
    calibrate: bool,
) -> tuple[dict[str, Any], Decision]:
    figures: dict[str, Any] = {}
    shift = np.zeros(probs.shape[1])
    if balance is not None:
        tau, shift = prior_correction(labels, probs, class_counts, balance)
        figures = {"prior_tau": tau, **_corrected(labels, shift_probabilities(probs, shift))}
    corrected = shift_probabilities(probs, shift)
    temperature = (
        fit_temperature(labels, lambda t: shift_probabilities(probs, shift, t))
        if calibrate
        else 1.0
    )
    decision = _fold_softmax(output, shift, temperature)
    tempered = shift_probabilities(probs, shift, temperature)
    return {**figures, **_figures(labels, corrected, tempered, temperature)}, decision


def _fold_softmax(output: Any, shift: np.ndarray, temperature: float) -> Decision:
    kernel, bias = output.kernel.numpy(), output.bias.numpy()  # a quantized layer has more
    output.kernel.assign(kernel / temperature)
    output.bias.assign((bias + shift.astype(bias.dtype)) / temperature)
    return Decision(temperature=temperature, offset=[float(v) for v in shift])


def fold_fitted(
    output: Any, temperature: float, tau: float | None, class_counts: np.ndarray
) -> Decision:
    """Fold into ``output`` a decision fitted elsewhere (out-of-fold, ``imgpipe crossval``):
    the ``temperature``, and for a softmax the prior correction ``tau * log prior`` of this
    run's ``class_counts`` (None: the network's own decision). An ordinal head keeps its trained
    cut-points: a fitted one is refused (cut-points fitted on other models' scores do not carry
    over)."""
    from imgpipe.model import ordinal

    if isinstance(output, ordinal.OrdinalProbabilities):
        if tau is not None:
            raise ValueError("an ordinal head takes no out-of-fold prior correction")
        trained = [float(c) for c in np.asarray(output.cutpoints(), np.float64)]
        output.set_decision(np.asarray(trained, np.float64), temperature)
        return Decision(temperature=temperature, cutpoints=trained, trained_cutpoints=trained)
    shift = (tau or 0.0) * class_log_prior(class_counts)
    return _fold_softmax(output, shift, temperature)


CUT_MARGIN = 1e-4
"""The least gap between refitted cut-points, so that their order stays strict."""


def fit_cutpoints(
    y_true: Sequence[int] | np.ndarray,
    scores: np.ndarray,
    start: np.ndarray,
    balance: float,
    temperature: float = 1.0,
    passes: int = 4,
) -> np.ndarray:
    """Increasing cut-points of the ordinal head (imgpipe.model.ordinal) whose argmax decision
    maximises ``(1 - balance) * accuracy + balance * balanced accuracy`` on these validation
    labels and scores: coordinate ascent from ``start`` (the trained ones), each cut-point in
    turn tried at every midpoint between neighbouring validation scores that keeps the order.
    Among equal scores the trained value's neighbourhood wins (ties keep the current
    cut-point)."""
    from imgpipe.evaluation.decisions import coordinate_ascent
    from imgpipe.model.ordinal import probabilities

    actual = np.asarray(y_true, np.int64)
    ordered = np.sort(np.asarray(scores, np.float64))
    midpoints = np.unique((ordered[1:] + ordered[:-1]) / 2)

    def between(cut: np.ndarray, k: int) -> np.ndarray:
        low = cut[k - 1] + CUT_MARGIN if k else -np.inf
        high = cut[k + 1] - CUT_MARGIN if k + 1 < len(cut) else np.inf
        return midpoints[(midpoints > low) & (midpoints < high)]

    return coordinate_ascent(
        lambda cut: decision_score(
            actual, probabilities(scores, cut, temperature).argmax(axis=1), balance
        ),
        start,
        between,
        passes,
    )


def _fit_ordinal(
    output: Any,
    labels: np.ndarray,
    features: np.ndarray,
    balance: float | None,
    calibrate: bool,
) -> tuple[dict[str, Any], Decision]:
    from imgpipe.model import ordinal

    scores = output.scores(features)
    trained = np.asarray(output.cutpoints(), np.float64)
    temperature = (
        fit_temperature(labels, lambda t: ordinal.probabilities(scores, trained, t))
        if calibrate
        else 1.0
    )
    cut = trained
    figures: dict[str, Any] = {}
    if balance is not None:
        cut = fit_cutpoints(labels, scores, trained, balance, temperature)
        figures = _corrected(labels, ordinal.probabilities(scores, cut, temperature))
    output.set_decision(cut, temperature)
    figures["cutpoints"] = [round(float(c), 6) for c in cut]
    before = ordinal.probabilities(scores, cut)
    after = ordinal.probabilities(scores, cut, temperature)
    decision = Decision(
        temperature=temperature,
        cutpoints=[float(c) for c in cut],
        trained_cutpoints=[float(c) for c in trained],
    )
    return {**figures, **_figures(labels, before, after, temperature)}, decision


def untempered(
    network: Any, probs: np.ndarray, temperature: float, predict: Callable[[Any], np.ndarray]
) -> np.ndarray:
    """The probabilities ``network`` (whose output layer holds ``temperature``) gave before
    calibration: for a softmax, softmax(T * log probs) exactly; an ordinal head is asked again
    (``predict``) at temperature 1."""
    from imgpipe.model import ordinal
    from imgpipe.model.training import HEAD_NAME

    output = network.get_layer(HEAD_NAME).get_layer(ordinal.NAME)
    if not isinstance(output, ordinal.OrdinalProbabilities):
        return shift_probabilities(probs, 0.0, 1.0 / temperature)
    output.temperature.assign(1.0)
    try:
        return predict(network)
    finally:
        output.temperature.assign(temperature)


def own_decision(
    network: Any, probs: np.ndarray, decision: Decision, predict: Callable[[Any], np.ndarray]
) -> np.ndarray:
    """The probabilities of ``network``'s own decision, calibrated (the argmax the network
    learned, at the fitted temperature), from ``probs``, what it serves with ``decision`` folded
    in: for a softmax, the offset taken off the logits (exact for a float output layer; a
    quantization-aware one rounds its logits after the offset, so there it is the network's
    decision to within that rounding); an ordinal head is asked again (``predict``) with its
    trained cut-points. Equal to ``probs`` when nothing was fitted."""
    from imgpipe.model import ordinal
    from imgpipe.model.training import HEAD_NAME

    temperature = float(decision["temperature"])
    output = network.get_layer(HEAD_NAME).get_layer(ordinal.NAME)
    if not isinstance(output, ordinal.OrdinalProbabilities):
        offset = np.asarray(decision.get("offset", 0.0), np.float64)
        return shift_probabilities(probs, -offset / temperature)
    served = np.asarray(decision["cutpoints"], np.float64)
    output.set_decision(np.asarray(decision["trained_cutpoints"], np.float64), temperature)
    try:
        return predict(network)
    finally:
        output.set_decision(served, temperature)
