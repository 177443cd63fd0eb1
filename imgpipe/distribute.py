"""Which ``tf.distribute`` strategy the training stages run under, and how the batch and the
learning rate scale with it.

- More than one visible GPU: ``MirroredStrategy`` over all of them (one replica per GPU,
  gradients all-reduced every step).
- Otherwise, more than one logical CPU device (set up with
  ``tf.config.set_logical_device_configuration``, as the tests and ``make bench`` do): the same
  ``MirroredStrategy`` over those, a CPU stand-in for a multi-GPU node.
- Otherwise the default strategy: one device, exactly the single-device code path.

Scaling rule (one, documented in the README): ``batch_size`` in params.yaml is **per replica**;
the global batch is ``batch_size * replicas`` and the learning rate is multiplied by the number
of replicas (the linear scaling rule of Goyal et al. 2017). One replica changes nothing, and
N replicas with per-replica batch B take the same steps as one device with batch N*B at N
times the rate.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

log = logging.getLogger(__name__)


@functools.cache
def strategy() -> Any:
    """The strategy for what is visible (see the module docstring), one per process: two
    MirroredStrategy objects in one process would share collective-op keys, which fails."""
    import tensorflow as tf

    for kind in ("GPU", "CPU"):
        devices = [d.name for d in tf.config.list_logical_devices(kind)]
        if len(devices) > 1:
            log.info("distribute: MirroredStrategy over %d %s devices", len(devices), kind)
            return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.get_strategy()


def scaled(batch_size: int, learning_rate: float, replicas: int) -> tuple[int, float]:
    """The global batch and learning rate for ``replicas`` replicas of a per-replica
    ``batch_size`` and single-device ``learning_rate``."""
    return batch_size * replicas, learning_rate * replicas
