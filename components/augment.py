"""augment: materialise the training set, balanced and augmented, as TFRecord shards.

Every training image appears once as itself (view 0) plus ``views_per_image`` augmented views;
with ``balance_classes`` smaller classes get more augmented views, round robin over their
images, until every class has as many images as the largest. Each view's random parameters come
from a generator seeded with (seed, image sha256, view), so the output is the same on every
run and does not depend on file order. Each of ingest's train shards is augmented whole by one
worker process (``augment.workers``), into output shards of its own, in an order seeded by
(seed, shard number): the output does not depend on the worker count, and memory holds one
input shard per worker, not the training set. Images are stored at the model's input size,
resized by the same TensorFlow function that prepares validation and test images, so the frozen
phase can compute each image's base features once.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from imgpipe.core.fileio import atomic_path, sha256_bytes, write_json_atomic
from imgpipe.core.parallel import Workers, resolve
from imgpipe.core.params import AugmentParams, ModelParams
from imgpipe.data.augmentation import augment, view_rng
from imgpipe.data.tfrecords import ShardRecord, shard_names, split_files, write_shard
from imgpipe.model import backbones

SHARDS, VIEWS, PREVIEW = "shards", "views.csv", "preview.png"
SHARDS_PER_WORKER = 8
"""With ``augment.workers: null``, one worker per this many input shards at most: a worker's
start (spawn, TensorFlow's import: ~10 s of CPU) must be repaid. Measured on ELPV (4 shards, 2
cores): 1 worker 24 s, 2 workers 31 s."""
THREADS_PER_WORKER = 4
"""Views materialised at once in one worker process (as the single-process stage did before
the pool): enough to overlap the GIL-free image work with the Python around it."""
PREVIEW_VIEWS = 5


@dataclasses.dataclass(frozen=True)
class Source:
    sha256: str
    label: str
    label_index: int
    filepath: str
    encoded: bytes

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Source:
        """From one parsed example of ingest's shards (imgpipe.data.tfrecords.iter_records)."""
        return cls(
            record["image/sha256"].decode(),
            record["image/class/text"].decode(),
            int(record["image/class/label"]),
            record["image/filepath"].decode(),
            record["image/encoded"],
        )


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


def _resize(image: Image.Image, size: int) -> Image.Image:
    """Resize exactly as training and serving do (imgpipe.data.datasets.decode_and_resize)."""
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


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """One input shard and what to make of it: one task of the worker pool."""

    index: int
    """The shard's place among ingest's train shards; with the seed, it orders the output."""
    source: str
    views: tuple[int, ...]
    """Views (original included) of each record, in file order."""
    outputs: tuple[str, ...]
    """The output shard files, ``images_per_shard`` views each."""
    image_size: int
    params: AugmentParams


def _view_row(source: Source, view: int, drawn: dict) -> dict[str, Any]:
    return {
        "filepath": source.filepath,
        "source_sha256": source.sha256,
        "view": view,
        "label": source.label,
        **drawn,
    }


def augment_shard(task: ShardTask) -> list[dict[str, Any]]:
    """Materialise every view of one input shard into its output shards, in an order seeded
    by (seed, shard index); return the views' rows for views.csv, in that order."""
    from imgpipe.data.tfrecords import iter_records

    sources = [Source.from_record(r) for r in iter_records([task.source])]
    if len(sources) != len(task.views):
        raise RuntimeError(f"{task.source} changed while augment read it; rerun augment")
    jobs = [(s, view) for s, n in zip(sources, task.views, strict=True) for view in range(n)]
    # A seeded order, so shards mix classes even for readers that do not shuffle.
    order = np.random.default_rng([task.params.seed, task.index]).permutation(len(jobs))
    rows = []

    def materialise(position: int) -> tuple[bytes, dict[str, Any]]:
        source, view = jobs[position]
        return _materialise(source, view, task.image_size, task.params)

    def records(pool: ThreadPoolExecutor) -> Iterator[ShardRecord]:
        for position, (encoded, drawn) in zip(order, pool.map(materialise, order), strict=True):
            source, view = jobs[position]
            rows.append(_view_row(source, view, drawn))
            yield ShardRecord(
                encoded,
                "png",
                source.label_index,
                source.label,
                sha256_bytes(encoded),
                f"{source.filepath}#view{view}",
                task.image_size,
                task.image_size,
            )

    per_shard = task.params.images_per_shard
    # Threads within the worker too: decoding, resizing and PNG encoding release the GIL, so
    # a worker keeps its core busy while another view is written (one worker per core).
    with ThreadPoolExecutor(max_workers=THREADS_PER_WORKER) as pool:
        stream = records(pool)
        for output in task.outputs:
            write_shard(Path(output), itertools.islice(stream, per_shard))
    return rows


def plan_shards(
    files: Sequence[str], params: AugmentParams, image_size: int, directory: Path
) -> tuple[list[ShardTask], dict[str, list[Source]]]:
    """One task per input shard, with every record's number of views (planned over the whole
    training set, in sha256 order) and the names of its output shards; and the first
    ``preview_images`` sources of each class by sha256, for the preview."""
    from imgpipe.data.tfrecords import iter_records

    index: list[list[str]] = []  # each file's sha256s, in file order
    labels: dict[str, str] = {}
    preview: dict[str, list[Source]] = defaultdict(list)
    for file in files:
        index.append([])
        for record in iter_records([file]):
            source = Source.from_record(record)
            index[-1].append(source.sha256)
            labels[source.sha256] = source.label
            kept = preview[source.label]
            if len(kept) < params.preview_images or source.sha256 < kept[-1].sha256:
                kept.append(source)
                kept.sort(key=lambda s: s.sha256)
                del kept[params.preview_images :]
    by_sha = sorted(labels)
    oversample = params.balance_classes is True  # per_epoch: finetune balances each epoch
    plan = plan_views([labels[s] for s in by_sha], params.views_per_image, oversample)
    views = dict(zip(by_sha, plan, strict=True))
    counts = [tuple(views[s] for s in shas) for shas in index]
    parts = [max(1, -(-sum(c) // params.images_per_shard)) for c in counts]
    names = iter(shard_names("train", sum(parts)))
    tasks = [
        ShardTask(
            i,
            file,
            c,
            tuple(str(directory / next(names)) for _ in range(n)),
            image_size,
            params,
        )
        for i, (file, c, n) in enumerate(zip(files, counts, parts, strict=True))
    ]
    return tasks, preview


def preview_grid(
    by_class: dict[str, list[Source]], size: int, p: AugmentParams, path: Path
) -> None:
    """Originals (left column) beside augmented views, a few images from each class (their
    first by sha256)."""
    from imgpipe.core import figures

    plt = figures.pyplot()
    by_class = {label: list(sources) for label, sources in by_class.items()}
    total = sum(len(v) for v in by_class.values())
    chosen: list[Source] = []
    while len(chosen) < min(p.preview_images, total):
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
    files = split_files(shards, "train")
    counts: Counter[str] = Counter()
    augmented = 0
    with atomic_path(out) as staged:
        (staged / SHARDS).mkdir(parents=True)
        tasks, preview = plan_shards(files, params, image_size, staged / SHARDS)
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
        with (
            open(staged / VIEWS, "w", newline="", encoding="utf-8") as f,
            tqdm(
                total=sum(sum(t.views) for t in tasks),
                desc="augment: materialise",
                unit="img",
                disable=not progress,
            ) as bar,
            Workers(resolve(params.workers, len(tasks), SHARDS_PER_WORKER)) as pool,
        ):
            writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n", restval="")
            writer.writeheader()
            for rows in pool.map(augment_shard, tasks):
                writer.writerows(rows)
                counts.update(row["label"] for row in rows)
                augmented += sum(1 for row in rows if row["view"] > 0)
                bar.update(len(rows))
        preview_grid(preview, image_size, params, staged / PREVIEW)
    totals = {
        "source_images": sum(len(t.views) for t in tasks),
        "materialised_images": sum(counts.values()),
        "augmented_views": augmented,
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
