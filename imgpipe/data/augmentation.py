"""The one home of label-preserving augmentation: the random view of an image that augment
materialises (a few views per image, once) and that fine-tuning draws afresh every epoch.

A view's parameters come from a generator seeded with (seed, image sha256, view key), so a view
depends on nothing else: not on file order, worker count, replicas or a resumed run.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

from imgpipe.core.params import AugmentParams


def view_rng(seed: int, sha256: str, view: int) -> np.random.Generator:
    return np.random.default_rng([seed, int(sha256[:16], 16), view])


def augment(
    image: Image.Image, rng: np.random.Generator, p: AugmentParams
) -> tuple[Image.Image, dict]:
    """One random, label-preserving view of ``image``; returns it and the parameters drawn."""
    drawn = {
        "flip_h": bool(p.flip_horizontal and rng.random() < 0.5),
        "flip_v": bool(p.flip_vertical and rng.random() < 0.5),
        "rot90": int(rng.integers(4)) if p.rotate_90 else 0,
        "angle": float(rng.uniform(-p.rotation_degrees, p.rotation_degrees)),
        "zoom": float(rng.uniform(1 - p.zoom, 1 + p.zoom)),
        "brightness": float(1 + rng.uniform(-p.brightness, p.brightness)),
        "contrast": float(1 + rng.uniform(-p.contrast, p.contrast)),
    }
    if drawn["flip_h"]:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if drawn["flip_v"]:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if drawn["rot90"]:
        image = image.rotate(90 * drawn["rot90"], expand=True)
    # Rotation and zoom as one affine map about the centre: one resampling, not two.
    w, h = image.size
    theta, z = np.deg2rad(drawn["angle"]), drawn["zoom"]
    a, b = np.cos(theta) / z, np.sin(theta) / z
    cx, cy = w / 2, h / 2
    matrix = (a, b, cx - a * cx - b * cy, -b, a, cy + b * cx - a * cy)
    image = image.transform((w, h), Image.Transform.AFFINE, matrix, Image.Resampling.BILINEAR)
    image = ImageEnhance.Brightness(image).enhance(drawn["brightness"])
    image = ImageEnhance.Contrast(image).enhance(drawn["contrast"])
    return image, drawn


def random_view(encoded: bytes, sha256: str, seed: int, key: int, p: AugmentParams) -> np.ndarray:
    """The view ``key`` of an encoded image, as an RGB uint8 array at the image's own size
    (fine-tuning resizes it to the model's input with the same function as every other image)."""
    opened = Image.open(io.BytesIO(encoded))
    image = opened.convert("L" if opened.mode == "L" else "RGB")
    view, _ = augment(image, view_rng(seed, sha256, key), p)
    return np.asarray(view.convert("RGB"))


def tf_random_view(encoded: Any, sha256: Any, seed: int, key: Any, p: AugmentParams) -> Any:
    """``random_view`` inside a tf.data map: uint8 RGB tensor [height, width, 3]."""
    import tensorflow as tf

    def draw(data: bytes, digest: bytes, view_key: np.int64) -> np.ndarray:
        return random_view(data, digest.decode(), seed, int(view_key), p)

    image = tf.numpy_function(draw, [encoded, sha256, key], tf.uint8, stateful=False)
    image.set_shape([None, None, 3])
    return image
