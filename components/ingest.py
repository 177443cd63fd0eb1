"""ingest: raw files -> checked, deduplicated, split manifest + quarantine report + TFRecord shards.

Sources are read, never written. Every file ends up either in the manifest (one split each) or
in the quarantine report with a reason; nothing is dropped silently. A source's own splits
(``train/``, ``val/`` or ``validation/``, ``test/`` folders; a CSV ``split`` column) are kept
unless ``ingest.split_mode`` says ``random``; ``ingest.group_by`` keeps groups in one split.

>>> params = load_params("params.yaml")
>>> run(source=Path("data"), out=Path("outputs/ingest"), summary=Path("metrics/ingest.json"),
...     data=section(DataParams, "data", params), ingest=section(IngestParams, "ingest", params))
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import itertools
import logging
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image
from tqdm import tqdm

from imgpipe.core.errors import InputError
from imgpipe.core.fileio import atomic_path, sha256_bytes, write_json_atomic
from imgpipe.core.parallel import Workers, batches, resolve
from imgpipe.core.params import DataParams, IngestParams, ParamsError, ValidateParams
from imgpipe.data.images import ImageRejected, check_image
from imgpipe.data.labels import label_map, write_labels
from imgpipe.data.manifest import (
    LABELS,
    MANIFEST,
    MANIFEST_COLUMNS,
    QUARANTINE,
    QUARANTINE_COLUMNS,
    SHARDS,
)
from imgpipe.data.splits import (
    assign_splits,
    check_groups,
    describe_split,
    require_grouped_classes,
    split_report,
)
from imgpipe.data.tfrecords import SPLITS, ShardRecord, write_split

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Candidate:
    path: Path
    """Where to read the bytes."""
    filepath: str
    """How reports name the file: relative to the source, POSIX separators."""
    label: str
    metadata: dict[str, str]
    given_split: str | None = None
    """The split the source puts it in, as the source spells it (``validation``); None if none."""


@dataclasses.dataclass(frozen=True)
class Rejection:
    filepath: str
    label: str
    reason: str
    detail: str


SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "test": "test"}
"""How a source may name its splits (folder names, CSV ``split`` values; any case) -> ours."""


def our_split(name: str) -> str | None:
    """``"Validation"`` -> ``"val"``; None for a name that is no split."""
    return SPLIT_NAMES.get(name.strip().lower())


class Discovered(NamedTuple):
    candidates: list[Candidate]
    rejections: list[Rejection]
    columns: list[str]
    """Metadata column names."""
    has_splits: bool
    """The source assigns splits itself: split folders, or a CSV ``split`` column."""


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
            raise InputError(f"{path}: metadata CSV needs a 'filepath' column, found {columns}")
        extra = [c for c in columns if c != "filepath"]
        clash = sorted(set(extra) & set(MANIFEST_COLUMNS))
        if clash:
            raise InputError(f"{path}: metadata columns {clash} clash with manifest columns")
        table = {}
        for row in reader:
            table[Path(row["filepath"]).as_posix()] = {c: (row[c] or "") for c in extra}
    return table, extra


def _is_split_layout(root: Path, skip: set[Path]) -> bool:
    """``root/{train,val|validation,test}/<label>/...``: every top-level folder is named after a
    split, one of them ``train``, and ``train/`` holds folders. A plain class folder that happens
    to be called ``train`` sits beside other classes, or holds images rather than class folders."""
    folders = [
        e
        for e in os.scandir(root)
        if not _is_hidden(e.name) and e.is_dir() and Path(e.path).resolve() not in skip
    ]
    if not folders or any(our_split(e.name) is None for e in folders):
        return False
    train = [e for e in folders if our_split(e.name) == "train"]
    return any(
        not _is_hidden(sub.name) and sub.is_dir() for e in train for sub in os.scandir(e.path)
    )


def _folders(
    parent: Path, root: Path, skip: set[Path], rejections: list[Rejection], why: str
) -> Iterable[os.DirEntry[str]]:
    """The folders in ``parent``; any other entry (a file, a symlink leaving the root) is
    rejected, ``why`` saying where images must sit."""
    for entry in sorted(os.scandir(parent), key=lambda e: e.name):
        rel = Path(entry.path).relative_to(root).as_posix()
        if _is_hidden(entry.name) or Path(entry.path).resolve() in skip:
            continue
        if entry.is_symlink() and not _inside(Path(entry.path), root):
            rejections.append(
                Rejection(rel, "", "symlink_outside_root", f"points to {os.readlink(entry.path)}")
            )
        elif not entry.is_dir():
            rejections.append(Rejection(rel, "", "outside_class_folder", why))
        else:
            yield entry


def _class_folder(
    folder: Path,
    root: Path,
    label: str,
    split: str | None,
    metadata: dict[str, dict[str, str]],
    rejections: list[Rejection],
) -> list[Candidate]:
    """Every file under one class folder, walked in a fixed order."""
    candidates, found = [], 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in list(dirnames):
            sub = Path(dirpath, name)
            if sub.is_symlink():  # os.walk does not follow it: report instead of ignoring
                dirnames.remove(name)
                reason = "symlink_outside_root" if not _inside(sub, root) else "symlinked_folder"
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
                    Rejection(rel, label, "symlink_outside_root", f"points to {os.readlink(path)}")
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
            candidates.append(Candidate(path, rel, label, metadata.get(rel, {}), split))
    if found == 0:
        rejections.append(
            Rejection(
                f"{folder.relative_to(root).as_posix()}/",
                label,
                "empty_class_folder",
                "the class folder holds no files; it is not a class",
            )
        )
    return candidates


def discover_folder(root: Path, metadata_csv: Path | None = None) -> Discovered:
    """A folder of class folders, ``root/<label>/**/<image>``, or of split folders holding class
    folders, ``root/{train,val|validation,test}/<label>/**/<image>`` (Keras' layout). Returns the
    candidates, the rejections (files outside class folders, symlinks leaving the root, empty
    class folders) and the metadata column names."""
    root = root.resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"data source {root} is not a folder")
    metadata, columns = _read_metadata(metadata_csv)
    skip = {metadata_csv.resolve()} if metadata_csv else set()
    candidates: list[Candidate] = []
    rejections: list[Rejection] = []
    in_class = "images must sit in a folder named after their class"
    has_splits = _is_split_layout(root, skip)
    splits: list[tuple[str | None, Path]] = [(None, root)]
    if has_splits:
        in_split = "in a split layout images sit in <split>/<class>/"
        splits = [(e.name, Path(e.path)) for e in _folders(root, root, skip, rejections, in_split)]
    for split, parent in splits:
        for entry in _folders(parent, root, skip, rejections, in_class):
            candidates += _class_folder(
                Path(entry.path), root, entry.name, split, metadata, rejections
            )
    return Discovered(candidates, rejections, columns, has_splits)


def discover_csv(manifest: Path) -> Discovered:
    """A CSV manifest ``filepath,label[,split][,metadata...]``; paths relative to the CSV's
    folder. A ``split`` column (train, val or validation, test) is the source's own split."""
    base = manifest.resolve().parent
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        missing = [c for c in ("filepath", "label") if c not in columns]
        if missing:
            raise InputError(
                f"{manifest}: CSV manifest needs columns filepath,label; "
                f"missing {missing}, found {columns}"
            )
        extra = [c for c in columns if c not in ("filepath", "label", "split")]
        clash = sorted(set(extra) & set(MANIFEST_COLUMNS))
        if clash:
            raise InputError(f"{manifest}: metadata columns {clash} clash with manifest columns")
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
                split = (row.get("split") or "") if "split" in columns else None
                candidates.append(Candidate(path, Path(filepath).as_posix(), label, meta, split))
    return Discovered(candidates, rejections, extra, "split" in columns)


BATCH = 64
"""Most images per task sent to a worker: large enough that pickling and queueing cost little
beside decoding, small enough that a few tasks per worker stay in flight."""
IMAGES_PER_WORKER = 2000
"""With ``ingest.workers: null``, one worker per this many images at most: a worker's start
(spawn and imports, about 0.6 s of CPU) is worth about 2,000 small-image checks."""


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
        # Shards read the file again when they are written: only what finds its bytes is kept.
        "_given_split": candidate.given_split,
        "_path": str(candidate.path),
        "_reencoded": checked.encoded is not data,
        "_encoded_format": checked.encoded_format,
    }


def _check_batch(
    candidates: Sequence[Candidate], max_pixels: int
) -> list[dict[str, Any] | Rejection]:
    """``_check`` over a batch: one task of the worker pool."""
    with warnings.catch_warnings():
        # Our own max_pixels check decides on big images; Pillow's warning would only add noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return [_check(c, max_pixels) for c in candidates]


class _Stored(NamedTuple):
    """What a worker needs to find one kept image's stored bytes again."""

    path: str
    filepath: str
    sha256: str
    reencoded: bool


def _stored_batch(images: Sequence[_Stored], max_pixels: int) -> list[bytes]:
    """The bytes the shards store for each image: the file's own, or its lossless 8-bit PNG
    (``check_image`` again: the same bytes give the same PNG). One task of the worker pool."""
    stored = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for image in images:
            data = Path(image.path).read_bytes()
            if sha256_bytes(data) != image.sha256:
                raise RuntimeError(
                    f"{image.filepath} changed while it was being ingested; rerun ingest"
                )
            stored.append(
                check_image(data, max_pixels=max_pixels).encoded if image.reencoded else data
            )
    return stored


def remove_duplicates(
    rows: Sequence[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[Rejection]]:
    """Keep one file per sha256. One image under two or more labels: every copy is quarantined,
    since no label can be trusted. Otherwise the copy in the earliest of the source's own splits
    (train, val, test; ``_given_split``) stays, the first by path among equals: a copy in the same
    split is a ``duplicate``, one in a later split a ``split_leak``, so a leaked image trains and
    the val and test sets stay clean."""

    def rank(row: dict[str, Any]) -> tuple[int, str]:
        given = row.get("_given_split")
        return (SPLITS.index(given) if given else 0), row["filepath"]

    by_hash: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in sorted(rows, key=rank):
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
        first = group[0]
        kept.append(first)
        for r in group[1:]:
            if r.get("_given_split") == first.get("_given_split"):
                rejections.append(
                    Rejection(
                        r["filepath"], r["label"], "duplicate", f"exact copy of {first['filepath']}"
                    )
                )
            else:
                rejections.append(
                    Rejection(
                        r["filepath"],
                        r["label"],
                        "split_leak",
                        f"also in {first['_given_split']}: {first['filepath']} (kept there)",
                    )
                )
    return kept, rejections


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


def _shard_record(row: dict[str, Any], encoded: bytes) -> ShardRecord:
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


def _check_all(
    candidates: Sequence[Candidate],
    rejections: list[Rejection],
    pool: Workers,
    max_pixels: int,
    progress: bool,
) -> list[dict[str, Any]]:
    """Check every candidate in the workers, a batch at a time; return the rows of the usable
    ones in candidate order, appending the others to ``rejections``."""
    rows: list[dict[str, Any]] = []
    interned: dict[str, str] = {}  # labels, modes, formats: one string each, not one per image
    checks = pool.map(
        functools.partial(_check_batch, max_pixels=max_pixels),
        batches(candidates, pool.workers, BATCH),
    )
    with tqdm(
        total=len(candidates), desc="ingest: check images", unit="img", disable=not progress
    ) as bar:
        for results in checks:
            bar.update(len(results))
            for result in results:
                if isinstance(result, Rejection):
                    rejections.append(result)
                    continue
                for key in ("label", "mode", "format", "_encoded_format"):
                    result[key] = interned.setdefault(result[key], result[key])
                rows.append(result)
    return rows


def _write_shards(
    directory: Path,
    rows: Sequence[dict[str, Any]],
    per_shard: int,
    pool: Workers,
    max_pixels: int,
    progress: bool,
) -> None:
    """Every split's shards from ``rows`` (sorted by split), the workers reading the images a
    batch at a time, in order, while this process writes: one shard's worth of images in
    memory at most."""
    images = [_Stored(r["_path"], r["filepath"], r["sha256"], r["_reencoded"]) for r in rows]
    tasks = batches(images, pool.workers, BATCH)
    stored = itertools.chain.from_iterable(
        pool.map(functools.partial(_stored_batch, max_pixels=max_pixels), tasks)
    )
    records = map(_shard_record, rows, stored)
    counts = Counter(r["split"] for r in rows)
    with tqdm(
        total=len(rows), desc="ingest: write shards", unit="img", disable=not progress
    ) as bar:
        for split in SPLITS:
            if counts[split]:
                part = itertools.islice(records, counts[split])
                write_split(directory, split, part, counts[split], per_shard, bar)


def _name_splits(candidates: Sequence[Candidate]) -> tuple[list[Candidate], list[Rejection]]:
    """The source's split names as ours (``validation`` -> ``val``); a file whose split is no
    split name (an empty or unknown CSV ``split`` cell) is rejected."""
    named, rejections = [], []
    for c in candidates:
        split = our_split(c.given_split or "")
        if split is None:
            rejections.append(
                Rejection(
                    c.filepath,
                    c.label,
                    "unknown_split",
                    f"split {c.given_split!r} is none of {', '.join(SPLIT_NAMES)}",
                )
            )
        else:
            named.append(dataclasses.replace(c, given_split=split))
    return named, rejections


def run(
    *,
    source: Path,
    out: Path,
    summary: Path,
    data: DataParams,
    ingest: IngestParams,
    validate: ValidateParams,
    progress: bool = True,
) -> dict[str, Any]:
    """Ingest ``source`` (folder of class or split folders, or CSV manifest) into ``out``
    (manifest.csv, quarantine_report.csv, labels.txt, shards/); return the counts also written
    to ``summary``. A grouped split that leaves a class fewer than
    ``validate.min_images_per_class`` validation or test images is refused here, naming the
    class, the groups that decide it and the ways forward."""
    params = ingest
    source = Path(source)
    if source.is_file():
        found = discover_csv(source)
    else:
        metadata = Path(data.metadata_csv) if data.metadata_csv else None
        if metadata is not None and not metadata.is_file():
            raise FileNotFoundError(f"data.metadata_csv: {metadata} does not exist")
        found = discover_folder(source, metadata)
    candidates, rejections, columns = found.candidates, found.rejections, found.columns
    unknown = [c for c in params.stratify_by if c != "label" and c not in columns]
    if unknown:
        raise ParamsError(
            f"ingest.stratify_by names {unknown}, which the source does not have; "
            f"its metadata columns are {columns}"
        )
    if params.group_by is not None and params.group_by not in columns:
        raise ParamsError(
            f"ingest.group_by names {params.group_by!r}, which the source does not have; "
            f"its metadata columns are {columns}"
        )
    if params.split_mode == "predefined" and not found.has_splits:
        raise ParamsError(
            f"ingest.split_mode is predefined, but {source} has no splits of its own: expected "
            "top-level folders train/ and val/ (or validation/) and/or test/ holding class "
            "folders, or a CSV manifest with a 'split' column"
        )
    predefined = found.has_splits and params.split_mode != "random"
    if predefined:
        candidates, unnamed = _name_splits(candidates)
        rejections += unnamed
    else:
        candidates = [dataclasses.replace(c, given_split=None) for c in candidates]

    del found  # the candidates go once checked: memory must not grow with the source
    with Workers(resolve(params.workers, len(candidates), IMAGES_PER_WORKER)) as pool:
        rows = _check_all(candidates, rejections, pool, params.max_pixels, progress)
        del candidates
        rows, duplicates = remove_duplicates(rows)
        rejections += duplicates
        if not rows:
            reasons = Counter(r.reason for r in rejections).most_common()
            raise InputError(
                f"no usable image in {source}: {len(rejections)} file(s) rejected {reasons}"
            )

        if params.group_by is not None:
            check_groups(rows, params.group_by, source)

        index = label_map(r["label"] for r in rows)
        try:
            carved = assign_splits(rows, params, predefined=predefined)
        except ValueError as exc:
            raise InputError(f"{source}: {exc}") from None
        if params.group_by is not None and not predefined:  # the source's own split is kept
            require_grouped_classes(rows, params, validate.min_images_per_class)
        for row in rows:
            row["label_index"] = index[row["label"]]
        rows.sort(key=lambda r: (SPLITS.index(r["split"]), r["sha256"]))
        rejections.sort(key=lambda r: r.filepath)

        import tensorflow  # noqa: F401  (loaded here so the shard progress bar measures writing only)

        with atomic_path(out) as staged:
            (staged / SHARDS).mkdir(parents=True)
            _write_csv(staged / MANIFEST, [*MANIFEST_COLUMNS, *columns], rows)
            _write_csv(staged / QUARANTINE, QUARANTINE_COLUMNS, map(dataclasses.asdict, rejections))
            write_labels(staged / LABELS, index)
            _write_shards(
                staged / SHARDS, rows, params.images_per_shard, pool, params.max_pixels, progress
            )
    counts = summarise(rows, rejections)
    counts["split_method"] = split_report(rows, params, predefined=predefined, carved=carved)
    for warning in counts["split_method"]["warnings"]:
        log.warning("ingest: %s", warning)
    write_json_atomic(summary, counts)
    return counts


def metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Counts per split and class, for MLflow."""
    values = {"ingest.images": summary["images"], "ingest.quarantined": summary["quarantined"]}
    for split, counts in summary["splits"].items():
        values[f"ingest.{split}.images"] = counts["total"]
        values.update({f"ingest.{split}.{label}": n for label, n in counts["classes"].items()})
    method = summary.get("split_method") or {}  # absent from summaries older than split modes
    for key in ("largest_fraction_gap", "largest_class_fraction_gap"):
        if method.get(key) is not None:
            values[f"ingest.{key}"] = method[key]
    if method.get("groups_spanning_splits") is not None:
        values["ingest.groups_spanning_splits"] = method["groups_spanning_splits"]
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
        f"(see {QUARANTINE}); split: {describe_split(summary['split_method'])}"
    )
