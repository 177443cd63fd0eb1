"""augment: materialise the training set, balanced and augmented, as TFRecord shards.

Every training image appears once as itself (view 0) plus ``views_per_image`` augmented views;
with ``balance_classes`` smaller classes get more augmented views, round robin over their
images, until every class has as many images as the largest. Each view's random parameters come
from a generator seeded with (seed, image sha256, view), so the output is the same on every
run and does not depend on file order. Images are stored at the model's input size, resized by
the same TensorFlow function that prepares validation and test images, so the frozen phase can
compute each image's base features once.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance
from tqdm import tqdm

from imgpipe import backbones
from imgpipe.fileio import atomic_path, sha256_bytes, write_json_atomic
from imgpipe.params import AugmentParams, ModelParams
from imgpipe.tfrecords import ShardRecord, split_files, write_split

SHARDS, VIEWS, PREVIEW = "shards", "views.csv", "preview.png"
PREVIEW_VIEWS = 5


@dataclasses.dataclass(frozen=True)
class Source:
    sha256: str
    label: str
    label_index: int
    filepath: str
    encoded: bytes


def plan_views(labels: Sequence[str], views_per_image: int, balance: bool) -> list[int]:
    """How many views (original included) each image gets, in input order.

    >>> plan_views(["a", "a", "b"], views_per_image=1, balance=True)
    [2, 2, 4]
    """
    counts = Counter(labels)
    target = max(counts.values()) * (1 + views_per_image)
    plan = [1 + views_per_image] * len(labels)
    if balance:
        members: dict[str, list[int]] = defaultdict(list)
        for index, label in enumerate(labels):
            members[label].append(index)
        for indices in members.values():
            base, extra = divmod(target, len(indices))
            for rank, index in enumerate(indices):
                plan[index] = base + (1 if rank < extra else 0)
    return plan


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


def _resize(image: Image.Image, size: int) -> Image.Image:
    """Resize exactly as training and serving do (imgpipe.datasets.decode_and_resize)."""
    import tensorflow as tf

    array = np.asarray(image.convert("RGB"))
    resized = tf.image.resize(array, (size, size), method="bilinear", antialias=True).numpy()
    out = np.clip(np.rint(resized), 0, 255).astype(np.uint8)
    return Image.fromarray(out[..., 0], "L") if image.mode == "L" else Image.fromarray(out, "RGB")


def _materialise(source: Source, view: int, size: int, p: AugmentParams) -> tuple[bytes, dict]:
    opened = Image.open(io.BytesIO(source.encoded))
    image = opened.convert("L" if opened.mode == "L" else "RGB")
    drawn: dict = {}
    if view > 0:
        image, drawn = augment(image, view_rng(p.seed, source.sha256, view), p)
    buffer = io.BytesIO()
    _resize(image, size).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue(), drawn


def load_sources(shards_dir: Path) -> list[Source]:
    from imgpipe.tfrecords import read_records

    records = read_records(split_files(shards_dir, "train"))
    sources = [
        Source(
            r["image/sha256"].decode(),
            r["image/class/text"].decode(),
            int(r["image/class/label"]),
            r["image/filepath"].decode(),
            r["image/encoded"],
        )
        for r in records
    ]
    return sorted(sources, key=lambda s: s.sha256)


def preview_grid(sources: Sequence[Source], size: int, p: AugmentParams, path: Path) -> None:
    """Originals (left column) beside augmented views, a few images from each class."""
    from imgpipe import figures

    plt = figures.pyplot()
    by_class: dict[str, list[Source]] = defaultdict(list)
    for s in sources:
        by_class[s.label].append(s)
    chosen: list[Source] = []
    while len(chosen) < min(p.preview_images, len(sources)):
        for label in sorted(by_class):
            if by_class[label] and len(chosen) < p.preview_images:
                chosen.append(by_class[label].pop(0))
    cols = 1 + PREVIEW_VIEWS
    fig, axes = plt.subplots(
        len(chosen), cols, figsize=(1.6 * cols, 1.7 * len(chosen)), squeeze=False
    )
    for row, source in enumerate(chosen):
        for view in range(cols):
            encoded, _ = _materialise(source, view, size, p)
            ax = axes[row][view]
            ax.imshow(Image.open(io.BytesIO(encoded)).convert("RGB"))
            ax.set_xticks([])
            ax.set_yticks([])
            if view == 0:
                ax.set_ylabel(source.label, fontsize=7)
            if row == 0:
                ax.set_title("original" if view == 0 else f"view {view}", fontsize=8)
    fig.suptitle(f"augment preview (seed {p.seed}, {size}px)", fontsize=9)
    fig.tight_layout()
    figures.save(fig, path, dpi=80)


def run(
    *,
    shards: Path,
    out: Path,
    summary: Path,
    augment: AugmentParams,
    model: ModelParams,
    progress: bool = True,
) -> dict[str, Any]:
    """Materialise the balanced, augmented training set from ingest's train ``shards`` at the
    model's input size into ``out`` (shards/ of split ``train``, views.csv, preview.png)."""
    params, image_size = augment, backbones.image_size(model)
    sources = load_sources(shards)
    plan = plan_views([s.label for s in sources], params.views_per_image, params.balance_classes)
    jobs = [(source, view) for source, n in zip(sources, plan, strict=True) for view in range(n)]
    # A seeded order, so shards mix classes even for readers that do not shuffle.
    jobs = [jobs[i] for i in np.random.default_rng(params.seed).permutation(len(jobs))]

    def work(job: tuple[Source, int]) -> tuple[ShardRecord, dict]:
        source, view = job
        encoded, drawn = _materialise(source, view, image_size, params)
        record = ShardRecord(
            encoded,
            "png",
            source.label_index,
            source.label,
            sha256_bytes(encoded),
            f"{source.filepath}#view{view}",
            image_size,
            image_size,
        )
        return record, {
            "filepath": source.filepath,
            "source_sha256": source.sha256,
            "view": view,
            "label": source.label,
            **drawn,
        }

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(
            tqdm(
                pool.map(work, jobs),
                total=len(jobs),
                desc="augment: materialise",
                unit="img",
                disable=not progress,
            )
        )
    with atomic_path(out) as staged:
        (staged / SHARDS).mkdir(parents=True)
        write_split(staged / SHARDS, "train", [r for r, _ in results], params.images_per_shard)
        columns = [
            "filepath",
            "source_sha256",
            "view",
            "label",
            "flip_h",
            "flip_v",
            "rot90",
            "angle",
            "zoom",
            "brightness",
            "contrast",
        ]
        with open(staged / VIEWS, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n", restval="")
            writer.writeheader()
            writer.writerows(row for _, row in results)
        preview_grid(sources, image_size, params, staged / PREVIEW)
    counts = Counter(r.label for r, _ in results)
    totals = {
        "source_images": len(sources),
        "materialised_images": len(results),
        "augmented_views": sum(1 for _, v in jobs if v > 0),
        "image_size": image_size,
        "classes": dict(sorted(counts.items())),
    }
    write_json_atomic(summary, totals)
    return totals


def metrics(summary: dict[str, Any]) -> dict[str, float]:
    """What MLflow compares of a run's augmentation (also when DVC reused the stage)."""
    return {
        "augment.materialised_images": summary["materialised_images"],
        "augment.augmented_views": summary["augmented_views"],
    }


def log_to_mlflow(out: Path, summary: Path) -> None:
    import mlflow

    mlflow.log_artifact(str(out / PREVIEW), "augment")
    mlflow.log_artifact(str(summary), "augment")


def describe(summary: dict[str, Any]) -> str:
    return (
        f"{summary['materialised_images']} training images at {summary['image_size']}px "
        f"({summary['augmented_views']} augmented views) {summary['classes']}; preview: {PREVIEW}"
    )
