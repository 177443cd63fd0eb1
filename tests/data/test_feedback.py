"""Labelled feedback into the data folder (imgpipe.data.feedback): labels checked by name, nothing
written outside the data folder, duplicates skipped or held for review and named, and an append
that a crash leaves either whole or absent."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from imgpipe.core.errors import InputError
from imgpipe.data import feedback


def _data(root: Path) -> Path:
    """data/ with class folders ``ok`` and ``broken``, two images each (bytes are enough:
    the plan compares contents, it does not decode them)."""
    for label in ("ok", "broken"):
        (root / "data" / label).mkdir(parents=True)
        for i in range(2):
            (root / "data" / label / f"{i}.png").write_bytes(f"{label}-{i}".encode())
    return root / "data"


def _row(path: Path, label: str | None, scored: bool = True) -> dict:
    from imgpipe.core.fileio import sha256_file

    row = {"filepath": path.name, "path": path, "label": label, "sha256": sha256_file(path)}
    if scored:
        row["predicted"] = "ok"
    return row


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_labels_are_the_champions_classes_or_named_new_ones():
    feedback.check_labels(["ok", "broken", None], ["ok", "broken"])
    with pytest.raises(InputError, match=r"'brokn' \(2\), 'okk' \(1\).*--new-class"):
        feedback.check_labels(["brokn", "okk", "brokn", "ok"], ["ok", "broken"])
    feedback.check_labels(["cracked"], ["ok", "broken"], new_classes=["cracked"])
    for bad in ("../x", "..", ".hidden", "a/b", "a\\b", "", "x\x00y", "tab\there"):
        with pytest.raises(InputError, match="not a plain folder name"):
            feedback.safe_label(bad)
    with pytest.raises(InputError, match="not a plain folder name"):
        feedback.check_labels(["../x"], ["ok"], new_classes=["../x"])


def test_append_skips_duplicates_holds_corrections_and_names_every_file(tmp_path):
    data = _data(tmp_path)
    given = tmp_path / "feedback"
    given.mkdir()
    new = given / "new.png"
    new.write_bytes(b"a new image")
    again = given / "again.png"
    again.write_bytes(b"a new image")
    same = given / "0.png"
    same.write_bytes(b"ok-0")  # already in data/ok
    corrected = given / "1.png"
    corrected.write_bytes(b"ok-1")  # in data/ok, given as broken
    unread = given / "bad.png"
    unread.write_bytes(b"x")
    rows = [
        _row(new, "ok"),
        _row(again, "ok"),
        _row(same, "ok"),
        _row(corrected, "broken"),
        {**_row(unread, "ok", scored=False), "error": "not_an_image"},
        _row(new, None),
    ]
    before = _snapshot(data)
    planned = feedback.plan(rows, feedback.data_images(data))
    assert planned.counts() == {"appended": 1, "skipped": 4, "for_review": 1}
    assert dict(planned.skipped) == {
        "again.png": "the same image as new.png in this feedback",
        "0.png": "already in the data as ok/0.png",
        "bad.png": "not scored: not_an_image",
        "new.png": "no label",
    }
    assert planned.review == [("1.png", "broken", "ok/1.png", "ok")]

    written = feedback.append(planned, data, "20261206T000000")
    assert written == [data / "ok" / "feedback-20261206T000000" / "new.png"]
    after = _snapshot(data)
    assert after == {**before, "ok/feedback-20261206T000000/new.png": b"a new image"}
    assert not list(tmp_path.glob(".data.feedback-*"))  # no staging left
    with pytest.raises(InputError, match="was appended"):
        feedback.append(planned, data, "20261206T000000")


def test_a_target_that_resolves_outside_the_data_folder_is_refused(tmp_path):
    data = _data(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.rmtree(data / "broken")
    (data / "broken").symlink_to(outside, target_is_directory=True)
    image = tmp_path / "x.png"
    image.write_bytes(b"new")
    planned = feedback.plan([_row(image, "broken")], feedback.data_images(data))
    with pytest.raises(InputError, match="outside the data folder"):
        feedback.append(planned, data, "20261206T000000")
    assert list(outside.iterdir()) == []


def test_a_crash_leaves_the_append_whole_or_absent(tmp_path, monkeypatch):
    data = _data(tmp_path)
    images = []
    for i, label in enumerate(("ok", "broken", "ok")):
        path = tmp_path / f"new{i}.png"
        path.write_bytes(f"new {i}".encode())
        images.append(_row(path, label))
    planned = feedback.plan(images, feedback.data_images(data))
    before = _snapshot(data)

    copy = shutil.copyfile
    calls = []

    def dies_on_the_second_copy(src, dst, **kwargs):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("disk full")
        return copy(src, dst, **kwargs)

    monkeypatch.setattr(feedback.shutil, "copyfile", dies_on_the_second_copy)
    with pytest.raises(OSError, match="disk full"):
        feedback.append(planned, data, "20261206T000001")
    monkeypatch.undo()
    assert _snapshot(data) == before  # nothing of a half-copied append is in the data
    assert feedback.finish_pending(data) == [
        "removed the unfinished append of 20261206T000001: the data was not touched"
    ]

    rename = os.rename
    moves = []

    def dies_after_the_first_move(src, dst):
        moves.append(src)
        if len(moves) == 2:
            raise OSError("killed")
        return rename(src, dst)

    monkeypatch.setattr(feedback.os, "rename", dies_after_the_first_move)
    with pytest.raises(OSError, match="killed"):
        feedback.append(planned, data, "20261206T000002")
    monkeypatch.undo()
    assert feedback.finish_pending(data) == [
        "finished the append of 20261206T000002 (1 folders moved in)"
    ]
    added = sorted(set(_snapshot(data)) - set(before))
    assert added == [
        "broken/feedback-20261206T000002/new1.png",
        "ok/feedback-20261206T000002/new0.png",
        "ok/feedback-20261206T000002/new2.png",
    ]
