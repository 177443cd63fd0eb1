"""Grad-CAM (imgpipe.model.saliency) on a classifier whose answer depends on one region only."""

from __future__ import annotations

import numpy as np


def test_grad_cam_lights_up_the_region_that_decides_the_class():
    """A "base" that average-pools the image to a 4x4 map and a head that reads class 1 off
    the red channel: for an image red only in its top-left quadrant, the map for class 1
    peaks there and is 0 in the other quadrants (away from the upsampling seam); maps are in
    [0, 1], at the image's size."""
    import keras

    from imgpipe.model.backbones import BASE_NAME
    from imgpipe.model.saliency import grad_cam
    from imgpipe.model.training import assemble, build_head

    inputs = keras.Input((32, 32, 3))
    base = keras.Model(inputs, keras.layers.AveragePooling2D(8)(inputs), name=BASE_NAME)
    head = build_head(3, 2, dropout=0.0, hidden_units=0, seed=0)
    head.get_layer("probabilities").set_weights(
        [np.array([[-0.001, 0.001], [0.0, 0.0], [0.0, 0.0]], "float32"), np.zeros(2, "float32")]
    )
    model = assemble(base, head)
    image = np.zeros((1, 32, 32, 3), "float32")
    image[0, :16, :16, 0] = 255.0

    heat = grad_cam(model, image, np.array([1]))[0]

    assert heat.shape == (32, 32) and heat.min() >= 0.0 and heat.max() == 1.0
    assert heat[:16, :16].mean() > 0.5
    for quadrant in (heat[20:, 20:], heat[:12, 20:], heat[20:, :12]):  # beyond the bilinear seam
        assert quadrant.max() < 0.05, quadrant.max()
