"""An ordinal output for ordered labels (ELPV: defect probability 0 < 1/3 < 2/3 < 1).

A cumulative-logit (proportional odds) layer: one score ``s = w . x`` per image and ``K - 1``
increasing cut-points ``t``; ``P(y > k) = sigmoid((s - t_k) / T)`` and the class probabilities
are the differences of those. Trained with the usual sparse categorical cross-entropy on the
class probabilities (the cumulative model's likelihood), it knows that confusing 0 with 1/3
costs less than 0 with 1: neighbours share the score axis. The layer returns K class
probabilities like a softmax, so evaluation, export, TF Serving and TFLite are unchanged.

After training the cut-points are refitted on validation
(``imgpipe.evaluation.calibration.fit_cutpoints``), the decision rule
the published ELPV results tune too, and a temperature ``T`` may be fitted for calibration.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from imgpipe.core.errors import InputError

NAME = "probabilities"
"""The output layer's name, the same as the softmax head's."""


def _softplus_inverse(x: np.ndarray) -> np.ndarray:
    return np.log(np.expm1(np.maximum(x, 1e-6)))


@keras.saving.register_keras_serializable(package="imgpipe")
class OrdinalProbabilities(keras.layers.Layer):
    """Features -> K class probabilities of a cumulative-logit model.

    The cut-points are ``first`` followed by ``first + cumsum(softplus(gaps))``: increasing
    whatever the optimizer does. ``temperature`` (not trained) divides score and cut-points.

    >>> layer = OrdinalProbabilities(4, name="probabilities")
    >>> layer(np.zeros((2, 1280), "float32")).shape
    (2, 4)
    """

    def __init__(self, classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if classes < 2:
            raise InputError(f"an ordinal output needs at least 2 classes, got {classes}")
        self.classes = classes

    def build(self, input_shape: Sequence[int | None]) -> None:
        features = input_shape[-1]
        if features is None:
            raise InputError("OrdinalProbabilities needs a known number of input features")
        self.kernel = self.add_weight(
            shape=(int(features), 1), initializer="glorot_uniform", name="kernel"
        )
        self.first = self.add_weight(
            shape=(1,), initializer=keras.initializers.Constant(-1.0), name="first"
        )
        gaps = float(_softplus_inverse(np.array(2.0 / max(1, self.classes - 2))))
        self.gaps = self.add_weight(
            shape=(self.classes - 2,), initializer=keras.initializers.Constant(gaps), name="gaps"
        )
        self.temperature = self.add_weight(
            shape=(), initializer="ones", trainable=False, name="temperature"
        )

    def cutpoints(self) -> Any:
        ops = keras.ops
        steps = ops.cumsum(ops.softplus(self.gaps))
        return ops.concatenate([self.first, self.first + steps])

    def call(self, inputs: Any) -> Any:
        ops = keras.ops
        score = ops.matmul(inputs, ops.cast(self.kernel, inputs.dtype))
        cut = ops.cast(self.cutpoints(), inputs.dtype)
        above = ops.sigmoid((score - cut[None, :]) / ops.cast(self.temperature, inputs.dtype))
        ones = ops.ones_like(above[:, :1])
        upper = ops.concatenate([ones, above], axis=1)  # P(y > k - 1), k = 0..K-1
        lower = ops.concatenate([above, ops.zeros_like(ones)], axis=1)  # P(y > k)
        return ops.maximum(upper - lower, 0.0)

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple[int | None, int]:
        return (input_shape[0], self.classes)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "classes": self.classes}

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Each image's score ``w . x`` (before the temperature)."""
        return np.asarray(features, np.float64) @ np.asarray(self.kernel, np.float64)[:, 0]

    def set_decision(self, cutpoints: np.ndarray, temperature: float) -> None:
        """New increasing cut-points and temperature (what ``fit_cutpoints`` and the
        calibration fitted on validation)."""
        cut = np.asarray(cutpoints, np.float64)
        if np.any(np.diff(cut) <= 0):
            raise InputError(f"cut-points must increase, got {cut.tolist()}")
        self.first.assign(cut[:1].astype("float32"))
        self.gaps.assign(_softplus_inverse(np.diff(cut)).astype("float32"))
        self.temperature.assign(np.float32(temperature))


def probabilities(
    scores: np.ndarray, cutpoints: np.ndarray, temperature: float = 1.0
) -> np.ndarray:
    """What ``OrdinalProbabilities`` returns, in NumPy, for given scores and cut-points."""
    above = 1.0 / (1.0 + np.exp(-(scores[:, None] - cutpoints[None, :]) / temperature))
    ones = np.ones((len(scores), 1))
    return np.maximum(
        np.concatenate([ones, above], axis=1) - np.concatenate([above, 0 * ones], axis=1), 0.0
    )
