"""Fast unit tests of ingest's pure parts: the split (stratified, grouped, the source's own),
split-layout detection, hashing, de-duplication, atomic writes, params checking and a few image
checks. Nothing here imports TensorFlow or touches real data."""

from __future__ import annotations

import hashlib
import math
import os
import random
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from conftest import PROJECT, jpeg_with_orientation, make_class_folders, params, write_image

from components.ingest import discover_folder, remove_duplicates
from imgpipe.core import fileio
from imgpipe.core.params import DataParams, IngestParams, ParamsError, load_params, section
from imgpipe.data.images import ImageRejected, check_image
from imgpipe.data.splits import assign_splits, grouped_split, stratified_split


def _ids(prefix: str, n: int) -> list[str]:
    return [hashlib.sha256(f"{prefix}-{i}".encode()).hexdigest() for i in range(n)]


def _half_up(x: float) -> int:
    """What the split documents as ``round(n * fraction)``: halves round up, not to even."""
    return math.floor(x + 0.5)


def _split_map(ids, strata, **kw) -> dict[str, str]:
    return dict(zip(ids, stratified_split(ids, strata, **kw), strict=True))


# ---------------------------------------------------------------- stratified_split

SIZES = {"a": 1, "b": 2, "c": 3, "d": 7, "e": 10, "f": 13, "g": 40, "h": 101}


@pytest.mark.parametrize(
    ("val_fraction", "test_fraction"),
    [(0.2, 0.2), (0.15, 0.25), (0.1, 0.3), (0.0, 0.5), (0.3, 0.0), (0.45, 0.45)],
)
def test_split_counts_per_stratum(val_fraction, test_fraction):
    """Each stratum sends round(n*test_fraction) ids to test and round(n*val_fraction) to val
    (val capped so that test+val never exceed the stratum), the rest to train."""
    ids, strata = [], []
    for name, n in SIZES.items():
        ids += _ids(name, n)
        strata += [(name,)] * n
    splits = stratified_split(
        ids, strata, val_fraction=val_fraction, test_fraction=test_fraction, seed=7
    )
    counts: dict[str, Counter] = defaultdict(Counter)
    for stratum, split in zip(strata, splits, strict=True):
        counts[stratum[0]][split] += 1
    for name, n in SIZES.items():
        n_test = _half_up(n * test_fraction)
        n_val = min(_half_up(n * val_fraction), n - n_test)
        assert counts[name]["test"] == n_test, (name, counts[name])
        assert counts[name]["val"] == n_val, (name, counts[name])
        assert counts[name]["train"] == n - n_test - n_val, (name, counts[name])


def test_split_gives_every_id_exactly_one_known_split():
    """One split per input, in input order, each one of train/val/test: no id is left
    unassigned (the split starts from empty names), and every split gets some ids."""
    ids = _ids("x", 57) + _ids("y", 31)
    strata = [("x",)] * 57 + [("y",)] * 31
    splits = stratified_split(ids, strata, val_fraction=0.2, test_fraction=0.2, seed=1)
    assert len(splits) == len(ids)
    assert set(splits) == {"train", "val", "test"}
    assert Counter(splits) == {
        "test": _half_up(57 * 0.2) + _half_up(31 * 0.2),
        "val": _half_up(57 * 0.2) + _half_up(31 * 0.2),
        "train": 88 - 2 * (_half_up(57 * 0.2) + _half_up(31 * 0.2)),
    }


def test_split_same_seed_same_result():
    """Same ids, strata and seed give the identical assignment (reproducible splits)."""
    ids = _ids("s", 80)
    strata = [("cat",) if i % 3 else ("dog",) for i in range(80)]
    kw = dict(val_fraction=0.15, test_fraction=0.25, seed=42)
    assert stratified_split(ids, strata, **kw) == stratified_split(list(ids), list(strata), **kw)


def test_split_different_seed_different_result():
    """Another seed reshuffles: the assignment changes (but the per-split counts do not)."""
    ids = _ids("s", 100)
    strata = [("only",)] * 100
    a = stratified_split(ids, strata, val_fraction=0.2, test_fraction=0.2, seed=1)
    b = stratified_split(ids, strata, val_fraction=0.2, test_fraction=0.2, seed=2)
    assert a != b
    assert Counter(a) == Counter(b)


def test_split_does_not_depend_on_input_order():
    """Shuffling the (id, stratum) pairs does not change which split each id gets."""
    ids = _ids("o", 60) + _ids("p", 45)
    strata = [("o",)] * 60 + [("p",)] * 45
    kw = dict(val_fraction=0.2, test_fraction=0.2, seed=3)
    reference = _split_map(ids, strata, **kw)
    pairs = list(zip(ids, strata, strict=True))
    for shuffle_seed in range(3):
        random.Random(shuffle_seed).shuffle(pairs)
        shuffled_ids, shuffled_strata = zip(*pairs, strict=True)
        assert list(shuffled_ids) != ids
        assert _split_map(list(shuffled_ids), list(shuffled_strata), **kw) == reference


def test_split_new_stratum_leaves_existing_assignment_alone():
    """Adding a class (a new stratum) does not reshuffle the classes that were already there."""
    ids = _ids("old1", 30) + _ids("old2", 22)
    strata = [("old1",)] * 30 + [("old2",)] * 22
    kw = dict(val_fraction=0.2, test_fraction=0.2, seed=5)
    before = _split_map(ids, strata, **kw)
    new_ids = _ids("new", 17)
    after = _split_map(new_ids + ids, [("new",)] * 17 + strata, **kw)
    assert {i: after[i] for i in ids} == before
    assert set(after) == set(ids) | set(new_ids)


def test_split_multi_column_strata_are_separate():
    """Strata are tuples (label, metadata...): ('cat','mono') and ('cat','poly') are split
    independently, each getting its own round(n*fraction)."""
    ids = _ids("m", 10) + _ids("q", 10)
    strata = [("cat", "mono")] * 10 + [("cat", "poly")] * 10
    splits = stratified_split(ids, strata, val_fraction=0.2, test_fraction=0.3, seed=0)
    assert Counter(splits[:10]) == {"train": 5, "test": 3, "val": 2}
    assert Counter(splits[10:]) == {"train": 5, "test": 3, "val": 2}


def _moved(before: dict[str, str], after: dict[str, str]) -> int:
    return sum(after[i] != split for i, split in before.items() if i in after)


@pytest.mark.parametrize("trial", range(6))
def test_split_stays_put_as_images_are_added_and_removed(trial):
    """Adding and removing k images of a class moves at most 2k + 3 of its other images
    between splits (the bound stratified_split states), whatever the file order; the other
    classes do not move at all; the counts per split stay round(n * fraction)."""
    rng = random.Random(trial)
    kw = dict(val_fraction=0.15, test_fraction=0.25, seed=trial)
    ids = {"big": _ids(f"big{trial}", 300), "small": _ids(f"small{trial}", 40)}
    before = _split_map(ids["big"] + ids["small"], [("big",)] * 300 + [("small",)] * 40, **kw)
    added = _ids(f"new{trial}", rng.randrange(1, 60))
    removed = set(rng.sample(ids["big"], rng.randrange(0, 30)))
    grown = [i for i in ids["big"] if i not in removed] + added
    pairs = [(i, ("big",)) for i in grown] + [(i, ("small",)) for i in ids["small"]]
    rng.shuffle(pairs)
    after = _split_map([i for i, _ in pairs], [s for _, s in pairs], **kw)
    k = len(added) + len(removed)
    assert _moved(before, after) <= 2 * k + 3, (k, _moved(before, after))
    assert all(after[i] == before[i] for i in ids["small"])
    assert Counter(after[i] for i in grown)["test"] == _half_up(len(grown) * 0.25)


@pytest.mark.parametrize("new_groups", [1, 3])
def test_grouped_split_stays_put_as_groups_are_added(new_groups):
    """Adding groups of m images in all moves at most 4m + 2 x the largest group of the old
    images per label (each boundary shifts by at most m images and a group's place by at most
    m, plus half a group either side; a reshuffle would move hundreds), groups stay whole."""
    groups, strata = _grouped_data(11, n_groups=200)
    kw = {"val_fraction": 0.15, "test_fraction": 0.25, "seed": 9}
    before = grouped_split(groups, strata, **kw)
    extra_groups, extra_strata = _grouped_data(12, n_groups=new_groups)
    extra_groups = [f"new-{g}" for g in extra_groups]
    after = grouped_split(extra_groups + groups, extra_strata + strata, **kw)
    moved = sum(a != b for a, b in zip(after[len(extra_groups) :], before, strict=True))
    m = len(extra_groups)
    assert moved <= 3 * (4 * m + 2 * 6), (moved, m)
    where: dict[str, set[str]] = defaultdict(set)
    for group, split in zip(extra_groups + groups, after, strict=True):
        where[group].add(split)
    assert all(len(s) == 1 for s in where.values())


# ---------------------------------------------------------------- hashing


def test_sha256_file_matches_hashlib(tmp_path):
    """sha256_file streams the file in chunks; the digest must equal hashlib's over all bytes,
    including for a file larger than one chunk and for an empty file."""
    big = tmp_path / "big.bin"
    data = os.urandom((1 << 20) * 2 + 12345)
    big.write_bytes(data)
    assert fileio.sha256_file(big) == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert fileio.sha256_file(empty) == hashlib.sha256(b"").hexdigest()
    assert fileio.sha256_file(str(big)) == fileio.sha256_bytes(data)


def test_sha256_bytes_matches_hashlib():
    """sha256_bytes is the hex sha256 of its argument."""
    for data in (b"", b"abc", bytes(range(256)) * 100):
        assert fileio.sha256_bytes(data) == hashlib.sha256(data).hexdigest()
    assert fileio.sha256_bytes(b"abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


# ---------------------------------------------------------------- remove_duplicates


def _row(filepath: str, label: str, sha: str) -> dict:
    return {"filepath": filepath, "label": label, "sha256": sha, "width": 8, "height": 8}


def test_remove_duplicates_keeps_first_by_filepath():
    """Two copies under one label: the first by filepath stays (whatever the input order), the
    other is quarantined as 'duplicate' with a detail naming the kept file."""
    rows = [
        _row("cat/z_copy.png", "cat", "h1"),
        _row("cat/other.png", "cat", "h2"),
        _row("cat/a_orig.png", "cat", "h1"),
    ]
    kept, rejected = remove_duplicates(rows)
    assert sorted(r["filepath"] for r in kept) == ["cat/a_orig.png", "cat/other.png"]
    assert len(rejected) == 1
    (dup,) = rejected
    assert (dup.filepath, dup.label, dup.reason) == ("cat/z_copy.png", "cat", "duplicate")
    assert "cat/a_orig.png" in dup.detail


def test_remove_duplicates_label_conflict_rejects_every_copy():
    """The same bytes under two labels: no label can be trusted, so every copy is quarantined as
    'label_conflict' and none is kept; unrelated rows are untouched."""
    rows = [
        _row("cat/x.png", "cat", "same"),
        _row("dog/x.png", "dog", "same"),
        _row("dog/y.png", "dog", "same"),
        _row("dog/fine.png", "dog", "other"),
    ]
    kept, rejected = remove_duplicates(rows)
    assert [r["filepath"] for r in kept] == ["dog/fine.png"]
    assert sorted(r.filepath for r in rejected) == ["cat/x.png", "dog/x.png", "dog/y.png"]
    assert {r.reason for r in rejected} == {"label_conflict"}
    assert all("cat" in r.detail and "dog" in r.detail for r in rejected)
    assert "same" not in {r["sha256"] for r in kept}


def test_remove_duplicates_no_duplicates_is_identity():
    """Distinct hashes: everything is kept, nothing is rejected."""
    rows = [_row(f"c/{i}.png", "c", f"h{i}") for i in range(5)]
    kept, rejected = remove_duplicates(rows)
    assert rejected == []
    assert sorted(r["filepath"] for r in kept) == sorted(r["filepath"] for r in rows)


def _split_row(filepath: str, label: str, sha: str, given: str) -> dict:
    return {**_row(filepath, label, sha), "_given_split": given}


def test_remove_duplicates_image_in_two_splits_is_a_leak_kept_in_the_earliest():
    """The same image in the source's test and train splits is a 'split_leak', kept once, in
    train (the earliest of train, val, test) although 'test/' sorts first by path; a copy within
    one split is still a 'duplicate'."""
    rows = [
        _split_row("test/cat/leaked.png", "cat", "h1", "test"),
        _split_row("val/cat/leaked.png", "cat", "h1", "val"),
        _split_row("train/cat/x.png", "cat", "h1", "train"),
        _split_row("test/cat/a.png", "cat", "h2", "test"),
        _split_row("test/cat/b.png", "cat", "h2", "test"),
    ]
    kept, rejected = remove_duplicates(rows)
    assert sorted((r["filepath"], r["_given_split"]) for r in kept) == [
        ("test/cat/a.png", "test"),
        ("train/cat/x.png", "train"),
    ]
    reasons = {r.filepath: (r.reason, r.detail) for r in rejected}
    assert reasons == {
        "test/cat/leaked.png": ("split_leak", "also in train: train/cat/x.png (kept there)"),
        "val/cat/leaked.png": ("split_leak", "also in train: train/cat/x.png (kept there)"),
        "test/cat/b.png": ("duplicate", "exact copy of test/cat/a.png"),
    }


# ---------------------------------------------------------------- grouped_split


def _grouped_data(seed: int, n_groups: int = 60) -> tuple[list[str], list[tuple[str, ...]]]:
    """Groups of 1-6 images, each mostly of one label (as a patient's images would be)."""
    rng = np.random.default_rng(seed)
    labels = ("a", "b", "c")
    groups, strata = [], []
    for g in range(n_groups):
        main = labels[int(rng.integers(3))]
        for _ in range(int(rng.integers(1, 7))):
            label = main if rng.random() < 0.7 else labels[int(rng.integers(3))]
            groups.append(f"patient-{g:03d}")
            strata.append((label,))
    return groups, strata


@pytest.mark.parametrize("data_seed", [0, 1, 2])
def test_grouped_split_keeps_groups_whole_fractions_and_label_mix(data_seed):
    """No group in two splits; each split within 0.03 of its asked fraction; each label's
    share in each split within 0.08 of its share in the whole data set (200 groups of 1-6
    images, 70 % of a group's images of its main label: a stable split places whole groups
    by their hash, so the mix is as good as the groups' granularity allows)."""
    groups, strata = _grouped_data(data_seed, n_groups=200)
    splits = grouped_split(groups, strata, val_fraction=0.15, test_fraction=0.25, seed=42)
    where: dict[str, set[str]] = defaultdict(set)
    for group, split in zip(groups, splits, strict=True):
        where[group].add(split)
    assert all(len(s) == 1 for s in where.values())
    n = len(splits)
    for split, asked in (("train", 0.60), ("val", 0.15), ("test", 0.25)):
        assert abs(splits.count(split) / n - asked) < 0.03, (split, Counter(splits))
    overall = Counter(s[0] for s in strata)
    for split in ("train", "val", "test"):
        labels = Counter(st[0] for st, sp in zip(strata, splits, strict=True) if sp == split)
        for label, count in overall.items():
            share = labels[label] / sum(labels.values())
            assert abs(share - count / n) < 0.08, (split, label, labels)


def test_grouped_split_does_not_depend_on_input_order_but_on_the_seed():
    """Shuffling the input gives every image the same split; another seed another split."""
    groups, strata = _grouped_data(5)
    kw = {"val_fraction": 0.2, "test_fraction": 0.2, "seed": 3}
    first = grouped_split(groups, strata, **kw)
    order = list(range(len(groups)))
    random.Random(0).shuffle(order)
    shuffled = grouped_split([groups[i] for i in order], [strata[i] for i in order], **kw)
    assert [shuffled[order.index(i)] for i in range(len(groups))] == first
    assert grouped_split(groups, strata, **{**kw, "seed": 4}) != first


def test_grouped_split_zero_fraction_split_gets_nothing():
    groups, strata = _grouped_data(7, n_groups=20)
    splits = grouped_split(groups, strata, val_fraction=0.0, test_fraction=0.3, seed=1)
    assert set(splits) == {"train", "test"}


# ---------------------------------------------------------------- the source's own splits


def _given_rows(counts: dict[str, dict[str, int]]) -> list[dict]:
    """Rows as ingest has them after de-duplication: ``counts[split][label]`` of each."""
    return [
        _split_row(f"{split}/{label}/{i}.png", label, f"{split}-{label}-{i}", split)
        for split, labels in counts.items()
        for label, n in labels.items()
        for i in range(n)
    ]


@pytest.mark.parametrize(("given", "carved"), [("val", "test"), ("test", "val")])
def test_assign_splits_carves_the_missing_split_out_of_train_stratified(given, carved):
    """train/ + validation/ only: test is carved out of train, round(n * test_fraction) of
    each label's train images; the given val images stay. Likewise val out of train/ + test/."""
    rows = _given_rows({"train": {"a": 40, "b": 20}, given: {"a": 5, "b": 5}})
    ingest = params("ingest", val_fraction=0.1, test_fraction=0.25, group_by=None)
    assert assign_splits(rows, ingest, predefined=True) == [carved]
    fraction = {"val": 0.1, "test": 0.25}[carved]
    for label, n in (("a", 40), ("b", 20)):
        from_train = [r for r in rows if r["_given_split"] == "train" and r["label"] == label]
        assert Counter(r["split"] for r in from_train) == {
            carved: _half_up(n * fraction),
            "train": n - _half_up(n * fraction),
        }
    assert all(r["split"] == given for r in rows if r["_given_split"] == given)


def test_assign_splits_keeps_three_given_splits_and_needs_train():
    rows = _given_rows({"train": {"a": 4}, "val": {"a": 2}, "test": {"a": 3}})
    ingest = params("ingest", group_by=None)
    assert assign_splits(rows, ingest, predefined=True) == []
    assert all(r["split"] == r["_given_split"] for r in rows)
    with pytest.raises(ValueError, match=r"no usable training image \(found \['test', 'val'\]\)"):
        assign_splits(_given_rows({"val": {"a": 2}, "test": {"a": 3}}), ingest, predefined=True)


@pytest.mark.parametrize("val_name", ["val", "validation", "Validation"])
def test_keras_layout_is_detected_with_either_val_spelling(tmp_path, val_name):
    """``root/{train,<val_name>,test}/<class>/``: each file keeps the folder's split; its label
    is the class folder, not the split folder."""
    for split, seed in (("train", 1), (val_name, 2), ("test", 3)):
        make_class_folders(tmp_path / split, {"cat": 2, "dog": 2}, size=8, seed=seed)
    found = discover_folder(tmp_path)
    assert found.has_splits and not found.rejections
    assert len(found.candidates) == 12
    for c in found.candidates:
        assert c.given_split == c.filepath.split("/")[0]
        assert c.label == c.filepath.split("/")[1] in ("cat", "dog")


@pytest.mark.parametrize(
    "layout",
    [
        {"train": 2, "bus": 2},  # a class called train among others
        {"train": 2, "test": 2},  # only split names, but train/ holds images, not classes
    ],
)
def test_class_folder_named_train_is_not_a_split_layout(tmp_path, layout):
    """Only top-level folders all named after splits, train/ among them holding folders, make
    a split layout."""
    make_class_folders(tmp_path, layout, size=8)
    if "bus" in layout:  # train/ holding a folder: bus, no split name, still rules it out
        write_image(tmp_path / "train" / "nested" / "x.png", np.zeros((8, 8, 3), np.uint8))
    found = discover_folder(tmp_path)
    assert not found.has_splits
    assert {c.label for c in found.candidates} == set(layout)
    assert {c.given_split for c in found.candidates} == {None}


def test_split_layout_files_outside_class_folders_are_rejected(tmp_path):
    make_class_folders(tmp_path / "train", {"cat": 2}, size=8)
    (tmp_path / "README.txt").write_text("hello")
    (tmp_path / "train" / "loose.png").write_bytes(b"x")
    found = discover_folder(tmp_path)
    assert found.has_splits
    assert sorted((r.filepath, r.reason) for r in found.rejections) == [
        ("README.txt", "outside_class_folder"),
        ("train/loose.png", "outside_class_folder"),
    ]


# ---------------------------------------------------------------- atomic_path


def _leftovers(parent: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


def test_atomic_path_error_leaves_old_file_and_no_temp(tmp_path):
    """An exception inside the block: the old target keeps its content and no temporary is left
    next to it."""
    target = tmp_path / "report.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="boom"), fileio.atomic_path(target) as tmp:
        tmp.write_text("half written")
        raise RuntimeError("boom")
    assert target.read_text() == "old\n"
    assert _leftovers(tmp_path, {"report.csv"}) == []


def test_atomic_path_error_leaves_old_folder_and_no_temp(tmp_path):
    """Same for a folder output (ingest's output directory): the old folder stays whole."""
    target = tmp_path / "out"
    target.mkdir()
    (target / "manifest.csv").write_text("old")
    with pytest.raises(ValueError), fileio.atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "manifest.csv").write_text("new")
        raise ValueError("stage failed")
    assert sorted(p.name for p in target.iterdir()) == ["manifest.csv"]
    assert (target / "manifest.csv").read_text() == "old"
    assert _leftovers(tmp_path, {"out"}) == []


def test_atomic_path_success_replaces_target(tmp_path):
    """On success the new content replaces the old (file and folder), with no temp left over."""
    target = tmp_path / "report.csv"
    target.write_text("old\n")
    with fileio.atomic_path(target) as tmp:
        tmp.write_text("new\n")
        assert target.read_text() == "old\n"  # readers still see the old one meanwhile
    assert target.read_text() == "new\n"

    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "stale.txt").write_text("stale")
    with fileio.atomic_path(folder) as tmp:
        tmp.mkdir()
        (tmp / "fresh.txt").write_text("fresh")
    assert sorted(p.name for p in folder.iterdir()) == ["fresh.txt"]
    assert _leftovers(tmp_path, {"report.csv", "out"}) == []


def test_atomic_path_creates_missing_parents_and_requires_output(tmp_path):
    """A new target in a missing folder is created; writing nothing is an error, not an empty
    output, and the missing target stays missing."""
    target = tmp_path / "a" / "b" / "x.json"
    fileio.write_json_atomic(target, {"k": 1})
    assert target.read_text() == '{\n  "k": 1\n}\n'
    other = tmp_path / "a" / "nothing.txt"
    with pytest.raises(FileNotFoundError), fileio.atomic_path(other):
        pass
    assert not other.exists()
    assert _leftovers(tmp_path / "a", {"b"}) == []


# ---------------------------------------------------------------- params.section


def test_section_unknown_key_is_named():
    """A typo in params.yaml is an error naming the key with its section and the keys that
    exist, never ignored."""
    with pytest.raises(ParamsError) as excinfo:
        params("ingest", val_fractoin=0.1)
    message = str(excinfo.value)
    assert message.startswith("unknown key ingest.val_fractoin; expected some of: ")
    assert "val_fraction" in message.split("expected some of: ", 1)[1]


def test_section_wrong_type_is_named():
    """A value of the wrong type names 'section.key' and the value; strict: no "42" for an int,
    no bool for an int, no bare string for a list, no float for an int."""
    cases = [
        ("ingest", {"seed": "42"}, "ingest.seed: Input should be a valid integer, got '42'"),
        ("ingest", {"max_pixels": True}, "ingest.max_pixels: Input should be a valid integer"),
        ("ingest", {"stratify_by": "label"}, "ingest.stratify_by: Input should be a valid tuple"),
        ("ingest", {"stratify_by": ["label", 3]}, "ingest.stratify_by.1: Input should be a valid"),
        (
            "ingest",
            {"split_mode": "folders"},
            "ingest.split_mode: Input should be 'auto', 'random' or 'predefined', got 'folders'",
        ),
        ("ingest", {"group_by": 3}, "ingest.group_by: Input should be a valid string, got 3"),
        ("validate", {"min_side": 3.5}, "validate.min_side: Input should be a valid integer"),
    ]
    for name, overrides, expected in cases:
        with pytest.raises(ParamsError) as excinfo:
            params(name, **overrides)
        assert str(excinfo.value).startswith(expected), (overrides, str(excinfo.value))


def test_section_missing_key_is_named():
    """params.yaml is the only home of defaults: a section without one of its keys is an error
    that names each missing key, not a silent fallback."""
    raw = load_params(PROJECT / "params.yaml")
    del raw["ingest"]["seed"], raw["ingest"]["images_per_shard"]
    with pytest.raises(ParamsError) as excinfo:
        section(IngestParams, "ingest", raw)
    assert str(excinfo.value) == "ingest.seed is missing; ingest.images_per_shard is missing"


def test_missing_section_is_named(tmp_path):
    """A section absent from params.yaml is an error naming it and the sections found."""
    raw = load_params(PROJECT / "params.yaml")
    del raw["data"]
    with pytest.raises(ParamsError, match=r"params section 'data' is missing \(found: ingest, "):
        section(DataParams, "data", raw)
    empty = tmp_path / "params.yaml"
    empty.write_text("")
    with pytest.raises(ParamsError, match=r"params section 'data' is missing \(found: none\)"):
        section(DataParams, "data", load_params(empty))


def test_section_rejects_fractions_leaving_no_training_data():
    """val_fraction + test_fraction >= 1 would leave train empty: rejected."""
    for val, test in ((0.5, 0.5), (0.6, 0.45)):
        with pytest.raises(ParamsError, match="leave images for training"):
            params("ingest", val_fraction=val, test_fraction=test)
    with pytest.raises(ParamsError, match=r"ingest\.test_fraction must be in \[0, 1\), got 1\.0"):
        params("ingest", test_fraction=1.0)


def test_section_valid_values_are_coerced():
    """Happy path: ints are accepted for floats (as floats), lists become tuples, and every
    key not overridden keeps the project's value."""
    ingest = params("ingest", val_fraction=0, stratify_by=["label", "module_type"])
    assert ingest.val_fraction == 0.0 and isinstance(ingest.val_fraction, float)
    assert ingest.stratify_by == ("label", "module_type")
    project = load_params(PROJECT / "params.yaml")["ingest"]
    assert ingest.test_fraction == project["test_fraction"]
    assert ingest.seed == project["seed"]


# ---------------------------------------------------------------- images.check_image


def test_check_image_orientation_outside_2_to_8_is_not_a_transposition(tmp_path):
    """EXIF Orientation 0 (written by some software), 1 or 9 leaves pixels as stored: the
    manifest must not claim exif_transposed, and a clean JPEG is kept byte for byte.
    Orientations 5..8 swap width and height, 2..4 do not."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 200
    for orientation in range(10):
        path = jpeg_with_orientation(tmp_path / f"o{orientation}.jpg", pixels, orientation)
        data = path.read_bytes()
        checked = check_image(data, max_pixels=10_000)
        if orientation in (0, 1, 9):
            assert (checked.width, checked.height, checked.exif_transposed) == (40, 20, False)
            assert checked.encoded is data and checked.encoded_format == "jpeg"
        else:
            assert checked.exif_transposed and checked.encoded_format == "png"
            assert (checked.width, checked.height) == ((20, 40) if orientation >= 5 else (40, 20))


def test_check_image_rejection_detail_is_reproducible():
    """The quarantine report is a DVC output: the same unreadable bytes must give the same
    detail text every time (no object addresses in it)."""
    details = set()
    for _ in range(3):
        with pytest.raises(ImageRejected) as excinfo:
            check_image(b"not a picture\n", max_pixels=100)
        assert excinfo.value.reason == "not_an_image"
        details.add(excinfo.value.detail)
    assert len(details) == 1
    assert " at 0x" not in details.pop()


# ---------------------------------------------------------------- cross-validation folds


def _rows(ids: list[str], labels: list[str], groups: list[str] | None = None) -> list[dict]:
    rows = [
        {"sha256": i, "label": label, "split": ""} for i, label in zip(ids, labels, strict=True)
    ]
    for row, group in zip(rows, groups or [], strict=False):
        row["patient"] = group
    return rows


def test_folds_partition_the_non_test_images_and_leave_test_alone():
    """Over the five folds, every non-test image is val exactly once and train otherwise, each
    fold holds a fifth of each class (within one image), the test split is the one drawn
    without folds, and fold 0 is the val split itself when val is a fifth of the non-test."""
    ids = _ids("a", 160) + _ids("b", 80) + _ids("c", 33)
    labels = ["a"] * 160 + ["b"] * 80 + ["c"] * 33
    base = params("ingest", val_fraction=0.15, test_fraction=0.25, stratify_by=["label"])
    plain = _rows(ids, labels)
    assign_splits(plain, base, predefined=False)
    held_out: Counter[str] = Counter()
    for fold in range(5):
        rows = _rows(ids, labels)
        assign_splits(rows, params("ingest", stratify_by=["label"], fold=fold), predefined=False)
        assert [r["split"] == "test" for r in rows] == [r["split"] == "test" for r in plain]
        val = [r for r in rows if r["split"] == "val"]
        held_out.update(r["sha256"] for r in val)
        for label in sorted(set(labels)):
            non_test = sum(1 for r in plain if r["label"] == label and r["split"] != "test")
            in_fold = sum(1 for r in val if r["label"] == label)
            assert abs(in_fold - non_test / 5) <= 1, (fold, label, in_fold, non_test)
        if fold == 0:
            plain_val = {r["sha256"] for r in plain if r["split"] == "val"}
            assert len(plain_val ^ {r["sha256"] for r in val}) <= 3  # rounding at the cuts
    non_test = {r["sha256"] for r in plain if r["split"] != "test"}
    assert set(held_out) == non_test and set(held_out.values()) == {1}


def test_grouped_folds_keep_groups_whole():
    """With ingest.group_by, a group is in one fold: never val in one run and train in it."""
    groups, strata = _grouped_data(3, n_groups=120)
    ids = [f"img{i:04d}" for i in range(len(groups))]
    held_out: dict[str, set[int]] = defaultdict(set)
    for fold in range(4):
        rows = _rows(ids, [s[0] for s in strata], groups)
        ingest = params("ingest", group_by="patient", stratify_by=["label"], folds=4, fold=fold)
        assign_splits(rows, ingest, predefined=False)
        for row in rows:
            if row["split"] == "val":
                held_out[row["patient"]].add(fold)
    assert held_out and all(len(folds) == 1 for folds in held_out.values())


@pytest.mark.parametrize("fold", [-1, 5])
def test_a_fold_outside_the_folds_is_refused(fold):
    with pytest.raises(ParamsError, match=r"ingest\.fold must be null or in \[0, folds=5\)"):
        params("ingest", fold=fold)


def _heavy_tailed(groups: int = 344, images: int = 5096, seed: int = 0, prefix: str = "s"):
    """Grouped data like a photo set by sender: group sizes fall off as 1 / rank^0.9 (the
    largest about 12 % of the images, the five largest about 29 %), and most groups hold
    several of 17 classes (each group its own mix around the data set's class frequencies)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, groups + 1) ** 0.9
    sizes = np.maximum(1, np.round(weights / weights.sum() * images)).astype(int)
    frequencies = rng.dirichlet(np.full(17, 2.0))
    rows = []
    for g, size in enumerate(sizes):
        mix = rng.dirichlet(frequencies * 17 * 0.3)
        rows += [(f"{prefix}{g:04d}", f"c{c:02d}") for c in rng.choice(17, size=size, p=mix)]
    return rows


ASKED = {"train": 0.6, "val": 0.15, "test": 0.25}


def _class_gap(rows, splits, asked=ASKED) -> float:
    per_class = defaultdict(Counter)
    for (_, label), split in zip(rows, splits, strict=True):
        per_class[label][split] += 1
    return max(abs(c[s] / c.total() - f) for c in per_class.values() for s, f in asked.items())


def test_grouped_methods_on_heavy_tailed_multiclass_groups():
    """On sender-like data (the largest group over 10 % of the images, most groups spanning
    several classes): both methods keep every group whole; ``balanced`` meets every class's
    fractions to within 0.05 where ``stable`` (each group placed by its name's hash within its
    majority class) misses by far more; adding 10 % new groups moves few old images under
    ``stable``: within its stated bound (per stratum and boundary: the images added plus the
    largest group) and under 10 %."""
    rows = _heavy_tailed()
    sizes = Counter(g for g, _ in rows)
    assert max(sizes.values()) / len(rows) >= 0.10
    groups, strata = [g for g, _ in rows], [(label,) for _, label in rows]
    split = {}
    for method in ("stable", "balanced"):
        split[method] = grouped_split(
            groups, strata, val_fraction=0.15, test_fraction=0.25, seed=42, method=method
        )
        where = defaultdict(set)
        for group, s in zip(groups, split[method], strict=True):
            where[group].add(s)
        assert all(len(s) == 1 for s in where.values()), method
    assert _class_gap(rows, split["balanced"]) <= 0.05
    assert _class_gap(rows, split["stable"]) > 2 * _class_gap(rows, split["balanced"])

    added = _heavy_tailed(groups=34, images=510, seed=1, prefix="new")
    grown = rows + added
    again = grouped_split(
        [g for g, _ in grown], [(label,) for _, label in grown],
        val_fraction=0.15, test_fraction=0.25, seed=42, method="stable",
    )  # fmt: skip
    moved = sum(a != b for a, b in zip(split["stable"], again, strict=False))
    majority = {}
    for group in sizes:
        labels = Counter(label for g, label in rows if g == group)
        majority[group] = min(labels, key=lambda k: (-labels[k], k))
    largest = Counter()
    for group, stratum in majority.items():
        largest[stratum] = max(largest[stratum], sizes[group])
    bound = 2 * (len(added) + sum(largest.values()))
    assert moved <= bound and moved <= 0.10 * len(rows), (moved, bound)


def test_a_grouped_split_that_starves_a_class_is_refused_naming_it_and_the_ways_forward():
    from imgpipe.core.errors import InputError
    from imgpipe.data.splits import require_grouped_classes

    rows = [
        {"label": "common", "patient": f"p{i % 40}", "split": s, "sha256": f"{i:064d}"}
        for i, s in enumerate(["train"] * 60 + ["val"] * 20 + ["test"] * 20)
    ]
    rows += [
        {"label": "rare", "patient": "big", "split": "train", "sha256": f"r{i:063d}"}
        for i in range(30)
    ]
    ingest = params("ingest", group_by="patient", group_method="stable")
    with pytest.raises(InputError) as refused:
        require_grouped_classes(rows, ingest, minimum=3)
    message = str(refused.value)
    assert "class 'rare': 30 train, 0 val, 0 test images in 1 groups" in message, message
    assert "big (30 images, train)" in message and "ingest.group_method: balanced" in message
    assert "merge the class with another or drop it" in message
    require_grouped_classes(rows[:100], ingest, minimum=3)  # common alone: ok


def test_balanced_folds_keep_groups_whole_and_spread_classes():
    """``group_method: balanced`` folds (imgpipe crossval): no group in two folds, and each
    class's non-test images spread over the 5 folds near a fifth each: off by no more than
    its largest group's share of it (which must sit in one fold) and 0.05."""
    from imgpipe.data.splits import cross_validation_fold

    data = _heavy_tailed(groups=200, images=3000)
    rows = [
        {"sha256": f"{i:064d}", "label": label, "sender": group, "split": "train"}
        for i, (group, label) in enumerate(data)
    ]
    folds_of = {}
    for fold in range(5):
        copy = [dict(r) for r in rows]
        ingest = params("ingest", group_by="sender", group_method="balanced", fold=fold)
        cross_validation_fold(copy, ingest)
        for row in copy:
            if row["split"] == "val":
                assert row["sha256"] not in folds_of
                folds_of[row["sha256"]] = fold
    assert len(folds_of) == len(rows)  # every image in exactly one fold
    per_group = defaultdict(set)
    for row in rows:
        per_group[row["sender"]].add(folds_of[row["sha256"]])
    assert all(len(f) == 1 for f in per_group.values())
    per_class = defaultdict(Counter)
    for row in rows:
        per_class[row["label"]][folds_of[row["sha256"]]] += 1
    for label, counts in per_class.items():
        largest = max(Counter(g for g, c in data if c == label).values()) / counts.total()
        worst = max(abs(counts[f] / counts.total() - 0.2) for f in range(5))
        assert worst <= largest + 0.05, (label, counts, largest)


def test_a_predefined_split_with_a_group_in_two_splits_is_reported_as_a_leak(tmp_path):
    from imgpipe.data.splits import split_report

    rows = [
        {"label": "a", "patient": "p1", "split": "train"},
        {"label": "a", "patient": "p1", "split": "test"},
        {"label": "a", "patient": "p1", "split": "test"},
        {"label": "b", "patient": "p2", "split": "train"},
    ]
    report = split_report(rows, params("ingest", group_by="patient"), predefined=True, carved=[])
    assert report["group_leaks"] == {"p1": {"train": 1, "test": 2}}
    (warning,) = report["warnings"]
    assert warning.startswith("LEAK: 1 patient group(s)") and "p1 (1 train, 2 test)" in warning
