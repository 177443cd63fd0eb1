"""The layout of ingest's output, which every later stage reads: the manifest's columns and the
files beside it, and the one reader of the manifest."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path

from imgpipe.core.errors import InputError

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


def read_manifest(
    path: Path, splits: Iterable[str] | None = None, columns: Sequence[str] = ()
) -> list[dict[str, str]]:
    """The rows of ingest's manifest ``path`` (those in ``splits``; None: all), in file order;
    checked to hold ``columns`` beyond its own (an error naming the missing ones)."""
    wanted = None if splits is None else set(splits)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        found = reader.fieldnames or []
        missing = [c for c in (*MANIFEST_COLUMNS, *columns) if c not in found]
        if missing:
            raise InputError(f"{path} has no column(s) {missing}; its columns are {found}")
        return [row for row in reader if wanted is None or row["split"] in wanted]
