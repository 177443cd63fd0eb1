"""The layout of ingest's output, which every later stage reads: the manifest's columns and the
files beside it."""

from __future__ import annotations

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
