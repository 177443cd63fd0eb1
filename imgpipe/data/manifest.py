"""The layout of ingest's output, which every later stage reads: the manifest's columns and the
files beside it, and the one reader of the manifest."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

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


TEXT_COLUMNS = ("filepath", "label", "split", "sha256", "mode", "format")
"""Columns that stay text in a frame: class folders "0", "1" or "NA" are labels, not numbers
or nulls."""


def read_manifest_frame(path: Path, *, all_text: bool = False) -> Any:
    """The manifest as a pandas DataFrame, for what works on frames (validate's expectations,
    MLflow's datasets): the text columns stay text and only empty cells are missing; with
    ``all_text`` every column is text and nothing is missing."""
    import pandas as pd

    if all_text:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    return pd.read_csv(
        path, dtype=dict.fromkeys(TEXT_COLUMNS, str), keep_default_na=False, na_values=[""]
    )
