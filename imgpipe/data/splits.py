"""How ingest splits the images into train, val and test: stratified image by image, or by
whole groups, both in an order that stays put as data grows; or the source's own splits, with a
missing val or test split carved out of train. And the report of what the split reached.

>>> stratified_split(["a1", "a2", "b1", "b2"], [("a",), ("a",), ("b",), ("b",)],
...                  val_fraction=0.0, test_fraction=0.5, seed=0).count("test")
2
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imgpipe.core.errors import InputError
from imgpipe.core.params import IngestParams
from imgpipe.data.tfrecords import SPLITS


def _place(seed: int, key: str) -> bytes:
    """Where ``key`` (an image's sha256 or a group's name) sorts within its stratum for
    ``seed``: a hash of the two alone, so that it never depends on which other images exist."""
    return hashlib.sha256(f"{seed}\x1f{key}".encode()).digest()


def _fill(sizes: Sequence[int], test: float, test_and_val: float) -> list[str]:
    """The splits of items taken in their hash order: an item whose middle image falls within
    the first ``test`` images goes to test, within the first ``test_and_val`` to val, the rest
    to train (for single images: the first ``test`` go to test)."""
    splits, before = [], 0
    for size in sizes:
        middle = before + size / 2
        splits.append("test" if middle <= test else "val" if middle <= test_and_val else "train")
        before += size
    return splits


def stratified_split(
    ids: Sequence[str],
    strata: Sequence[tuple[str, ...]],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> list[str]:
    """Assign each id to train/val/test, stratum by stratum, so that the split stays put as
    the data grows; one split per input, in input order.

    Within a stratum the ids are ordered by a hash of (seed, id), which no other id changes;
    the first ``round(n * test_fraction)`` go to test, the next ``round(n * val_fraction)`` to
    val (capped so that test and val never exceed the stratum), the rest to train. Adding or
    removing ``k`` ids of a stratum moves at most ``2k + 3`` of its other ids between splits
    (each of the two boundaries shifts by at most the ids that crossed it plus the change of
    its rounded count), and typically a handful: the new ids spread over the order as the old
    ones do. File order and other strata never matter.
    """
    groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for index, key in enumerate(strata):
        groups[key].append(index)
    splits = [""] * len(ids)
    for members in groups.values():
        members.sort(key=lambda i: (_place(seed, ids[i]), ids[i]))
        n = len(members)
        n_test = math.floor(n * test_fraction + 0.5)
        n_val = min(math.floor(n * val_fraction + 0.5), n - n_test)
        for index, split in zip(members, _fill([1] * n, n_test, n_test + n_val), strict=True):
            splits[index] = split
    return splits


def grouped_split(
    groups: Sequence[str],
    strata: Sequence[tuple[str, ...]],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    method: str = "stable",
) -> list[str]:
    """Assign whole groups to train/val/test; one split per input, in input order. ``balanced``:
    ``balanced_assignment`` over the three splits. ``stable`` (below): the split stays put as
    groups are added.

    A group belongs to the stratum most of its images are in (ties: the first in sorted
    order). Within a stratum the groups are ordered by a hash of (seed, group name), and a
    group goes to test when its middle image falls within the first ``test_fraction`` of the
    stratum's images, to val within the next ``val_fraction``, else to train; adding or
    removing a group moves only groups whose place crosses one of those two boundaries. The
    fractions are met to within about half the largest group per stratum and boundary.
    """
    members: dict[str, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        members[group].append(index)
    if method == "balanced":
        per_group = {g: Counter(strata[i] for i in indices) for g, indices in members.items()}
        fractions = (test_fraction, val_fraction, 1.0 - test_fraction - val_fraction)
        placed = balanced_assignment(per_group, fractions, seed)
        return [("test", "val", "train")[placed[group]] for group in groups]
    by_stratum: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for group, indices in members.items():
        counts = Counter(strata[i] for i in indices)
        by_stratum[min(counts, key=lambda key: (-counts[key], key))].append(group)
    splits = [""] * len(groups)
    for names in by_stratum.values():
        names.sort(key=lambda g: (_place(seed, g), g))
        sizes = [len(members[g]) for g in names]
        total = sum(sizes)
        bounds = (total * test_fraction, total * (test_fraction + val_fraction))
        for group, split in zip(names, _fill(sizes, *bounds), strict=True):
            for index in members[group]:
                splits[index] = split
    return splits


def balanced_assignment(
    counts: dict[str, Counter[tuple[str, ...]]], fractions: Sequence[float], seed: int
) -> dict[str, int]:
    """Each unit (a group: its images per stratum in ``counts``) to one of ``len(fractions)``
    parts, so that every stratum is split as close to ``fractions`` as whole units allow.

    The cost is the sum over strata and parts of the squared gap between the part's share of
    the stratum and its fraction. Units are first placed largest first (ties in the seed's hash
    order), each where it adds the least cost (the greedy of scikit-learn's
    StratifiedGroupKFold, for unequal parts); then single moves and pairwise swaps of units
    between parts are made while one lowers the cost. Deterministic for a seed; not stable:
    adding a unit can move many."""
    import numpy as np

    names = sorted(counts, key=lambda u: (-counts[u].total(), _place(seed, u), u))
    strata = sorted({stratum for unit in counts.values() for stratum in unit})
    column = {stratum: k for k, stratum in enumerate(strata)}
    images = np.zeros((len(names), len(strata)))
    for row, name in enumerate(names):
        for stratum, n in counts[name].items():
            images[row, column[stratum]] = n
    share = images / images.sum(axis=0)  # each unit's share of each stratum
    target = np.asarray(fractions, np.float64)[:, None]
    held = np.zeros((len(fractions), len(strata)))
    part = np.zeros(len(names), np.int64)
    for row in range(len(names)):
        before = ((held - target) ** 2).sum(axis=1)
        after = ((held + share[row] - target) ** 2).sum(axis=1)
        part[row] = int(np.argmin(after - before))
        held[part[row]] += share[row]

    def gain(row: int, to: int) -> float:
        """How much moving unit ``row`` to part ``to`` lowers the cost."""
        src = part[row]
        old = ((held[src] - target[src]) ** 2).sum() + ((held[to] - target[to]) ** 2).sum()
        new = ((held[src] - share[row] - target[src]) ** 2).sum()
        new += ((held[to] + share[row] - target[to]) ** 2).sum()
        return float(old - new)

    for _ in range(20):  # passes; each either improves or stops
        improved = False
        for row in range(len(names)):
            moves = [(gain(row, to), to) for to in range(len(fractions)) if to != part[row]]
            best, to = max(moves, default=(0.0, -1))
            if best > 1e-12:
                held[part[row]] -= share[row]
                held[to] += share[row]
                part[row] = to
                improved = True
        for row in range(len(names)):
            for other in range(row + 1, len(names)):
                a, b = part[row], part[other]
                if a == b:
                    continue
                delta = share[row] - share[other]
                old = ((held[a] - target[a]) ** 2).sum() + ((held[b] - target[b]) ** 2).sum()
                new = ((held[a] - delta - target[a]) ** 2).sum()
                new += ((held[b] + delta - target[b]) ** 2).sum()
                if old - new > 1e-12:
                    held[a] -= delta
                    held[b] += delta
                    part[row], part[other] = b, a
                    improved = True
        if not improved:
            break
    return {name: int(part[row]) for row, name in enumerate(names)}


def fold_of(
    units: Sequence[str],
    sizes: Sequence[int],
    strata: Sequence[tuple[str, ...]],
    *,
    folds: int,
    seed: int,
) -> list[int]:
    """The cross-validation fold of each unit (an image's sha256, or a group's name with its
    ``sizes`` images), one per input, in input order: within each stratum the units in the
    split's own hash order are cut into ``folds`` runs of about equal images, a unit going to
    the run its middle image falls in. So every fold holds about ``1 / folds`` of each class,
    a group stays whole, and adding units moves only those whose place crosses a cut."""
    by_stratum: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for index, key in enumerate(strata):
        by_stratum[key].append(index)
    fold = [0] * len(units)
    for members in by_stratum.values():
        members.sort(key=lambda i: (_place(seed, units[i]), units[i]))
        total, before = sum(sizes[i] for i in members), 0
        for index in members:
            middle = before + sizes[index] / 2
            fold[index] = min(folds - 1, int(middle / total * folds))
            before += sizes[index]
    return fold


def cross_validation_fold(rows: Sequence[dict[str, Any]], params: IngestParams) -> None:
    """Make fold ``params.fold`` of the non-test rows val and the other folds train (rows of
    the test split keep it); by whole groups when ``params.group_by`` is set."""
    part = [r for r in rows if r["split"] != "test"]
    strata_of = [tuple(str(r.get(c, "")) for c in params.stratify_by) for r in part]
    if params.group_by is None:
        units = [r["sha256"] for r in part]
        folds = fold_of(units, [1] * len(part), strata_of, folds=params.folds, seed=params.seed)
    else:
        members: dict[str, list[int]] = defaultdict(list)
        for index, row in enumerate(part):
            members[row[params.group_by]].append(index)
        names = sorted(members)
        if params.group_method == "balanced":
            counts = {n: Counter(strata_of[i] for i in members[n]) for n in names}
            placed = balanced_assignment(counts, [1.0 / params.folds] * params.folds, params.seed)
            by_group = [placed[n] for n in names]
        else:
            majority = []
            for name in names:
                counts_of = Counter(strata_of[i] for i in members[name])
                majority.append(min(counts_of, key=lambda key: (-counts_of[key], key)))
            sizes = [len(members[name]) for name in names]
            by_group = fold_of(names, sizes, majority, folds=params.folds, seed=params.seed)
        folds = [0] * len(part)
        for name, fold in zip(names, by_group, strict=True):
            for index in members[name]:
                folds[index] = fold
    for row, fold in zip(part, folds, strict=True):
        row["split"] = "val" if fold == params.fold else "train"


def assign_splits(
    rows: Sequence[dict[str, Any]], params: IngestParams, *, predefined: bool
) -> list[str]:
    """Set each row's ``split``; return the splits carved out of the source's train split.

    Random: every row is drawn, stratified (``stratified_split``) or by whole groups
    (``grouped_split``). Predefined: each row keeps its ``_given_split``; a val or test split the
    source lacks is carved out of its train split, ``val_fraction`` / ``test_fraction`` of the
    train split's images, drawn the same way. With ``params.fold`` set, train and val are then
    that cross-validation fold of the non-test rows (``cross_validation_fold``).
    """

    def draw(part: Sequence[dict[str, Any]], val: float, test: float) -> None:
        strata = [tuple(str(r.get(c, "")) for c in params.stratify_by) for r in part]
        if params.group_by is None:
            ids = [r["sha256"] for r in part]
            drawn = stratified_split(
                ids, strata, val_fraction=val, test_fraction=test, seed=params.seed
            )
        else:
            groups = [r[params.group_by] for r in part]
            drawn = grouped_split(
                groups,
                strata,
                val_fraction=val,
                test_fraction=test,
                seed=params.seed,
                method=params.group_method,
            )
        for row, split in zip(part, drawn, strict=True):
            row["split"] = split

    if not predefined:
        draw(rows, params.val_fraction, params.test_fraction)
        if params.fold is not None:
            cross_validation_fold(rows, params)
        return []
    given = {r["_given_split"] for r in rows}
    if "train" not in given:
        raise InputError(
            f"the source's own splits hold no usable training image (found {sorted(given)}); "
            "name a train split or set ingest.split_mode: random"
        )
    asked = {"val": params.val_fraction, "test": params.test_fraction}
    carved = [s for s in ("val", "test") if s not in given and asked[s] > 0]
    for row in rows:
        row["split"] = row["_given_split"]
    if carved:
        train = [r for r in rows if r["split"] == "train"]
        fractions = {s: asked[s] if s in carved else 0.0 for s in asked}
        draw(train, fractions["val"], fractions["test"])
    if params.fold is not None:
        cross_validation_fold(rows, params)
    return carved


def check_groups(rows: Sequence[dict[str, Any]], column: str, source: Path) -> None:
    empty = sorted(r["filepath"] for r in rows if not str(r.get(column, "")).strip())
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise InputError(
            f"ingest.group_by is {column!r}, but {len(empty)} image(s) of {source} have no "
            f"{column} value (an empty cell, or no row in the metadata CSV): {shown}"
        )


DECIDING = 3
"""Groups named per class in the report and the refusal: the largest of the class."""


def deciding_groups(
    rows: Sequence[dict[str, Any]], column: str
) -> dict[str, list[tuple[str, int, str]]]:
    """Per class, its largest groups: (group, the class's images in it, the group's split)."""
    per_class: dict[str, Counter[str]] = defaultdict(Counter)
    where: dict[str, str] = {}
    for row in rows:
        per_class[row["label"]][row[column]] += 1
        where[row[column]] = row["split"]
    return {
        label: [(g, n, where[g]) for g, n in groups.most_common(DECIDING)]
        for label, groups in sorted(per_class.items())
    }


def require_grouped_classes(
    rows: Sequence[dict[str, Any]], params: IngestParams, minimum: int
) -> None:
    """Refuse a grouped split that leaves a class fewer than ``minimum`` validation or test
    images (validate would stop the run later, with no way forward but to lower a check),
    naming the class, its counts, the groups that decide them and the options."""
    assert params.group_by is not None
    per_class: dict[str, Counter[str]] = defaultdict(Counter)
    for row in rows:
        per_class[row["label"]][row["split"]] += 1
    short = {
        label: counts
        for label, counts in sorted(per_class.items())
        if min(counts["val"], counts["test"]) < minimum
    }
    if not short:
        return
    deciding = deciding_groups(rows, params.group_by)
    lines = []
    for label, counts in short.items():
        groups = ", ".join(f"{g} ({n} images, {s})" for g, n, s in deciding[label])
        lines.append(
            f"class {label!r}: {counts['train']} train, {counts['val']} val, {counts['test']} "
            f"test images in {len({r[params.group_by] for r in rows if r['label'] == label})} "
            f"groups; the largest: {groups}"
        )
    other = "balanced" if params.group_method == "stable" else "stable"
    raise InputError(
        f"grouped by {params.group_by!r} ({params.group_method} method), "
        f"{len(short)} class(es) get fewer than validate.min_images_per_class = {minimum} "
        "validation or test images:\n  " + "\n  ".join(lines) + "\nOptions: "
        f"ingest.group_method: {other}; other fractions (ingest.val_fraction, "
        "ingest.test_fraction); merge the class with another or drop it from the data; or, "
        "knowing the figures will be noisy, a lower validate.min_images_per_class"
    )


def split_report(
    rows: Sequence[dict[str, Any]], params: IngestParams, *, predefined: bool, carved: list[str]
) -> dict[str, Any]:
    """How the split was made and how close it came to what was asked."""
    total = len(rows)
    counts = Counter(r["split"] for r in rows)
    achieved = {s: round(counts[s] / total, 4) for s in SPLITS}
    report: dict[str, Any] = {
        "mode": "predefined" if predefined else "random",
        "carved_from_train": carved,
        "group_by": params.group_by,
        "achieved_fractions": achieved,
        "asked_fractions": None,
        "largest_fraction_gap": None,
        "largest_class_fraction_gap": None,
        "warnings": [],
    }
    per_class: dict[str, Counter[str]] = defaultdict(Counter)
    for row in rows:
        per_class[row["label"]][row["split"]] += 1
    report["class_fractions"] = {
        label: {s: round(c[s] / c.total(), 4) for s in SPLITS}
        for label, c in sorted(per_class.items())
    }
    if params.fold is not None:
        report["fold"] = {"fold": params.fold, "folds": params.folds}
    if not predefined:
        val, test = params.val_fraction, params.test_fraction
        if params.fold is not None:  # val is one fold of the non-test images
            val = (1.0 - test) / params.folds
        asked = {"train": 1.0 - val - test, "val": val, "test": test}
        report["asked_fractions"] = {s: round(f, 4) for s, f in asked.items()}
        report["largest_fraction_gap"] = round(max(abs(achieved[s] - asked[s]) for s in SPLITS), 4)
        report["largest_class_fraction_gap"] = round(
            max(
                abs(fractions[s] - asked[s])
                for fractions in report["class_fractions"].values()
                for s in SPLITS
            ),
            4,
        )
    if params.group_by is not None:
        spans: dict[str, Counter[str]] = defaultdict(Counter)
        for row in rows:
            spans[row[params.group_by]][row["split"]] += 1
        spanning = sorted(g for g, where in spans.items() if len(where) > 1)
        report["group_method"] = "predefined" if predefined else params.group_method
        report["groups"] = len(spans)
        report["groups_spanning_splits"] = len(spanning)
        report["deciding_groups"] = {
            label: [{"group": g, "images": n, "split": s} for g, n, s in groups]
            for label, groups in deciding_groups(rows, params.group_by).items()
        }
        if spanning:
            leaks = {g: {s: spans[g][s] for s in SPLITS if spans[g][s]} for g in spanning}
            report["group_leaks"] = leaks
            shown = "; ".join(
                f"{g} ({', '.join(f'{n} {s}' for s, n in leaks[g].items())})" for g in spanning[:10]
            )
            report["warnings"].append(
                f"LEAK: {len(spanning)} {params.group_by} group(s) of the source's own splits "
                f"sit in more than one split, so test images share a {params.group_by} with "
                f"training images and the test figures flatter: {shown}"
                + (f" and {len(spanning) - 10} more" if len(spanning) > 10 else "")
                + " (ingest.split_mode: random re-splits by whole groups)"
            )
    return report


def describe_split(method: dict[str, Any]) -> str:
    """``predefined + carved test from train``, ``random, grouped by patient (40 groups), ...``"""
    text = method["mode"]
    if method["carved_from_train"]:
        text += f" + carved {' and '.join(method['carved_from_train'])} from train"
    if method.get("fold"):
        text += (
            f", val = cross-validation fold {method['fold']['fold']} of {method['fold']['folds']}"
        )
    if method["group_by"] is not None:
        text += (
            f", grouped by {method['group_by']} ({method['groups']} groups, "
            f"{method.get('group_method', 'stable')})"
        )
    if method["asked_fractions"] is not None:
        achieved, asked = method["achieved_fractions"], method["asked_fractions"]
        text += (
            f", fractions {'/'.join(f'{achieved[s]:.2f}' for s in SPLITS)} "
            f"vs asked {'/'.join(f'{asked[s]:.2f}' for s in SPLITS)} (train/val/test; "
            f"largest gap {method['largest_fraction_gap']:.3f}, "
            f"{method['largest_class_fraction_gap']:.3f} in one class)"
        )
    if method["warnings"]:
        text += "; WARNING: " + "; ".join(method["warnings"])
    return text
