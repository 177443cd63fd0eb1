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

Multi-worker: Keras 3's ``fit`` does not run under ``MultiWorkerMirroredStrategy``;
``fit_multi_worker`` is its epoch loop there, and ``lost_worker`` names a dead peer's error.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgpipe.core.errors import InputError

if TYPE_CHECKING:
    import keras

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


def fit_multi_worker(
    model: keras.Model,
    distribution: Any,
    train: Any,
    validation: Any,
    steps: int,
    epochs: range,
    callbacks: list[keras.callbacks.Callback],
) -> None:
    """``fit``'s epoch loop under MultiWorkerMirroredStrategy, which Keras 3's own ``fit``
    does not run (it averages scalar logs along an axis: keras-team/keras#20585). Each step is
    the model's own ``train_step`` (``test_step`` for validation) run on every replica, so the
    math is fit's. The logs are the metrics read afterwards, outside the replicas: their
    variables are summed across every replica of every worker on reading, so each worker sees
    the job's figures (not its own slice) and all of them stop early at the same epoch."""
    import keras
    import tensorflow as tf

    @tf.function
    def train_step(iterator: Any) -> None:
        distribution.run(model.train_step, args=(next(iterator),))

    @tf.function
    def test_step(batch: Any) -> None:
        distribution.run(model.test_step, args=(batch,))

    def results(prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in model.get_metrics_result().items()}

    hooks = keras.callbacks.CallbackList(callbacks, model=model, epochs=epochs.stop, steps=steps)
    batches = iter(distribution.experimental_distribute_dataset(train))
    model.stop_training = False
    hooks.on_train_begin()
    for epoch in epochs:
        model.reset_metrics()
        hooks.on_epoch_begin(epoch)
        for step in range(steps):
            hooks.on_train_batch_begin(step)
            train_step(batches)
            hooks.on_train_batch_end(step)
        logs = results()
        if validation is not None:  # None: every non-test image trains (finetune.train_on)
            model.reset_metrics()
            hooks.on_test_begin()
            for batch in distribution.experimental_distribute_dataset(validation):
                test_step(batch)
            hooks.on_test_end()
            logs |= results("val_")
        hooks.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    hooks.on_train_end()


def lost_worker(error: Exception, checkpoints: Path, epoch: int) -> None:
    """In a multi-worker job, turn the error a dead or unreachable peer causes (a collective
    or the coordination service failing) into one that says so and how to continue."""
    import tensorflow as tf

    peer_errors = (
        tf.errors.UnavailableError,
        tf.errors.DeadlineExceededError,
        tf.errors.AbortedError,
        tf.errors.CancelledError,
        tf.errors.InternalError,
    )
    if cluster() is not None and isinstance(error, peer_errors):
        raise RuntimeError(
            f"finetune: the multi-worker job lost a worker during epoch {epoch} "
            f"({type(error).__name__}: {str(error).splitlines()[0][:300]}); "
            f"rerun the job: it resumes from the last checkpoint in {checkpoints}"
        ) from error
