"""Input pipeline against training: the images/s the tf.data pipeline alone delivers (read,
decode, resize, batch, prefetch, exactly as fine-tuning builds it) against the images/s one
fine-tuning step consumes on batches already in memory, measured in one process.

    python -m bench.training --images 512 --steps 8 --repeats 3

The pipeline is not the bottleneck when its rate is above the step's. Also reports the
throughput the last ``dvc repro`` measured over whole fine-tuning epochs (metrics/finetune.json).
Needs ``outputs/`` from ``make demo``. Writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from bench.machine import describe, require


def pipeline_rate(files: list[str], size: int, batch: int, images: int, seed: int) -> float:
    """Images/s of the training input pipeline alone, over ``images`` images."""
    from imgpipe.data.datasets import image_dataset

    steps = math.ceil(images / batch)
    dataset = image_dataset(files, size, batch, shuffle_seed=seed)
    iterator = iter(dataset.repeat())
    next(iterator)  # builds the pipeline and fills the shuffle buffer, outside the timing
    started = time.perf_counter()
    seen = sum(int(next(iterator)[1].shape[0]) for _ in range(steps))
    return seen / (time.perf_counter() - started)


def step_rate(model: Any, x: Any, y: Any, steps: int) -> float:
    """Images/s of ``model.train_on_batch`` on one batch held in memory."""
    started = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return steps * int(x.shape[0]) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--outputs", type=Path, default=Path("outputs"))
    parser.add_argument("--images", type=int, default=512, help="per pipeline round")
    parser.add_argument("--steps", type=int, default=8, help="training steps per round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/training.json"))
    args = parser.parse_args()

    from components.finetune import prepare
    from imgpipe.core.params import FinetuneParams, ModelParams, load_params, section
    from imgpipe.data.tfrecords import count_records, split_files
    from imgpipe.model import backbones

    params = load_params(args.params)
    model_params = section(ModelParams, "model", params)
    finetune = section(FinetuneParams, "finetune", params)
    size = backbones.image_size(model_params)
    files = split_files(require(args.outputs / "augment" / "shards"), "train")
    steps_per_epoch = math.ceil(count_records(files) / finetune.batch_size)
    model, trainable = prepare(
        require(args.outputs / "train" / "model.keras"),
        model_params,
        finetune,
        steps_per_epoch,
        finetune.learning_rate,
    )

    from imgpipe.data.datasets import image_dataset

    x, y = next(iter(image_dataset(files, size, finetune.batch_size)))
    model.train_on_batch(x, y)  # traces the train step, outside the timing
    rounds: dict[str, list[float]] = {"pipeline": [], "train_step": []}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        rounds["pipeline"].append(
            pipeline_rate(files, size, finetune.batch_size, args.images, finetune.seed)
        )
        rounds["train_step"].append(step_rate(model, x, y, args.steps))
    median = {k: round(statistics.median(v), 1) for k, v in rounds.items()}
    report = {
        "benchmark": "training",
        "machine": describe(),
        "backbone": model_params.backbone,
        "image_size": size,
        "batch_size": finetune.batch_size,
        "trainable_base_layers": trainable,
        "repeats": args.repeats,
        "images_per_second": {k: [round(r, 1) for r in v] for k, v in rounds.items()},
        "median_images_per_second": median,
        "pipeline_over_train_step": round(median["pipeline"] / median["train_step"], 2),
        "finetune_fit_images_per_second": _fit_rate(Path("metrics/finetune.json")),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def _fit_rate(path: Path) -> float | None:
    """Images/s over whole fine-tuning epochs (forward, backward, input pipeline and
    validation), as the last ``dvc repro`` measured it."""
    if not path.is_file():
        return None
    return json.loads(path.read_text())["finetune"].get("images_per_second")


if __name__ == "__main__":
    main()
