"""The one home of the TFRecord schema that ingest writes and later stages read."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from imgpipe.core.errors import InputError

SPLITS = ("train", "val", "test")


class ShardRecord(NamedTuple):
    encoded: bytes
    encoded_format: str
    label_index: int
    label: str
    sha256: str
    filepath: str
    height: int
    width: int


def shard_names(split: str, count: int) -> list[str]:
    return [f"{split}-{i:05d}-of-{count:05d}.tfrecord" for i in range(count)]


def _example(record: ShardRecord) -> Any:
    import tensorflow as tf

    def b(value: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    def i(value: int) -> tf.train.Feature:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

    return tf.train.Example(
        features=tf.train.Features(
            feature={
                "image/encoded": b(record.encoded),
                "image/format": b(record.encoded_format.encode()),
                "image/class/label": i(record.label_index),
                "image/class/text": b(record.label.encode()),
                "image/sha256": b(record.sha256.encode()),
                "image/filepath": b(record.filepath.encode()),
                "image/height": i(record.height),
                "image/width": i(record.width),
            }
        )
    )


def write_shard(path: Path, records: Iterable[ShardRecord], progress: Any = None) -> int:
    """Write ``records`` as they come into one TFRecord file; return how many."""
    import tensorflow as tf

    written = 0
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            # deterministic: map fields in key order; otherwise the order, and so the shard's
            # bytes, change from process to process
            writer.write(_example(record).SerializeToString(deterministic=True))
            written += 1
            if progress is not None:
                progress.update(1)
    return written


def write_split(
    directory: Path,
    split: str,
    records: Iterable[ShardRecord],
    total: int,
    per_shard: int,
    progress: Any = None,
) -> list[str]:
    """Write the ``total`` ``records`` as ``<split>-NNNNN-of-MMMMM.tfrecord`` files of
    ``per_shard`` each, reading them as they come; return the files' names."""
    names = shard_names(split, max(1, -(-total // per_shard)))
    records = iter(records)
    for name in names:
        written = write_shard(directory / name, itertools.islice(records, per_shard), progress)
        if written < min(per_shard, total):
            raise InputError(f"{split}: {total} records announced, fewer arrived")
        total -= written
    return names


def feature_spec() -> dict[str, Any]:
    import tensorflow as tf

    return {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/format": tf.io.FixedLenFeature([], tf.string),
        "image/class/label": tf.io.FixedLenFeature([], tf.int64),
        "image/class/text": tf.io.FixedLenFeature([], tf.string),
        "image/sha256": tf.io.FixedLenFeature([], tf.string),
        "image/filepath": tf.io.FixedLenFeature([], tf.string),
        "image/height": tf.io.FixedLenFeature([], tf.int64),
        "image/width": tf.io.FixedLenFeature([], tf.int64),
    }


def split_files(shards_dir: Path, split: str) -> list[str]:
    files = sorted(str(p) for p in Path(shards_dir).glob(f"{split}-*.tfrecord"))
    if not files:
        raise FileNotFoundError(f"no {split} shards in {shards_dir}")
    return files


def count_records(files: Iterable[str]) -> int:
    import tensorflow as tf

    return sum(1 for _ in tf.data.TFRecordDataset(list(files)))


def iter_records(files: Iterable[str], limit: int | None = None) -> Iterator[dict[str, Any]]:
    """The parsed examples of ``files`` (the first ``limit`` when given), one at a time."""
    import tensorflow as tf

    spec = feature_spec()
    records = tf.data.TFRecordDataset(list(files))
    for raw in records if limit is None else records.take(limit):
        parsed = tf.io.parse_single_example(raw, spec)
        yield {k: v.numpy() for k, v in parsed.items()}


def read_records(files: Iterable[str], limit: int | None = None) -> list[dict[str, Any]]:
    """Parse the examples of ``files`` (the first ``limit`` when given) eagerly, for evaluation,
    export and tests; training streams them through tf.data instead."""
    return list(iter_records(files, limit))


@dataclasses.dataclass(frozen=True)
class Split:
    encoded: list[bytes]
    labels: np.ndarray
    sha256: list[str]


def read_split(shards: Path, split: str = "test", limit: int | None = None) -> Split:
    """The encoded images, labels and content hashes of one split (its first ``limit``)."""
    records = read_records(split_files(shards, split), limit)
    return Split(
        [r["image/encoded"] for r in records],
        np.array([int(r["image/class/label"]) for r in records], np.int64),
        [r["image/sha256"].decode() for r in records],
    )
