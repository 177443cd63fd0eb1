"""The growing-data scenario's own parts, without running a pipeline: the three data versions
it writes, and the split moves it measures between two manifests. The scenario itself runs
the real pipeline (``imgpipe growing-data``); its figures are in docs/evaluation.md."""

from __future__ import annotations

import hashlib

import pytest
from conftest import make_class_folders

from imgpipe.core.params import ParamsError, load_params, with_sets
from imgpipe.data.splits import stratified_split
from pipelines import growing


def _digests(folder):
    return {
        hashlib.sha256(p.read_bytes()).hexdigest(): p.parent.name
        for p in folder.rglob("*")
        if p.is_file()
    }


def test_versions_grow_by_the_fraction_and_relabel_part_of_the_largest_class(tmp_path):
    make_class_folders(tmp_path / "src", {"a": 60, "b": 30, "c": 22}, size=16)
    before = {p: p.read_bytes() for p in (tmp_path / "src").rglob("*") if p.is_file()}
    made = growing.make_versions(
        tmp_path / "src", tmp_path / "work", new_fraction=0.1, corrupt_fraction=0.25, seed=0
    )
    v1, v2, v3 = (_digests(tmp_path / "work" / f"data_{v}") for v in growing.VERSIONS)
    assert made["new_in_v2"] == {"a": 5, "b": 3, "c": 2}  # round(n * 0.1 / 1.1)
    assert set(v1) < set(v2) and len(v2) - len(v1) == 10
    assert all(v1[d] == v2[d] for d in v1)
    assert set(v3) == set(v2)
    changed = {d: (v2[d], v3[d]) for d in v2 if v2[d] != v3[d]}
    assert made["relabelled_in_v3"] == {"from": "a", "to": "b", "images": 15}
    assert set(changed.values()) == {("a", "b")} and len(changed) == 15
    # The source is read, never written.
    assert {p: p.read_bytes() for p in (tmp_path / "src").rglob("*") if p.is_file()} == before


def test_a_source_with_split_folders_is_refused(tmp_path):
    make_class_folders(tmp_path / "src" / "train", {"a": 3}, size=8)
    make_class_folders(tmp_path / "src" / "test", {"a": 3}, size=8)
    with pytest.raises(growing.ScenarioError, match="split folders"):
        growing.make_versions(
            tmp_path / "src", tmp_path / "work", new_fraction=0.1, corrupt_fraction=0.25, seed=0
        )


def _manifest(ids, labels, split):
    return {i: {"label": labels[i], "split": split[i]} for i in ids}


def test_split_moves_count_old_images_against_two_k_plus_three():
    labels = {f"{c}{n:03d}": c for c in "ab" for n in range(200)}
    ids = sorted(labels)
    old = ids[:180] + ids[200:380]  # 20 new images in each class

    def split(chosen):
        strata = [(labels[i],) for i in chosen]
        drawn = stratified_split(chosen, strata, val_fraction=0.15, test_fraction=0.25, seed=1)
        return _manifest(chosen, labels, dict(zip(chosen, drawn, strict=True)))

    moves = growing.split_moves(split(old), split(ids))
    assert moves["added"] == 40 and moves["removed"] == 0
    assert moves["bound"] == 2 * (2 * 20 + 3)
    assert 0 < moves["images"] <= moves["bound"]
    assert sum(c["moved"] for c in moves["by_class"].values()) == moves["images"]


def test_set_overrides_are_checked_like_a_profile():
    params = load_params()
    quick = with_sets(params, ["model.image_size=96", "evaluate.min_accuracy=0.5"])
    assert quick["model"]["image_size"] == 96 and quick["evaluate"]["min_accuracy"] == 0.5
    assert params["model"]["image_size"] == load_params()["model"]["image_size"]  # a copy
    with pytest.raises(ParamsError, match=r"unknown key model\.size"):
        with_sets(params, ["model.size=96"])
    with pytest.raises(ParamsError, match=r"section\.key=value"):
        with_sets(params, ["image_size=96"])


def test_a_relabelled_image_leaves_one_class_and_joins_another():
    before = {"x": {"label": "a", "split": "train"}, "y": {"label": "a", "split": "test"}}
    after = {"x": {"label": "b", "split": "test"}, "y": {"label": "a", "split": "train"}}
    moves = growing.split_moves(before, after)
    assert moves["added"] == 1 and moves["removed"] == 1
    assert moves["by_class"] == {"a": {"moved": 1, "bound": 5}, "b": {"moved": 0, "bound": 5}}
