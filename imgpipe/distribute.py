"""How the training stages use the hardware: which ``tf.distribute`` strategy they run under,
how the batch and the learning rate scale with it, and in which precision they compute.

Strategy, chosen from what is visible:

- ``TF_CONFIG`` naming a cluster of more than one task (a multi-worker job: Kubeflow Trainer's
  pods, or local processes on 127.0.0.1): ``MultiWorkerMirroredStrategy``, every GPU (or the
  CPU) of every worker a replica, gradients all-reduced across workers every step.
- More than one visible GPU: ``MirroredStrategy`` over all of them.
- Otherwise, more than one logical CPU device (set up with
  ``tf.config.set_logical_device_configuration``, as the tests and ``make bench`` do): the same
  ``MirroredStrategy`` over those, a CPU stand-in for a multi-GPU node.
- Otherwise the default strategy: one device, exactly the single-device code path.

Scaling rule (one, in docs/training.md): ``batch_size`` in params.yaml is **per replica**;
the global batch is ``batch_size * replicas`` and the learning rate is multiplied by the number
of replicas (the linear scaling rule of Goyal et al. 2017). One replica changes nothing, and
N replicas with per-replica batch B take the same steps as one device with batch N*B at N
times the rate.

Precision: ``mixed_float16`` (float16 compute, float32 variables, dynamic loss scaling) for the
base, while the head and its softmax stay float32; the saved model is float32 throughout.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any

from imgpipe.errors import InputError

log = logging.getLogger(__name__)

MIXED, FLOAT32 = "mixed_float16", "float32"
COLLECTIVE_TIMEOUT_SECONDS = 120
"""How long a multi-worker all-reduce may wait for a peer before it fails (the coordination
service's heartbeat usually notices a dead worker sooner, in about 10 s)."""


def cluster() -> dict[str, Any] | None:
    """``TF_CONFIG``, when it names a cluster of more than one task; else None. A malformed
    value is an error naming the variable."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None
    try:
        config = json.loads(raw)
        tasks = sum(len(hosts) for hosts in config["cluster"].values())
        config["task"]["type"], int(config["task"]["index"])
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise InputError(
            "TF_CONFIG must be JSON like "
            '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}'
            f": {error!r} in {raw[:200]!r}"
        ) from error
    return config if tasks > 1 else None


def is_chief() -> bool:
    """Whether this process writes what the job produces: always, except in a multi-worker
    cluster, where only the ``chief`` task (or worker 0 when there is none) does."""
    config = cluster()
    if config is None:
        return True
    task = config["task"]
    if "chief" in config["cluster"]:
        return bool(task["type"] == "chief")
    return bool(task["type"] == "worker" and int(task["index"]) == 0)


@functools.cache
def strategy() -> Any:
    """The strategy for what is visible (see the module docstring), one per process: two
    MirroredStrategy objects in one process would share collective-op keys, which fails. Under
    ``TF_CONFIG`` it must come before any other TensorFlow op of the process."""
    import tensorflow as tf

    if cluster() is not None:
        options = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=COLLECTIVE_TIMEOUT_SECONDS
        )
        chosen = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        log.info(
            "distribute: MultiWorkerMirroredStrategy, %d replicas in all",
            chosen.num_replicas_in_sync,
        )
        return chosen
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


def precision(mixed: bool | None) -> str:
    """The dtype policy name for the ``mixed_precision`` param: ``mixed_float16`` when true, or
    when null and a GPU is visible (on CPUs float16 is slower, not faster); else float32."""
    if mixed is None:
        import tensorflow as tf

        mixed = bool(tf.config.list_logical_devices("GPU"))
    return MIXED if mixed else FLOAT32


def set_precision(model: Any, policy: str, keep_float32: str) -> None:
    """Set ``policy`` on every layer of ``model`` (nested models included) but the submodel
    named ``keep_float32`` and its layers, which stay float32 (the head: its softmax and loss
    in float16 would underflow). Variables stay float32 either way; only the computation of
    the next call changes, so a trained model can switch in both directions."""
    import keras

    def visit(layer: Any) -> None:
        if layer.name == keep_float32:
            return
        layer.dtype_policy = keras.DTypePolicy(policy)
        for inner in getattr(layer, "layers", ()):
            visit(inner)

    visit(model)
