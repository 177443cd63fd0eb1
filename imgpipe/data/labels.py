"""The one home of the label map: class names sorted, index = position (like
``image_dataset_from_directory``), stored one per line in ``labels.txt``."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from imgpipe.core.errors import InputError


def label_map(labels: Iterable[str]) -> dict[str, int]:
    return {name: index for index, name in enumerate(sorted(set(labels)))}


def write_labels(path: Path, labels: Iterable[str]) -> None:
    Path(path).write_text("".join(f"{name}\n" for name in label_map(labels)), encoding="utf-8")


def read_labels(path: Path) -> list[str]:
    names = Path(path).read_text(encoding="utf-8").splitlines()
    if not names or len(set(names)) != len(names):
        raise InputError(f"{path}: expected one unique class name per line, got {names!r}")
    return names
