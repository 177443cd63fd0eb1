"""ingest: raw files -> checked, deduplicated, split manifest + quarantine report + TFRecord shards.

Sources are read, never written. Every file ends up either in the manifest (one split each) or
in the quarantine report with a reason; nothing is dropped silently.

>>> params = load_params("params.yaml")
>>> run(source=Path("data"), out=Path("outputs/ingest"), summary=Path("metrics/ingest.json"),
...     data=section(DataParams, "data", params), ingest=section(IngestParams, "ingest", params))
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from imgpipe.fileio import atomic_path, sha256_bytes, write_json_atomic
from imgpipe.images import ImageRejected, check_image
from imgpipe.labels import label_map, write_labels
from imgpipe.manifest import (
    LABELS,
    MANIFEST,
    MANIFEST_COLUMNS,
    QUARANTINE,
    QUARANTINE_COLUMNS,
    SHARDS,
)
from imgpipe.params import DataParams, IngestParams, ParamsError
from imgpipe.tfrecords import SPLITS, ShardRecord, write_split

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Candidate:
    path: Path
    """Where to read the bytes."""
    filepath: str
    """How reports name the file: relative to the source, POSIX separators."""
    label: str
    metadata: dict[str, str]


@dataclasses.dataclass(frozen=True)
class Rejection:
    filepath: str
    label: str
    reason: str
    detail: str


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _is_utf8(name: str) -> bool:
    """False for names holding bytes that are not UTF-8 (``os`` decodes them as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(name: str) -> str:
    """A name for the reports: undecodable bytes shown as ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
    except (ValueError, OSError, RuntimeError):
        return False
    return True


def _read_metadata(path: Path | None) -> tuple[dict[str, dict[str, str]], list[str]]:
    if path is None:
        return {}, []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        if "filepath" not in columns:
            raise ValueError(f"{path}: metadata CSV needs a 'filepath' column, found {columns}")
        extra = [c for c in columns if c != "filepath"]
        clash = sorted(set(extra) & set(MANIFEST_COLUMNS))
        if clash:
            raise ValueError(f"{path}: metadata columns {clash} clash with manifest columns")
        table = {}
        for row in reader:
            table[Path(row["filepath"]).as_posix()] = {c: (row[c] or "") for c in extra}
    return table, extra


def discover_folder(
    root: Path, metadata_csv: Path | None = None
) -> tuple[list[Candidate], list[Rejection], list[str]]:
    """A folder of class folders: ``root/<label>/**/<image>``. Returns candidates, rejections
    (files outside class folders, symlinks leaving the root, empty class folders) and the
    metadata column names."""
    root = root.resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"data source {root} is not a folder")
    metadata, columns = _read_metadata(metadata_csv)
    skip = {metadata_csv.resolve()} if metadata_csv else set()
    candidates: list[Candidate] = []
    rejections: list[Rejection] = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        rel = entry.name
        if _is_hidden(entry.name) or Path(entry.path).resolve() in skip:
            continue
        if entry.is_symlink() and not _inside(Path(entry.path), root):
            rejections.append(
                Rejection(rel, "", "symlink_outside_root", f"points to {os.readlink(entry.path)}")
            )
            continue
        if not entry.is_dir():
            rejections.append(
                Rejection(
                    rel,
                    "",
                    "outside_class_folder",
                    "images must sit in a folder named after their class",
                )
            )
            continue
        label, found = entry.name, 0
        for dirpath, dirnames, filenames in os.walk(entry.path):
            dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
            for name in list(dirnames):
                sub = Path(dirpath, name)
                if sub.is_symlink():  # os.walk does not follow it: report instead of ignoring
                    dirnames.remove(name)
                    reason = (
                        "symlink_outside_root" if not _inside(sub, root) else "symlinked_folder"
                    )
                    rejections.append(
                        Rejection(
                            sub.relative_to(root).as_posix(),
                            label,
                            reason,
                            f"points to {os.readlink(sub)}",
                        )
                    )
            for name in sorted(filenames):
                if _is_hidden(name):
                    continue
                path = Path(dirpath, name)
                rel = path.relative_to(root).as_posix()
                found += 1
                if path.is_symlink() and not _inside(path, root):
                    rejections.append(
                        Rejection(
                            rel, label, "symlink_outside_root", f"points to {os.readlink(path)}"
                        )
                    )
                    continue
                if not _is_utf8(rel):  # its name could not go into the UTF-8 manifest and shards
                    rejections.append(
                        Rejection(
                            _printable(rel),
                            _printable(label),
                            "name_not_utf8",
                            "the file or folder name is not valid UTF-8",
                        )
                    )
                    continue
                candidates.append(Candidate(path, rel, label, metadata.get(rel, {})))
        if found == 0:
            rejections.append(
                Rejection(
                    f"{label}/",
                    label,
                    "empty_class_folder",
                    "the class folder holds no files; it is not a class",
                )
            )
    return candidates, rejections, columns


def discover_csv(manifest: Path) -> tuple[list[Candidate], list[Rejection], list[str]]:
    """A CSV manifest ``filepath,label[,metadata...]``; paths relative to the CSV's folder."""
    base = manifest.resolve().parent
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        missing = [c for c in ("filepath", "label") if c not in columns]
        if missing:
            raise ValueError(
                f"{manifest}: CSV manifest needs columns filepath,label; "
                f"missing {missing}, found {columns}"
            )
        extra = [c for c in columns if c not in ("filepath", "label")]
        clash = sorted(set(extra) & set(MANIFEST_COLUMNS))
        if clash:
            raise ValueError(f"{manifest}: metadata columns {clash} clash with manifest columns")
        candidates, rejections = [], []
        for line, row in enumerate(reader, start=2):
            filepath, label = (row.get("filepath") or "").strip(), (row.get("label") or "").strip()
            if not filepath or not label:
                rejections.append(
                    Rejection(
                        filepath or f"{manifest.name}:{line}",
                        label,
                        "missing_field",
                        f"line {line} lacks filepath or label",
                    )
                )
                continue
            path = base / filepath
            if not _inside(path, base):
                rejections.append(
                    Rejection(filepath, label, "outside_root", f"resolves outside {base}")
                )
            elif not path.is_file():
                rejections.append(
                    Rejection(filepath, label, "missing_file", f"{path} does not exist")
                )
            else:
                meta = {c: (row.get(c) or "") for c in extra}
                candidates.append(Candidate(path, Path(filepath).as_posix(), label, meta))
    return candidates, rejections, extra


def _check(candidate: Candidate, max_pixels: int) -> dict[str, Any] | Rejection:
    if not candidate.path.is_file():  # a FIFO or device would block or never end
        return Rejection(
            candidate.filepath,
            candidate.label,
            "not_a_regular_file",
            "only regular files (or symlinks to them) are read",
        )
    try:
        data = candidate.path.read_bytes()
    except OSError as exc:
        return Rejection(candidate.filepath, candidate.label, "unreadable", str(exc))
    try:
        checked = check_image(data, max_pixels=max_pixels)
    except ImageRejected as exc:
        return Rejection(candidate.filepath, candidate.label, exc.reason, exc.detail)
    return {
        "filepath": candidate.filepath,
        "label": candidate.label,
        "sha256": sha256_bytes(data),
        "width": checked.width,
        "height": checked.height,
        "mode": checked.mode,
        "format": checked.format,
        "bytes": len(data),
        "exif_transposed": checked.exif_transposed,
        **candidate.metadata,
        # Shards need the stored bytes; keep them only when they differ from the source.
        "_path": candidate.path,
        "_encoded": None if checked.encoded is data else checked.encoded,
        "_encoded_format": checked.encoded_format,
    }


def remove_duplicates(
    rows: Sequence[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[Rejection]]:
    """Keep one file per sha256. Copies under one label: the first by path stays. One image under
    two or more labels: every copy is quarantined, since no label can be trusted."""
    by_hash: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: r["filepath"]):
        by_hash[row["sha256"]].append(row)
    kept, rejections = [], []
    for group in by_hash.values():
        labels = sorted({r["label"] for r in group})
        if len(labels) > 1:
            where = "; ".join(f"{r['filepath']} ({r['label']})" for r in group)
            rejections += [
                Rejection(
                    r["filepath"],
                    r["label"],
                    "label_conflict",
                    f"the same image carries labels {labels}: {where}",
                )
                for r in group
            ]
            continue
        kept.append(group[0])
        rejections += [
            Rejection(
                r["filepath"], r["label"], "duplicate", f"exact copy of {group[0]['filepath']}"
            )
            for r in group[1:]
        ]
    return kept, rejections


def _group_seed(seed: int, key: tuple[str, ...]) -> list[int]:
    digest = hashlib.sha256("\x1f".join(key).encode()).digest()
    return [seed, int.from_bytes(digest[:8], "little")]


def stratified_split(
    ids: Sequence[str],
    strata: Sequence[tuple[str, ...]],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> list[str]:
    """Assign each id to train/val/test, stratum by stratum, reproducibly.

    Within a stratum, ids are sorted then shuffled by a generator seeded with ``seed`` and the
    stratum's name, so the result does not depend on file order and adding a class does not
    reshuffle the others. Each stratum gives ``round(n * fraction)`` ids to test and to val.
    """
    groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for index, key in enumerate(strata):
        groups[key].append(index)
    splits = [""] * len(ids)
    for key, members in groups.items():
        members.sort(key=lambda i: ids[i])
        order = np.random.default_rng(_group_seed(seed, key)).permutation(len(members))
        n = len(members)
        n_test = int(np.floor(n * test_fraction + 0.5))
        n_val = min(int(np.floor(n * val_fraction + 0.5)), n - n_test)
        for rank, position in enumerate(order):
            split = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
            splits[members[position]] = split
    return splits


def summarise(rows: Sequence[dict[str, Any]], rejections: Sequence[Rejection]) -> dict[str, Any]:
    classes = sorted({r["label"] for r in rows})
    totals = dict.fromkeys(SPLITS, 0)
    per_class = {s: dict.fromkeys(classes, 0) for s in SPLITS}
    for row in rows:
        totals[row["split"]] += 1
        per_class[row["split"]][row["label"]] += 1
    splits = {s: {"total": totals[s], "classes": per_class[s]} for s in SPLITS}
    return {
        "images": len(rows),
        "quarantined": len(rejections),
        "quarantine_reasons": dict(sorted(Counter(r.reason for r in rejections).items())),
        "classes": {c: sum(1 for r in rows if r["label"] == c) for c in classes},
        "splits": splits,
    }


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    # backslashreplace: a rejected file's odd name (or symlink target) must not stop the report.
    with open(path, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
        writer = csv.DictWriter(
            f, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(rows)


def _shard_record(row: dict[str, Any]) -> ShardRecord:
    encoded = row["_encoded"]
    if encoded is None:
        encoded = row["_path"].read_bytes()
        if sha256_bytes(encoded) != row["sha256"]:
            raise RuntimeError(
                f"{row['filepath']} changed while it was being ingested; rerun ingest"
            )
    return ShardRecord(
        encoded,
        row["_encoded_format"],
        row["label_index"],
        row["label"],
        row["sha256"],
        row["filepath"],
        row["height"],
        row["width"],
    )


def run(
    *,
    source: Path,
    out: Path,
    summary: Path,
    data: DataParams,
    ingest: IngestParams,
    progress: bool = True,
) -> dict[str, Any]:
    """Ingest ``source`` (folder of class folders or CSV manifest) into ``out`` (manifest.csv,
    quarantine_report.csv, labels.txt, shards/); return the counts also written to ``summary``."""
    params = ingest
    source = Path(source)
    if source.is_file():
        candidates, rejections, columns = discover_csv(source)
    else:
        metadata = Path(data.metadata_csv) if data.metadata_csv else None
        if metadata is not None and not metadata.is_file():
            raise FileNotFoundError(f"data.metadata_csv: {metadata} does not exist")
        candidates, rejections, columns = discover_folder(source, metadata)
    unknown = [c for c in params.stratify_by if c != "label" and c not in columns]
    if unknown:
        raise ParamsError(
            f"ingest.stratify_by names {unknown}, which the source does not have; "
            f"its metadata columns are {columns}"
        )

    rows: list[dict[str, Any]] = []
    with (
        warnings.catch_warnings(),
        ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool,
    ):
        # Our own max_pixels check decides on big images; Pillow's warning would only add noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        checks = pool.map(lambda c: _check(c, params.max_pixels), candidates)
        for result in tqdm(
            checks,
            total=len(candidates),
            desc="ingest: check images",
            unit="img",
            disable=not progress,
        ):
            (rejections.append if isinstance(result, Rejection) else rows.append)(result)
    rows, duplicates = remove_duplicates(rows)
    rejections += duplicates
    if not rows:
        reasons = Counter(r.reason for r in rejections).most_common()
        raise ValueError(
            f"no usable image in {source}: {len(rejections)} file(s) rejected {reasons}"
        )

    index = label_map(r["label"] for r in rows)
    splits = stratified_split(
        [r["sha256"] for r in rows],
        [tuple(str(r.get(c, "")) for c in params.stratify_by) for r in rows],
        val_fraction=params.val_fraction,
        test_fraction=params.test_fraction,
        seed=params.seed,
    )
    for row, split in zip(rows, splits, strict=True):
        row["split"], row["label_index"] = split, index[row["label"]]
    rows.sort(key=lambda r: (SPLITS.index(r["split"]), r["sha256"]))
    rejections.sort(key=lambda r: r.filepath)

    import tensorflow  # noqa: F401  (loaded here so the shard progress bar measures writing only)

    with atomic_path(out) as staged:
        (staged / SHARDS).mkdir(parents=True)
        _write_csv(staged / MANIFEST, [*MANIFEST_COLUMNS, *columns], rows)
        _write_csv(staged / QUARANTINE, QUARANTINE_COLUMNS, map(dataclasses.asdict, rejections))
        write_labels(staged / LABELS, index)
        with tqdm(
            total=len(rows), desc="ingest: write shards", unit="img", disable=not progress
        ) as bar:
            for split in SPLITS:
                records = [_shard_record(r) for r in rows if r["split"] == split]
                if records:
                    write_split(staged / SHARDS, split, records, params.images_per_shard, bar)
    counts = summarise(rows, rejections)
    write_json_atomic(summary, counts)
    return counts


def metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Counts per split and class, for MLflow."""
    values = {"ingest.images": summary["images"], "ingest.quarantined": summary["quarantined"]}
    for split, counts in summary["splits"].items():
        values[f"ingest.{split}.images"] = counts["total"]
        values.update({f"ingest.{split}.{label}": n for label, n in counts["classes"].items()})
    return values


def log_to_mlflow(out: Path, summary: Path) -> None:
    """The manifest and the reports, to the active MLflow run."""
    import mlflow

    for name in (MANIFEST, QUARANTINE, LABELS):
        mlflow.log_artifact(str(out / name), "ingest")
    mlflow.log_artifact(str(summary), "ingest")


def describe(summary: dict[str, Any]) -> str:
    splits = ", ".join(f"{s} {c['total']}" for s, c in summary["splits"].items())
    return (
        f"{summary['images']} images ({splits}); {summary['quarantined']} quarantined "
        f"(see {QUARANTINE})"
    )
