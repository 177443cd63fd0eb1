"""What a registered model trained on, and how today's data differs from it.

Beside every exported model (and its registry version), ``trained_on.txt`` lists each image the
model was trained or tuned on (ingest's train and val splits): its sha256 and its label, sorted,
one ``<sha256><TAB><label>`` per line. A later evaluation uses it twice: to score the model only on
test images it never saw, and to notice when images it learnt from now carry other labels (a
relabelling, deliberate or not, that the accuracy on today's labels cannot show).

>>> known = {"a1": "cat", "b2": "dog", "c3": None}
>>> relabelled(known, {"a1": "cat", "b2": "cat", "c3": "dog", "d4": "dog"})
{'b2': ('dog', 'cat')}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from imgpipe.core.errors import InputError

TRAINED_ON = "trained_on.txt"
TRAINING_SPLITS = ("train", "val")


def lineage_digest(hashes: Iterable[str]) -> str:
    """One sha256 for a set of images (their sorted sha256, a line each): what the registry
    tags a version's training images, and a test set, with."""
    return hashlib.sha256("".join(f"{h}\n" for h in sorted(hashes)).encode()).hexdigest()


NOT_RECIPE = frozenset({"seed", "train_on", "decision", "workers"})
"""Keys of the recipe's sections that do not make another recipe: seeds (a fitted decision
serves every seed), where the decision comes from, and how many processes do the work."""


def training_digest(images: Mapping[str, str], recipe: Mapping[str, Any]) -> str:
    """One sha256 for what a decision fitted out-of-fold is valid for: the images and labels
    (sha256 -> label) of the non-test splits, and the recipe (the typed params sections that
    shape the network: model, augment, train, finetune, minus ``NOT_RECIPE``)."""
    sections = {
        name: {
            key: value
            for key, value in (
                dataclasses.asdict(view)
                if dataclasses.is_dataclass(view) and not isinstance(view, type)
                else dict(view)
            ).items()
            if key not in NOT_RECIPE
        }
        for name, view in sorted(recipe.items())
    }
    text = "".join(f"{h}\t{images[h]}\n" for h in sorted(images))
    text += json.dumps(sections, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()


def manifest_labels(manifest: Path, splits: Iterable[str] | None = None) -> dict[str, str]:
    """sha256 -> label of the manifest's images (in ``splits``; None: all of them)."""
    from imgpipe.data.manifest import read_manifest

    return {row["sha256"]: row["label"] for row in read_manifest(manifest, splits)}


def write_trained_on(path: Path, images: Mapping[str, str]) -> None:
    """``images`` (sha256 -> label) as ``trained_on.txt``."""
    bad = [label for label in images.values() if not label or "\t" in label or "\n" in label]
    if bad:
        raise InputError(f"labels that are empty or hold a tab or newline: {bad[:3]}")
    path.write_text("".join(f"{h}\t{images[h]}\n" for h in sorted(images)), encoding="utf-8")


def read_trained_on(path: Path) -> dict[str, str | None]:
    """sha256 -> label from a ``trained_on.txt``; the label is None in lists written before
    labels were kept (a sha256 alone on its line)."""
    images: dict[str, str | None] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        digest, tab, label = line.partition("\t")
        if not line.strip():
            continue
        if len(digest) != 64 or (tab and not label):
            raise InputError(f"{path}, line {number}: expected '<sha256><TAB><label>': {line!r}")
        images[digest] = label if tab else None
    return images


def relabelled(
    known: Mapping[str, str | None], current: Mapping[str, str]
) -> dict[str, tuple[str, str]]:
    """The images of ``known`` (a model's training images) that ``current`` (today's data)
    holds under another label: sha256 -> (label then, label now). Images without a recorded
    label, and images no longer in the data, are not counted."""
    return {
        h: (was, current[h])
        for h, was in known.items()
        if was is not None and h in current and current[h] != was
    }


def changes(moved: Mapping[str, tuple[str, str]]) -> dict[str, int]:
    """How many images went from which label to which: ``"a -> b": n``, most first."""
    counts = Counter(f"{was} -> {now}" for was, now in moved.values())
    return dict(counts.most_common())
