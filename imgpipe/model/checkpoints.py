"""Resumable fine-tuning: what a checkpoint must match to be resumed, the per-epoch checkpoint
with its early-stopping state, and the averaged weights it stores.

A run killed at any moment (even ``kill -9`` mid-epoch) continues from the last finished epoch
when rerun with the same inputs and params; with other inputs or params it starts over.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import keras
import numpy as np

from imgpipe.core.fileio import atomic_path, sha256_file, write_json_atomic
from imgpipe.core.params import (
    PER_EPOCH,
    RESUME_IGNORES,
    AugmentParams,
    FinetuneParams,
    ModelParams,
)
from imgpipe.model.distribute import FLOAT32

log = logging.getLogger(__name__)

STATE = "state.json"


def fingerprint(
    train_model: Path,
    files: list[str],
    model: ModelParams,
    params: FinetuneParams,
    views: AugmentParams,
    replicas: int,
    policy: str = FLOAT32,
) -> str:
    """What a checkpoint must match to be resumed: the starting model, the data, the params
    of training and of its views (not ``objective`` or ``calibrate``, which act after it:
    changing them reuses the epochs), the number of replicas (which sets the global batch and
    rate, whatever ``workers`` asked) and the precision actually used (``mixed_precision:
    null`` means another one on another machine)."""
    training: dict[str, Any] = {
        k: v for k, v in dataclasses.asdict(params).items() if k not in RESUME_IGNORES
    }
    training["replicas"] = replicas
    training["precision"] = policy
    drawn = {k: v for k, v in dataclasses.asdict(views).items() if k in VIEW_PARAMS}
    if views.balance_classes == PER_EPOCH:  # which images each epoch draws
        drawn["balance_classes"] = PER_EPOCH
    digest = hashlib.sha256(
        json.dumps([dataclasses.asdict(model), training, drawn], sort_keys=True).encode()
    )
    for path in [str(train_model), *files]:
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


VIEW_PARAMS = (
    "flip_horizontal",
    "flip_vertical",
    "rotate_90",
    "rotation_degrees",
    "zoom",
    "brightness",
    "contrast",
)
"""The augment params that shape fine-tuning's per-epoch views (the others, such as augment's
own seed and view count, concern only the materialised set of the frozen phase; of
``balance_classes`` only ``per_epoch``, which decides the images each epoch draws)."""


class AveragedWeights(keras.callbacks.SwapEMAWeights):
    """Validation and the epoch's checkpoint see the optimizer's moving average of the
    weights; training goes on from the trained weights. Between ``on_epoch_end`` and the next
    ``on_epoch_begin`` the model holds the average and the optimizer the trained weights, and
    that is how checkpoints store them: a run ``resumed`` from one starts in that state.

    Keras has no public way to say that state: ``SwapEMAWeights`` keeps it in the attribute
    ``EMA_IN_MODEL`` names, and its next ``on_epoch_begin`` swaps back when it is set. This is
    the one place that sets it; ``tests/model/test_training.py``'s shim test fails when a Keras
    upgrade renames the attribute or changes what it means."""

    EMA_IN_MODEL = "_ema_weights_in_model"

    def __init__(self, resumed: bool) -> None:
        super().__init__(swap_on_epoch=True)
        if not hasattr(self, self.EMA_IN_MODEL):
            raise RuntimeError(
                f"keras {keras.__version__}: SwapEMAWeights has no {self.EMA_IN_MODEL}; "
                "AveragedWeights cannot resume a checkpoint (imgpipe.model.checkpoints)"
            )
        setattr(self, self.EMA_IN_MODEL, resumed)


class ResumableCheckpoint(keras.callbacks.Callback):
    """A checkpoint each epoch plus, with a ``patience``, early stopping on ``monitor``
    (``val_loss``: lower is better, ``val_accuracy``: higher is better), both resumable: the
    epoch's model (with optimizer state), the kept model and the stopping state survive the
    process. Without a patience every epoch runs and the last one is kept.

    Order makes it crash-safe: the epoch's model is written first, then ``state.json`` (one
    atomic rename) points to it, then older files go. A kill at any point leaves a state that
    names files which exist. In a multi-worker job every worker keeps the same state (the
    monitored value is the job's, read across workers by ``fit_multi_worker``, so all stop
    together) but only the chief writes (``write``), into the folder all of them resume from.
    """

    def __init__(
        self,
        directory: Path,
        key: str,
        monitor: str,
        patience: int | None,
        state: dict[str, Any],
        write: bool = True,
    ) -> None:
        super().__init__()
        self.directory, self.key, self.patience, self.write = directory, key, patience, write
        self.monitor = monitor
        self.sign = 1.0 if monitor.endswith("loss") else -1.0  # minimise sign * value
        self.best = state.get("best", math.inf)
        self.wait = state.get("wait", 0)
        self.best_file = state.get("best_checkpoint")
        self.rows: list[dict[str, Any]] = state.get("history", [])

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = self.sign * float((logs or {}).get(self.monitor, self.sign * math.inf))
        last = f"epoch-{epoch:03d}.keras"
        if self.patience is None or value < self.best:
            self.best, self.wait, self.best_file = value, 0, last
        else:
            self.wait += 1
        stop = self.patience is not None and self.wait >= self.patience
        if stop:
            self.model.stop_training = True
        if not self.write:
            return
        with atomic_path(self.directory / last) as tmp:
            self.model.save(tmp)
        write_json_atomic(
            self.directory / STATE,
            {
                "fingerprint": self.key,
                "epoch": epoch,
                "checkpoint": last,
                "best_checkpoint": self.best_file,
                "best": self.best,
                "wait": self.wait,
                "stopped_early": stop,
                "history": self.rows,
            },
        )
        for old in self.directory.glob("epoch-*.keras"):
            if old.name not in (last, self.best_file):
                old.unlink()


def load_state(directory: Path, key: str, write: bool = True) -> dict[str, Any]:
    """The resumable state in ``directory`` if it matches ``key``; else none, and (when this
    process ``write``s) the folder emptied."""
    state_file = directory / STATE
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        if state.get("fingerprint") == key and (directory / state["checkpoint"]).is_file():
            return state
        log.info(
            "finetune: checkpoints in %s are for other inputs or params; starting over", directory
        )
    if write:
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
    return {}


def kept_epoch(rows: list[dict[str, Any]], params: FinetuneParams) -> int:
    """The epoch ResumableCheckpoint keeps: the last one, or with early stopping the first with
    the best ``monitor`` value."""
    if not rows:
        return -1
    if params.early_stopping_patience is None:
        return int(rows[-1]["epoch"])
    values = [r[params.monitor] for r in rows]
    return int(
        rows[int(np.argmin(values) if params.monitor.endswith("loss") else np.argmax(values))][
            "epoch"
        ]
    )
