"""Frozen phase: head training on cached base features against plain ``fit`` through the frozen
base, on the same images, epochs, batches and seed, measured side by side in one process.

    python -m bench.frozen_cache --images 1024 --epochs 3 --repeats 3

Writes JSON (``--out``): per-variant median seconds, the speedup, and the bare cost of one base
forward pass over the images (the floor the cached phase cannot go below).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.machine import describe


def load_images(shards: list[str], size: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    from imgpipe.data.datasets import image_dataset

    xs, ys = [], []
    for x, y in image_dataset(shards, size, 64):
        xs.append(x.numpy())
        ys.append(y.numpy())
        if sum(len(a) for a in ys) >= count:
            break
    return np.concatenate(xs)[:count], np.concatenate(ys)[:count].astype(np.int32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--augmented", default="outputs/augment/shards")
    parser.add_argument("--ingest", default="outputs/ingest")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--val-images", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/frozen_cache.json")
    args = parser.parse_args()

    import keras

    from components.train import extract_features, fit
    from imgpipe.core.params import ModelParams, TrainParams, load_params, section
    from imgpipe.data.labels import read_labels
    from imgpipe.data.tfrecords import split_files
    from imgpipe.model import backbones
    from imgpipe.model.training import assemble, build_head

    params = load_params(args.params)
    model_params = section(ModelParams, "model", params)
    train_params = section(TrainParams, "train", params)
    size = backbones.image_size(model_params)
    classes = len(read_labels(Path(args.ingest) / "labels.txt"))
    x, y = load_images(split_files(Path(args.augmented), "train"), size, args.images)
    vx, vy = load_images(split_files(Path(args.ingest) / "shards", "val"), size, args.val_images)
    base = backbones.create(model_params)
    base.trainable = False

    def dataset(images: np.ndarray, labels: np.ndarray):
        import tensorflow as tf

        return tf.data.Dataset.from_tensor_slices((images, labels)).batch(64)

    def cached() -> float:
        start = time.perf_counter()
        f, fy = extract_features(base, dataset(x, y), len(y), "features", progress=False)
        vf, vfy = extract_features(base, dataset(vx, vy), len(vy), "val features", progress=False)
        head = build_head(
            f.shape[1], classes, train_params.dropout, train_params.hidden_units, train_params.seed
        )
        fit(head, f, fy, (vf, vfy), train_params, classes, epochs=args.epochs)
        return time.perf_counter() - start

    import tensorflow as tf

    pool = keras.layers.GlobalAveragePooling2D()

    @tf.function(reduce_retracing=True)
    def forward(images: Any) -> Any:
        return pool(base(images, training=False))

    def forward_only() -> float:
        """The bare cost: one pass of the base over the same images, through one function
        traced before the timings (the cached phase traces its own, as training does)."""
        start = time.perf_counter()
        for images, _ in [*dataset(x, y), *dataset(vx, vy)]:
            forward(images).numpy()
        return time.perf_counter() - start

    def plain() -> float:
        head = build_head(
            base.output_shape[-1],
            classes,
            train_params.dropout,
            train_params.hidden_units,
            train_params.seed,
        )
        model = assemble(base, head)
        start = time.perf_counter()
        fit(model, x, y, (vx, vy), train_params, classes, epochs=args.epochs)
        return time.perf_counter() - start

    keras.utils.set_random_seed(0)
    forward_only()  # warm-up: traces the forward function once, outside the timings
    variants = {"plain_fit": plain, "cached": cached, "forward_pass": forward_only}
    timings: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_ in range(args.repeats):
        # Interleaved, so drift in machine load hits all alike; the order rotates each round,
        # so no variant always runs first or right after training.
        for name in names[round_ % 3 :] + names[: round_ % 3]:
            timings[name].append(variants[name]())
    median = {k: statistics.median(v) for k, v in timings.items()}
    result = {
        "benchmark": "frozen_phase_cache",
        "machine": describe(),
        "backbone": model_params.backbone,
        "image_size": size,
        "images": len(y),
        "val_images": len(vy),
        "epochs": args.epochs,
        "repeats": args.repeats,
        "seconds": {k: [round(t, 3) for t in v] for k, v in timings.items()},
        "median_seconds": {k: round(v, 3) for k, v in median.items()},
        "speedup_cached_over_plain_fit": round(median["plain_fit"] / median["cached"], 2),
        "cached_over_forward_pass": round(median["cached"] / median["forward_pass"], 3),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
