"""Labelled feedback into the data folder, as the next data version a retraining picks up,
without hurting the data that is there.

- Every label is one of the champion's classes, or named as a new class by the operator
  (``new_classes``): an unknown or mistyped label is refused by name before anything is
  scored or written, so it neither creates a class folder nor counts as a wrong answer.
- A label becomes a folder name only once it is a plain name (no separator, no ``..``, no
  hidden or control characters), and every target path is proven to lie inside the data
  folder before anything is copied.
- An image already in the data under the same label is skipped; under another label it is
  held for review (a correction of a training label is a person's decision: appended, both
  copies would be quarantined by ingest and the original example lost from training); an image
  given twice is appended once. Every image not appended is counted and named with its reason.
- Appending is all or nothing: the images are copied into a staging folder beside the data
  folder, marked complete, then moved into ``<label>/feedback-<stamp>/`` folders. A crash
  before the mark leaves the data untouched (the staging folder is removed on the next
  append); after it, the next append finishes the moves first. No half-written version is
  ever in the data folder when a retraining reads it.

>>> safe_label("defect_033")
'defect_033'
>>> safe_label("../x")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
imgpipe.core.errors.InputError: feedback label '../x' is not a plain folder name ...
"""

from __future__ import annotations

import os
import shutil
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgpipe.core.errors import InputError
from imgpipe.core.fileio import sha256_file

COMPLETE = "COMPLETE"
"""The staging folder's mark: every image is copied, the moves may proceed."""
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def safe_label(label: str) -> str:
    """``label`` if it is a plain folder name; an InputError naming it otherwise."""
    bad = (
        not label
        or label in (".", "..")
        or label.startswith(".")
        or any(c in label for c in "/\\")
        or any(unicodedata.category(c).startswith("C") for c in label)
        or len(label.encode("utf-8")) > 255
    )
    if bad:
        raise InputError(
            f"feedback label {label!r} is not a plain folder name (no '/', '\\\\', '..', "
            "leading '.', or control characters)"
        )
    return label


def check_labels(
    labels: Iterable[str | None], classes: Sequence[str], new_classes: Sequence[str] = ()
) -> None:
    """Every label is one of the champion's ``classes`` or of ``new_classes`` (each a plain
    name); an InputError naming the others (with their counts) and the way forward."""
    for name in new_classes:
        safe_label(name)
    known = set(classes) | set(new_classes)
    unknown: dict[str, int] = {}
    for label in labels:
        if label is not None and label not in known:
            unknown[label] = unknown.get(label, 0) + 1
    if unknown:
        listed = ", ".join(f"{name!r} ({n})" for name, n in sorted(unknown.items()))
        raise InputError(
            f"feedback labels that are not the champion's classes {sorted(classes)}: {listed}. "
            "Correct them, or add a class on purpose with --new-class NAME"
        )


@dataclass
class FeedbackPlan:
    """What appending the feedback would do."""

    copies: list[tuple[Path, str, str]] = field(default_factory=list)
    """(image, label, sha256) to append."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(feedback file, why it is not appended): unscored, unlabelled, already there, twice."""
    review: list[tuple[str, str, str, str]] = field(default_factory=list)
    """(feedback file, its label, the data file holding the same image, that file's label)."""

    def counts(self) -> dict[str, int]:
        return {
            "appended": len(self.copies),
            "skipped": len(self.skipped),
            "for_review": len(self.review),
        }


def data_images(source: Path) -> dict[str, tuple[str, str]]:
    """sha256 -> (label, path relative to ``source``) of the images in a folder of class
    folders (hidden entries skipped, as ingest skips them)."""
    images: dict[str, tuple[str, str]] = {}
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        folder = Path(dirpath)
        if folder == source:
            continue
        label = folder.relative_to(source).parts[0]
        for name in sorted(filenames):
            path = folder / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            images.setdefault(sha256_file(path), (label, path.relative_to(source).as_posix()))
    return images


def plan(
    rows: Sequence[Mapping[str, Any]], existing: Mapping[str, tuple[str, str]]
) -> FeedbackPlan:
    """Which scored feedback ``rows`` (``filepath``, ``path``, ``label``, ``sha256``, and
    ``predicted`` once scored) to append, skip or hold for review against the data's
    ``existing`` images (``data_images``). Labels must have passed ``check_labels``."""
    result = FeedbackPlan()
    taken: dict[str, str] = {}
    for row in rows:
        name, label, digest = row["filepath"], row.get("label"), row.get("sha256")
        if label is None:
            result.skipped.append((name, "no label"))
        elif "predicted" not in row or digest is None:
            result.skipped.append((name, f"not scored: {row.get('error', 'unreadable')}"))
        elif digest in taken:
            result.skipped.append((name, f"the same image as {taken[digest]} in this feedback"))
        elif digest in existing and existing[digest][0] == label:
            result.skipped.append((name, f"already in the data as {existing[digest][1]}"))
        elif digest in existing:
            result.review.append((name, label, existing[digest][1], existing[digest][0]))
        else:
            taken[digest] = name
            result.copies.append((Path(row["path"]), safe_label(label), digest))
    return result


def _staging(source: Path, stamp: str) -> Path:
    return source.parent / f".{source.name}.feedback-{stamp}.partial"


def _inside(path: Path, root: Path) -> Path:
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise InputError(f"feedback target {path} resolves outside the data folder {root}")
    return path


def finish_pending(source: Path) -> list[str]:
    """Complete what an interrupted append left beside ``source``: a staging folder marked
    complete has its remaining folders moved in; one not marked is removed. Returns what was
    done, in words."""
    done = []
    for staging in sorted(source.parent.glob(f".{source.name}.feedback-*.partial")):
        stamp = staging.name.removeprefix(f".{source.name}.feedback-").removesuffix(".partial")
        if (staging / COMPLETE).is_file():
            moved = _move_in(staging, source, stamp)
            done.append(f"finished the append of {stamp} ({moved} folders moved in)")
        else:
            done.append(f"removed the unfinished append of {stamp}: the data was not touched")
        shutil.rmtree(staging)
    return done


def _move_in(staging: Path, source: Path, stamp: str) -> int:
    moved = 0
    for folder in sorted(p for p in staging.iterdir() if p.is_dir()):
        target = _inside(source / safe_label(folder.name) / f"feedback-{stamp}", source)
        if target.exists():
            continue  # moved before the interruption
        target.parent.mkdir(exist_ok=True)
        os.rename(folder, target)
        moved += 1
    return moved


def append(plan_: FeedbackPlan, source: Path, stamp: str) -> list[Path]:
    """Append ``plan_``'s images to ``source`` as ``<label>/feedback-<stamp>/<name>``, all or
    nothing (see the module). Returns the files written."""
    if not source.is_dir():
        raise InputError(f"data.source {source} is no folder of class folders: add feedback there")
    finish_pending(source)
    if not plan_.copies:
        return []
    staging = _staging(source, stamp)
    for label in {label for _, label, _ in plan_.copies}:
        target = _inside(source / label / f"feedback-{stamp}", source)
        if target.exists():
            raise InputError(f"{target} exists already: feedback of {stamp} was appended")
    staging.mkdir()
    written = []
    names: set[tuple[str, str]] = set()
    for path, label, digest in plan_.copies:
        name = path.name if (label, path.name) not in names else f"{digest[:12]}-{path.name}"
        names.add((label, name))
        (staging / label).mkdir(exist_ok=True)
        shutil.copyfile(path, staging / label / name)
        written.append(source / label / f"feedback-{stamp}" / name)
    with open(staging / COMPLETE, "w") as mark:
        mark.flush()
        os.fsync(mark.fileno())
    _move_in(staging, source, stamp)
    shutil.rmtree(staging)
    return written
