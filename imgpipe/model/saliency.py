"""Where the classifier looks: Grad-CAM (Selvaraju et al. 2017) on the base's last feature map,
so a user can tell a crack detector from a border detector in evaluate's misclassified grid."""

from __future__ import annotations

from typing import Any

import numpy as np


def grad_cam(model: Any, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Heat maps in [0, 1], one per image at the image's size, for ``classes`` (one class index
    per image): the base's feature map weighted by the mean gradient of the class's log
    probability over each channel, positive part, bilinearly upsampled.

    ``model`` is a classifier as imgpipe.model.training.assemble builds it (base -> gap -> head)."""
    import tensorflow as tf

    from imgpipe.model.backbones import BASE_NAME
    from imgpipe.model.training import HEAD_NAME, POOLED_LAYER

    base, gap, head = (model.get_layer(n) for n in (BASE_NAME, POOLED_LAYER, HEAD_NAME))
    x = tf.convert_to_tensor(images, tf.float32)
    with tf.GradientTape() as tape:
        features = base(x, training=False)
        tape.watch(features)
        probs = head(gap(features), training=False)
        chosen = tf.gather(probs, tf.convert_to_tensor(classes, tf.int32), axis=1, batch_dims=1)
        score = tf.math.log(tf.maximum(chosen, 1e-12))
    grads = tape.gradient(score, features)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1, keepdims=True))
    cam = tf.image.resize(cam, images.shape[1:3], method="bilinear")[..., 0].numpy()
    peak = cam.reshape(len(cam), -1).max(axis=1)
    return cam / np.where(peak > 0, peak, 1.0)[:, None, None]
