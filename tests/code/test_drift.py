"""The drift tests on samples with a known answer, and when the monitor starts a retraining."""

from __future__ import annotations

import numpy as np

from imgpipe.monitoring.check import decide
from imgpipe.monitoring.drift import class_test, confidence_test, mmd_test


def test_mmd_rarely_alarms_on_the_reference_distribution_and_sees_a_small_shift():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(150, 8))
    same = [
        mmd_test(reference, rng.normal(size=(120, 8)), permutations=200, seed=s).p_value
        for s in range(20)
    ]
    assert sum(p < 0.05 for p in same) <= 3, same  # about 1 in 20 by chance
    shifted = rng.normal(size=(120, 8)) + np.array([0.8] + [0.0] * 7)  # 0.8 sd on one axis
    result = mmd_test(reference, shifted, permutations=200, seed=0)
    assert result.p_value < 0.01 and result.statistic > 0
    again = mmd_test(reference, shifted, permutations=200, seed=0)
    assert again == result  # seeded permutations: the same p-value


def test_class_and_confidence_tests_see_a_changed_mix_and_overconfidence():
    rng = np.random.default_rng(1)

    def probs(n: int, weights: list[float], sharp: float) -> np.ndarray:
        top = rng.choice(3, size=n, p=weights)
        out = np.full((n, 3), (1 - sharp) / 2)
        out[np.arange(n), top] = sharp
        return out

    reference = probs(300, [0.6, 0.3, 0.1], 0.7)
    assert class_test(reference, probs(300, [0.6, 0.3, 0.1], 0.7), 3).p_value > 0.01
    assert class_test(reference, probs(300, [0.3, 0.3, 0.4], 0.7), 3).p_value < 1e-6
    assert confidence_test(reference, probs(300, [0.6, 0.3, 0.1], 0.95)).p_value < 1e-6
    assert confidence_test(reference, probs(300, [0.6, 0.3, 0.1], 0.7)).p_value > 0.01


def test_a_retraining_starts_once_not_twice_and_not_below_the_minimum():
    reasons = ["embedding drift: MMD 0.2, p = 0.001"]
    state: dict = {"retraining": None}
    words, start = decide(state, False, reasons, version=3, minimum=200)
    assert not start and "fewer than 200" in words
    assert decide(state, True, [], version=3, minimum=200) == (
        "no drift, no accuracy drop: nothing to do",
        False,
    )
    words, start = decide(state, True, reasons, version=3, minimum=200)
    assert start and "embedding drift" in words
    state["retraining"] = {"against_version": 3, "started": "20261205T0600", "how": "kfp"}
    words, start = decide(state, True, reasons, version=3, minimum=200)
    assert not start and "already open" in words  # the same drift, checked again
    state["retraining"]["finished"] = True
    assert decide(state, True, reasons, version=3, minimum=200)[1]  # it ended: may start anew
    state["retraining"] = {"against_version": 3, "started": "x", "how": "kfp"}
    assert decide(state, True, reasons, version=4, minimum=200)[1]  # a new champion since
