"""Quantization-aware fine-tuning: the layers that let a float Keras model compute what the
full-integer TFLite model will (docs/accuracy.md, int8).

Post-training quantization cannot bring the full-integer model within 0.98 top-1 agreement of
the float one on ELPV: rounding the input to whole grey levels, int8 weights and int8
activations each flip images whose top two classes are nearly tied. Here the float model itself
carries those roundings, the way TensorFlow's QAT does it and the TFLite converter reads it:

- :class:`FakeQuant` rounds a tensor to 256 levels of a range that is fixed (the pixels, 0-255)
  or tracked as a moving average of each batch's min and max while training
  (``tf.quantization.fake_quant_with_min_max_vars``: the converter takes its range as the
  tensor's int8 quantization);
- :class:`QuantizedConv2D` and :class:`QuantizedDepthwiseConv2D` round their kernels per output
  channel to int8's symmetric grid (-127..127, TFLite's per-channel scheme), :class:`QuantizedDense`
  its kernel as a whole, on the way into the op, with a straight-through gradient, so training
  moves the float kernel underneath.

BatchNormalization cannot stay a layer of its own: TFLite folds it into the convolution before
quantizing the kernel, so the kernel the model rounds must be the folded one. The builder of
each backbone's folded, quantized form lives with the backbone (``efficientnet_lite.build``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import keras

PIXELS = (0.0, 255.0)
"""The range of the model's input: whole grey levels, as TFLite's uint8 input carries them."""


@keras.saving.register_keras_serializable(package="imgpipe")
class FakeQuant(keras.layers.Layer):
    """A tensor rounded to 256 levels of [low, high], as int8 with a zero point stores it.

    With ``fixed`` the range is given; otherwise it is tracked while training (and while
    :func:`measure` runs): the first batch's min and max, then their moving average with
    ``momentum``. The range always covers 0, as TFLite's does."""

    def __init__(
        self,
        low: float = 0.0,
        high: float = 0.0,
        fixed: bool = False,
        momentum: float = 0.99,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.initial = (float(low), float(high))
        self.fixed, self.momentum = fixed, momentum
        self.tracking = False

    def build(self, input_shape: Any) -> None:
        low, high = self.initial
        constant = keras.initializers.Constant
        self.low = self.add_weight(shape=(), initializer=constant(low), trainable=False, name="low")
        self.high = self.add_weight(
            shape=(), initializer=constant(high), trainable=False, name="high"
        )
        self.batches = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="batches"
        )

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        import tensorflow as tf

        if (training or self.tracking) and not self.fixed:
            low = tf.minimum(tf.reduce_min(inputs), 0.0)
            high = tf.maximum(tf.reduce_max(inputs), 0.0)
            keep = tf.where(self.batches > 0, self.momentum, 0.0)
            self.low.assign(keep * self.low + (1.0 - keep) * low)
            self.high.assign(keep * self.high + (1.0 - keep) * high)
            self.batches.assign_add(1.0)
        high = tf.maximum(self.high, self.low + 1e-6)
        return tf.quantization.fake_quant_with_min_max_vars(inputs, self.low, high, num_bits=8)

    def get_config(self) -> dict[str, Any]:
        low, high = self.initial
        return {
            **super().get_config(),
            "low": low,
            "high": high,
            "fixed": self.fixed,
            "momentum": self.momentum,
        }


class _RoundedKernel:
    """What the three quantized layers share: the kernel rounded per output channel (its last
    axis) to int8's symmetric grid, -127..127 at scale bound / 127, gradient straight through.

    The bound is each channel's max |w|, measured while training and kept in ``kernel_bound``
    (a constant once the graph is frozen, which the TFLite converter needs to read the
    rounding as the kernel's quantization). :func:`refresh_bounds` measures it again after
    the kernel changed outside training (weight averaging, a folded temperature)."""

    kernel: Any
    kernel_bound: Any
    per_channel = True

    def _add_bound(self, layer: Any, channels: int) -> None:
        self.kernel_bound = layer.add_weight(
            shape=(channels,) if self.per_channel else (),
            initializer="ones",
            trainable=False,
            name="kernel_bound",
        )

    def _measured(self, kernel: Any) -> Any:
        import tensorflow as tf

        axes = list(range(len(kernel.shape) - (1 if self.per_channel else 0)))
        return tf.maximum(tf.reduce_max(tf.abs(kernel), axis=axes), 1e-8)

    def _rounded(self, kernel: Any, training: bool | None) -> Any:
        import tensorflow as tf

        if training:
            self.kernel_bound.assign(self._measured(kernel))
        bound = self.kernel_bound
        rounding = (
            tf.quantization.fake_quant_with_min_max_vars_per_channel
            if self.per_channel
            else tf.quantization.fake_quant_with_min_max_vars
        )
        return rounding(kernel, -bound, bound, num_bits=8, narrow_range=True)

    def refresh_bound(self) -> None:
        self.kernel_bound.assign(self._measured(self._flat_kernel()))

    # Keras' Conv2D and Dense save only kernel and bias: the plain Layer's save and load keep
    # every variable, the bound included.
    def save_own_variables(self, store: Any) -> None:
        keras.layers.Layer.save_own_variables(self, store)  # type: ignore[arg-type]

    def load_own_variables(self, store: Any) -> None:
        keras.layers.Layer.load_own_variables(self, store)  # type: ignore[arg-type]

    def _flat_kernel(self) -> Any:
        return self.kernel

    def _finish(self, outputs: Any) -> Any:
        """The bias and the activation, as the float layer adds them."""
        from keras import ops

        layer: Any = self
        if layer.use_bias:
            outputs = ops.add(outputs, layer.bias)
        return layer.activation(outputs) if layer.activation is not None else outputs


@keras.saving.register_keras_serializable(package="imgpipe")
class QuantizedConv2D(_RoundedKernel, keras.layers.Conv2D):
    """Conv2D (channels last) whose kernel is rounded per output channel to int8's grid."""

    def build(self, input_shape: Any) -> None:
        super().build(input_shape)
        self._add_bound(self, self.filters)

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        return self._finish(self.convolution_op(inputs, self._rounded(self.kernel, training)))


@keras.saving.register_keras_serializable(package="imgpipe")
class QuantizedDepthwiseConv2D(_RoundedKernel, keras.layers.DepthwiseConv2D):
    """DepthwiseConv2D (depth multiplier 1, channels last) whose kernel is rounded per
    channel: the kernel (H, W, C, 1) is rounded as (H, W, C)."""

    def build(self, input_shape: Any) -> None:
        super().build(input_shape)
        self._add_bound(self, int(self.kernel.shape[2]) * self.depth_multiplier)

    def _flat_kernel(self) -> Any:
        from keras import ops

        height, width, channels, multiplier = self.kernel.shape
        return ops.reshape(self.kernel, (height, width, channels * multiplier))

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        from keras import ops

        kernel = ops.reshape(self._rounded(self._flat_kernel(), training), self.kernel.shape)
        outputs = ops.depthwise_conv(
            inputs,
            kernel,
            strides=self.strides,
            padding=self.padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )
        return self._finish(outputs)


@keras.saving.register_keras_serializable(package="imgpipe")
class QuantizedDense(_RoundedKernel, keras.layers.Dense):
    """Dense whose kernel is rounded to int8's grid as a whole (TFLite's fully connected
    layer takes one scale per kernel)."""

    per_channel = False

    def build(self, input_shape: Any) -> None:
        super().build(input_shape)
        self._add_bound(self, self.units)

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        from keras import ops

        outputs = ops.matmul(inputs, self._rounded(self.kernel, training))
        return self._finish(outputs)


def all_layers(model: Any) -> Iterator[Any]:
    """``model`` and every layer inside it, through nested models (Keras's public ``layers``;
    every quantized layer here is a node of a functional graph, never a custom layer's
    attribute)."""
    yield model
    for layer in getattr(model, "layers", ()):
        yield from all_layers(layer)


def refresh_bounds(model: Any) -> int:
    """Measure every rounded kernel's per-channel bound again (after weight averaging swapped
    the kernels, or a temperature was folded into one). Returns the kernels measured."""
    layers = [layer for layer in all_layers(model) if isinstance(layer, _RoundedKernel)]
    for layer in layers:
        layer.refresh_bound()
    return len(layers)


def is_quantized(model: Any) -> bool:
    """Whether ``model`` (or a model inside it) carries fake quantization."""
    return any(isinstance(layer, FakeQuant) for layer in all_layers(model))


def measure(model: Any, batches: Iterable[Any]) -> int:
    """Measure ``model``'s roundings anew: every kernel's bound (:func:`refresh_bounds`), and
    every tracked :class:`FakeQuant` range from ``batches`` of images run through it in
    inference mode (no dropout), the ranges starting over. Returns the batches run."""
    refresh_bounds(model)
    layers = [
        layer for layer in all_layers(model) if isinstance(layer, FakeQuant) and not layer.fixed
    ]
    for layer in layers:
        layer.batches.assign(0.0)
        layer.tracking = True
    count = 0
    try:
        for images in batches:
            model(images, training=False)
            count += 1
    finally:
        for layer in layers:
            layer.tracking = False
    return count
