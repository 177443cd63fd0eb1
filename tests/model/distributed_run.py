"""Train and fine-tune a tiny project on N logical CPU devices, in a process of its own:
logical devices must be configured before TensorFlow starts, so the mirrored run cannot share
the test process. Usage: distributed_run.py ROOT OUT REPLICAS BATCH_SCALE.

The per-replica batch and the learning rate are multiplied by BATCH_SCALE, so one device at
scale 2 and two replicas at scale 1 take the same global batches at the same rate
(imgpipe.model.distribute.scaled)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

TRAIN = {"seed": 42, "batch_size": 12, "epochs": 2, "learning_rate": 0.001, "dropout": 0.0}
FINETUNE = {"seed": 42, "batch_size": 6, "epochs": 2, "learning_rate": 0.0001}
# The replicas and workers are compared on fine-tuning itself: the quantized epoch after it
# runs on the chief alone (quantization_aware_epochs 0 here).
FINETUNE_FIXED = {
    "unfreeze_layers": 20,
    "early_stopping_patience": 2,
    "quantization_aware_epochs": 0,
}
MODEL = {"backbone": "efficientnet_lite0", "weights": "imagenet", "image_size": 32}


def scaled(section: dict[str, Any], scale: int) -> dict[str, Any]:
    """``section`` with its batch size and learning rate multiplied by ``scale``."""
    return {
        **section,
        "batch_size": section["batch_size"] * scale,
        "learning_rate": section["learning_rate"] * scale,
    }


def main(root: Path, out: Path, replicas: int, scale: int) -> None:
    import tensorflow as tf

    if replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)]
        )
    sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: conftest
    from conftest import params

    from components import finetune, train

    model = params("model", **MODEL)
    train.run(
        augmented=root / "outputs" / "augment" / "shards",
        dataset=root / "outputs" / "ingest",
        out=out / "train",
        summary=out / "train.json",
        history=out / "train_history.csv",
        feature_cache=out / "cache",
        model=model,
        train=params("train", **scaled(TRAIN, scale), class_weights=False),
        progress=False,
    )
    finetune.run(
        trained=out / "train" / "model.keras",
        dataset=root / "outputs" / "ingest",
        frozen_history=out / "train_history.csv",
        out=out / "finetune",
        summary=out / "finetune.json",
        history=out / "finetune_history.csv",
        checkpoints=out / "checkpoints",
        model=model,
        finetune=params("finetune", **scaled(FINETUNE, scale), **FINETUNE_FIXED),
        augment=params("augment"),
        train=params("train", **scaled(TRAIN, scale), class_weights=False),
        progress=False,
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
