"""The layout of ingest's output, which every later stage reads: the manifest's columns and the
files beside it."""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterable
from pathlib import Path

MANIFEST_COLUMNS = (
    "filepath",
    "label",
    "label_index",
    "split",
    "sha256",
    "width",
    "height",
    "mode",
    "format",
    "bytes",
    "exif_transposed",
)
QUARANTINE_COLUMNS = ("filepath", "label", "reason", "detail")
MANIFEST, QUARANTINE, LABELS, SHARDS = (
    "manifest.csv",
    "quarantine_report.csv",
    "labels.txt",
    "shards",
)

TRAINED_ON = "trained_on.txt"
"""Beside an exported model (and its registry version): the sha256 of every image the model was
trained or tuned on (ingest's train and val splits), sorted, one per line, so that a later
evaluation can score it only on images it never saw."""


def split_hashes(manifest: Path, splits: Iterable[str]) -> list[str]:
    """The sorted sha256 of the manifest's images in ``splits``."""
    wanted = set(splits)
    with open(manifest, newline="", encoding="utf-8") as f:
        return sorted(row["sha256"] for row in csv.DictReader(f) if row["split"] in wanted)


def lineage_digest(hashes: Iterable[str]) -> str:
    """One sha256 for a set of images (their sorted sha256, a line each): what the registry
    tags a version's training images, and a test set, with."""
    return hashlib.sha256("".join(f"{h}\n" for h in sorted(hashes)).encode()).hexdigest()
