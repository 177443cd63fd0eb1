"""Ingest against a corpus of bad inputs, generated here: every file lands in the manifest or the
quarantine report with the right reason, the source is never written, and the TFRecord shards
decode with TensorFlow to exactly the pixels ingest checked.

These run the whole stage (TensorFlow writes the shards), so they are marked slow.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    class_pattern,
    encode_image,
    jpeg_with_orientation,
    make_class_folders,
    params,
    png_claiming_size,
    read_csv_rows,
    sha256_of,
    tree_digests,
    write_image,
)
from PIL import Image

from components import ingest
from imgpipe.core.params import IngestParams, ParamsError

pytestmark = pytest.mark.slow

UNICODE_NAME = "çat_ü_日本.png"
GOOD_PER_CLASS = 10
PARAMS = params("ingest", val_fraction=0.2, test_fraction=0.2, max_pixels=50_000_000)

# filepath (relative to the data root) -> the quarantine reason it must get
EXPECTED_REJECTED = {
    "cat/truncated.jpg": "decode_error",
    "cat/zero_bytes.png": "empty_file",
    "cat/notes.png": "not_an_image",
    "dog/bomb_20000x20000.png": "decompression_bomb",
    "cat/outside_link.png": "symlink_outside_root",
    "empty_class/": "empty_class_folder",
}
# odd but valid files that must be ingested
EXPECTED_KEPT = [
    "cat/cmyk.jpg",
    "dog/gray16.png",
    "dog/palette_alpha.png",
    "dog/rotated_exif6.jpg",
    f"cat/{UNICODE_NAME}",
    "cat/nested/deeper.png",
]

GRAY16 = (np.arange(24 * 32, dtype=np.uint32).reshape(24, 32) * 85 + 300).astype(np.uint16)
GRAY16[0, 0] = 40000  # 40000 >> 8 == 156: scaled, not clipped to 255
PALETTE = [255, 0, 0, 0, 255, 0, 0, 0, 255, 250, 250, 0]


def _rotated_pixels() -> np.ndarray:
    """40 wide x 20 high as stored: left half red, right half blue. EXIF orientation 6 means
    'rotate 90 degrees clockwise to display', so the displayed image is 20x40, red on top."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (230, 20, 20)
    pixels[:, 20:] = (20, 20, 230)
    return pixels


def build_corpus(base: Path) -> tuple[Path, Path]:
    """Write the bad-input corpus under ``base``; return (data root, the symlink's target)."""
    root = base / "data"
    make_class_folders(root, {"cat": GOOD_PER_CLASS, "dog": GOOD_PER_CLASS}, size=48, seed=1)
    write_image(root / "cat" / "nested" / "deeper.png", class_pattern(0, 48, seed=999))

    jpeg = encode_image(class_pattern(0, 128, seed=77), "JPEG", quality=90)
    (root / "cat" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "cat" / "zero_bytes.png").write_bytes(b"")
    (root / "cat" / "notes.png").write_text("this is not a picture\n", encoding="utf-8")
    cmyk = Image.fromarray(class_pattern(0, (40, 30), 5)).convert("CMYK")
    write_image(root / "cat" / "cmyk.jpg", cmyk, format="JPEG")
    write_image(root / "dog" / "gray16.png", Image.fromarray(GRAY16))
    palette = Image.frombytes("P", (30, 20), (np.arange(600) % 4).astype(np.uint8).tobytes())
    palette.putpalette(PALETTE)
    write_image(root / "dog" / "palette_alpha.png", palette, transparency=0)
    jpeg_with_orientation(root / "dog" / "rotated_exif6.jpg", _rotated_pixels(), 6, quality=95)
    png_claiming_size(root / "dog" / "bomb_20000x20000.png", 20000, 20000)
    write_image(root / "cat" / UNICODE_NAME, class_pattern(0, 48, seed=4242))

    outside = base / "elsewhere" / "outside.png"
    write_image(outside, class_pattern(0, 48, seed=31337))
    (root / "cat" / "outside_link.png").symlink_to(outside)
    (root / "empty_class").mkdir()

    # the corpus is what the assertions assume it is
    assert Image.open(root / "dog" / "gray16.png").mode == "I;16"
    assert (root / "dog" / "palette_alpha.png").read_bytes()[25] == 3  # PNG colour type: palette
    assert Image.open(root / "cat" / "cmyk.jpg").mode == "CMYK"
    assert (root / "dog" / "bomb_20000x20000.png").stat().st_size < 1024
    return root, outside


def run_ingest(root: Path, out_base: Path, ingest_params: IngestParams = PARAMS) -> dict:
    return ingest.run(
        source=root,
        out=out_base / "out",
        summary=out_base / "summary.json",
        data=params("data", source=str(root), metadata_csv=None),
        ingest=ingest_params,
        validate=params("validate"),
        progress=False,
    )


def source_files(root: Path) -> set[str]:
    """Every file and symlink under ``root`` (relative POSIX paths)."""
    return {p for p, kind in tree_digests(root).items() if kind != "dir"}


def decode_shards(out: Path) -> dict[str, dict]:
    """filepath -> the parsed record plus ``pixels``, decoded like training does."""
    import tensorflow as tf

    from imgpipe.data.tfrecords import read_records

    records = {}
    for split in ("train", "val", "test"):
        files = sorted(str(p) for p in (out / "shards").glob(f"{split}-*.tfrecord"))
        for record in read_records(files):
            record["split"] = split
            record["pixels"] = tf.io.decode_image(record["image/encoded"], channels=3).numpy()
            filepath = record["image/filepath"].decode()
            assert filepath not in records, f"{filepath} is in the shards twice"
            records[filepath] = record
    return records


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Build the corpus, snapshot it, ingest it once; the tests below read the results."""
    base = tmp_path_factory.mktemp("corpus")
    root, outside = build_corpus(base)
    before = tree_digests(root)
    outside_before = (sha256_of(outside), sorted(os.listdir(outside.parent)))
    summary = run_ingest(root, base / "run1")
    out = base / "run1" / "out"
    return {
        "base": base,
        "root": root,
        "outside": outside,
        "before": before,
        "outside_before": outside_before,
        "summary": summary,
        "out": out,
        "manifest": read_csv_rows(out / "manifest.csv"),
        "quarantine": read_csv_rows(out / "quarantine_report.csv"),
    }


def test_every_file_is_accounted_for_exactly_once(corpus):
    """No file is dropped silently: each source file appears once, in the manifest or in the
    quarantine report, never both."""
    manifest = [r["filepath"] for r in corpus["manifest"]]
    quarantined = [r["filepath"] for r in corpus["quarantine"]]
    reported = Counter(manifest + quarantined)
    assert [p for p, n in reported.items() if n > 1] == []
    files = source_files(corpus["root"])
    assert set(reported) - {"empty_class/"} == files
    assert len(manifest) == GOOD_PER_CLASS * 2 + len(EXPECTED_KEPT)


def test_quarantine_reasons(corpus):
    """Each bad input gets its specific reason code, nothing else is quarantined, and each
    detail says what was found in that file (not just that something was wrong)."""
    reasons = {r["filepath"]: r["reason"] for r in corpus["quarantine"]}
    assert reasons == EXPECTED_REJECTED
    details = {r["filepath"]: r["detail"] for r in corpus["quarantine"]}
    for filepath, fragment in {
        "cat/truncated.jpg": "truncated",
        "cat/zero_bytes.png": "zero bytes",
        "cat/notes.png": "cannot identify",
        "dog/bomb_20000x20000.png": f"{20000 * 20000} pixels",
        "empty_class/": "holds no files",
    }.items():
        assert fragment in details[filepath], (filepath, details[filepath])
    link = next(r for r in corpus["quarantine"] if r["filepath"] == "cat/outside_link.png")
    assert link["label"] == "cat" and str(corpus["outside"]) in link["detail"]


def test_odd_but_valid_images_are_kept(corpus):
    """CMYK, 16-bit, palette+transparency, EXIF-rotated, nested and unicode-named files are
    ingested with their source mode/format recorded, and the rotated one with swapped sides."""
    rows = {r["filepath"]: r for r in corpus["manifest"]}
    assert set(EXPECTED_KEPT) <= set(rows)
    assert (rows["cat/cmyk.jpg"]["mode"], rows["cat/cmyk.jpg"]["format"]) == ("CMYK", "JPEG")
    assert (rows["dog/gray16.png"]["mode"], rows["dog/gray16.png"]["format"]) == ("I;16", "PNG")
    assert rows["dog/palette_alpha.png"]["mode"] == "P"
    rotated = rows["dog/rotated_exif6.jpg"]
    assert (rotated["width"], rotated["height"], rotated["exif_transposed"]) == ("20", "40", "True")
    assert rows["cat/nested/deeper.png"]["label"] == "cat"
    assert rows[f"cat/{UNICODE_NAME}"]["label"] == "cat"
    others = {r["exif_transposed"] for p, r in rows.items() if p != "dog/rotated_exif6.jpg"}
    assert others == {"False"}
    for path, row in rows.items():
        assert row["sha256"] == sha256_of(corpus["root"] / path)
        assert int(row["bytes"]) == (corpus["root"] / path).stat().st_size


def test_source_is_never_written(corpus):
    """Ingest only reads: every source file (and the symlink's outside target) keeps its sha256,
    and no file appears in or disappears from the source tree."""
    assert tree_digests(corpus["root"]) == corpus["before"]
    outside = corpus["outside"]
    assert (sha256_of(outside), sorted(os.listdir(outside.parent))) == corpus["outside_before"]


def test_summary_matches_reports(corpus):
    """The summary JSON (DVC metrics) counts what the reports hold, per split and class."""
    summary = json.loads((corpus["base"] / "run1" / "summary.json").read_text())
    assert summary == corpus["summary"]
    assert summary["images"] == len(corpus["manifest"])
    assert summary["quarantined"] == len(corpus["quarantine"])
    assert summary["quarantine_reasons"] == dict(Counter(EXPECTED_REJECTED.values()))
    for split, counts in summary["splits"].items():
        rows = [r for r in corpus["manifest"] if r["split"] == split]
        assert counts["total"] == len(rows)
        assert counts["classes"] == {c: sum(r["label"] == c for r in rows) for c in ("cat", "dog")}
    assert (corpus["out"] / "labels.txt").read_text() == "cat\ndog\n"


def test_no_image_in_two_splits(corpus):
    """Every sha256 in the manifest is unique, so no image leaks between train, val and test;
    each class has images in every split."""
    hashes = [r["sha256"] for r in corpus["manifest"]]
    assert len(hashes) == len(set(hashes))
    splits_per_hash = {}
    for r in corpus["manifest"]:
        splits_per_hash.setdefault(r["sha256"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits_per_hash.values())
    assert {(r["label"], r["split"]) for r in corpus["manifest"]} == {
        (c, s) for c in ("cat", "dog") for s in ("train", "val", "test")
    }


def test_shards_decode_with_tensorflow(corpus):
    """Every manifest row is in its split's shard with matching metadata, and tf.io.decode_image
    gives the pixels ingest checked: 16-bit scaled by >>8, rotated JPEG upright with swapped
    shape, CMYK and palette images as Pillow's RGB conversion, clean PNGs byte for byte."""
    records = decode_shards(corpus["out"])
    rows = {r["filepath"]: r for r in corpus["manifest"]}
    assert set(records) == set(rows)
    labels = (corpus["out"] / "labels.txt").read_text().splitlines()
    for path, row in rows.items():
        record = records[path]
        assert record["split"] == row["split"]
        assert record["image/sha256"].decode() == row["sha256"]
        assert record["image/class/text"].decode() == row["label"]
        assert labels[record["image/class/label"]] == row["label"]
        assert record["pixels"].shape == (int(row["height"]), int(row["width"]), 3)
        assert record["image/height"] == int(row["height"])
        assert record["image/width"] == int(row["width"])

    root = corpus["root"]
    clean = records["cat/cat_000.png"]
    assert clean["image/encoded"] == (root / "cat/cat_000.png").read_bytes()
    assert clean["image/format"] == b"png"

    gray = records["dog/gray16.png"]["pixels"]
    assert gray.dtype == np.uint8
    assert gray[0, 0].tolist() == [156, 156, 156]
    np.testing.assert_array_equal(gray[..., 0], (GRAY16 >> 8).astype(np.uint8))
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])

    rotated = records["dog/rotated_exif6.jpg"]
    assert rotated["image/format"] == b"png"
    pixels = rotated["pixels"].astype(int)
    assert pixels.shape == (40, 20, 3)
    top, bottom = pixels[:18].mean(axis=(0, 1)), pixels[22:].mean(axis=(0, 1))
    assert top[0] > 180 and top[2] < 70, top  # red on top after rotating clockwise
    assert bottom[2] > 180 and bottom[0] < 70, bottom

    for path in ("cat/cmyk.jpg", "dog/palette_alpha.png", f"cat/{UNICODE_NAME}"):
        with Image.open(root / path) as source:
            expected = np.asarray(source.convert("RGB"))
        np.testing.assert_array_equal(records[path]["pixels"], expected, err_msg=path)
    palette_rgb = np.array(PALETTE, np.uint8).reshape(4, 3)
    np.testing.assert_array_equal(
        records["dog/palette_alpha.png"]["pixels"].reshape(-1, 3), palette_rgb[np.arange(600) % 4]
    )


def test_second_run_is_byte_identical_with_any_worker_count(corpus, tmp_path):
    """Same source and seed: manifest, quarantine report, labels and every shard are byte for
    byte the same (reproducible, so DVC sees no change), whether one process ingests (the
    first run: params.yaml's ``workers: null`` keeps a corpus this small in-process) or two
    worker processes check, re-encode and read the images, a few per task."""
    assert PARAMS.workers is None
    run_ingest(corpus["root"], tmp_path, dataclasses.replace(PARAMS, workers=2))
    first, second = corpus["out"], tmp_path / "out"
    for name in ("manifest.csv", "quarantine_report.csv", "labels.txt"):
        assert (second / name).read_bytes() == (first / name).read_bytes(), name
    shards = sorted(p.name for p in (first / "shards").iterdir())
    assert shards and shards == sorted(p.name for p in (second / "shards").iterdir())
    for name in shards:
        assert (second / "shards" / name).read_bytes() == (first / "shards" / name).read_bytes()
    assert tree_digests(corpus["root"]) == corpus["before"]


def test_other_seed_changes_the_split_not_the_content(corpus, tmp_path):
    """Guards the determinism test against a seed that is ignored: another seed moves images
    between splits while keeping the same set of images and the same per-split counts."""
    run_ingest(corpus["root"], tmp_path, dataclasses.replace(PARAMS, seed=PARAMS.seed + 1))
    other = read_csv_rows(tmp_path / "out" / "manifest.csv")
    first = {r["sha256"]: r["split"] for r in corpus["manifest"]}
    second = {r["sha256"]: r["split"] for r in other}
    assert set(first) == set(second)
    assert first != second
    assert Counter(first.values()) == Counter(second.values())


def test_names_that_are_not_utf8_are_quarantined(tmp_path):
    """A file or class folder whose name is not valid UTF-8 (e.g. Latin-1 'café' copied from an
    old archive) is quarantined as 'name_not_utf8' under a printable name instead of crashing
    the whole ingest when the UTF-8 reports and shards are written."""
    root = tmp_path / "data"
    make_class_folders(root, {"cat": 5, "dog": 5}, size=32)
    latin1_file = os.path.join(os.fsencode(root / "cat"), b"caf\xe9.png")
    latin1_folder = os.path.join(os.fsencode(root), b"b\xe9e")
    try:
        os.mkdir(latin1_folder)
        with open(latin1_file, "wb") as f:
            f.write(encode_image(class_pattern(0, 32, seed=500)))
        with open(os.path.join(latin1_folder, b"bee.png"), "wb") as f:
            f.write(encode_image(class_pattern(2, 32, seed=501)))
    except OSError as exc:  # e.g. a file system that only takes UTF-8 names
        pytest.skip(f"cannot create a non-UTF-8 file name here: {exc}")
    before = tree_digests(root)

    summary = run_ingest(root, tmp_path)

    quarantine = read_csv_rows(tmp_path / "out" / "quarantine_report.csv")
    assert sorted((r["filepath"], r["label"], r["reason"]) for r in quarantine) == [
        ("b\\xe9e/bee.png", "b\\xe9e", "name_not_utf8"),
        ("cat/caf\\xe9.png", "cat", "name_not_utf8"),
    ]
    assert summary["images"] == 10
    assert tree_digests(root) == before


# ---------------------------------------------------------------- CSV manifest source


def test_csv_manifest_source(tmp_path):
    """A CSV source (filepath,label,extra_col): missing files, paths escaping the CSV's folder
    and rows without a label are quarantined with their reasons; the extra column is carried
    into the manifest; nothing outside the folder is read."""
    src = tmp_path / "src"
    rows = ["filepath,label,extra_col"]
    expected_extra = {}
    for class_index, label in enumerate(("ant", "bee")):
        for i in range(6):
            rel = f"images/{label}-{i}.png"
            write_image(src / rel, class_pattern(class_index, 40, seed=i))
            rows.append(f"{rel},{label},{label}-meta-{i}")
            expected_extra[rel] = f"{label}-meta-{i}"
    escaping = tmp_path / "x.png"  # exists, but lies outside the CSV's folder
    write_image(escaping, class_pattern(0, 40, seed=1000))
    rows += [
        "images/missing.png,ant,m",
        "../x.png,ant,e",
        f"{escaping},bee,abs",
        "images/ant-0.png,,no-label",
        ",bee,no-path",
    ]
    csv_path = src / "labels.csv"
    csv_path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    before = tree_digests(tmp_path)

    summary = ingest.run(
        source=csv_path,
        out=tmp_path / "out",
        summary=tmp_path / "summary.json",
        data=params("data", source=str(csv_path), metadata_csv=None),
        ingest=PARAMS,
        validate=params("validate"),
        progress=False,
    )

    manifest = read_csv_rows(tmp_path / "out" / "manifest.csv")
    quarantine = read_csv_rows(tmp_path / "out" / "quarantine_report.csv")
    assert "extra_col" in manifest[0]
    assert {r["filepath"]: r["extra_col"] for r in manifest} == expected_extra
    reasons = sorted((r["filepath"], r["reason"]) for r in quarantine)
    assert reasons == sorted(
        [
            ("images/missing.png", "missing_file"),
            ("../x.png", "outside_root"),
            (str(escaping), "outside_root"),
            ("images/ant-0.png", "missing_field"),
            ("labels.csv:18", "missing_field"),
        ]
    )
    assert summary["images"] == 12 and summary["quarantined"] == 5
    after = tree_digests(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith(("out", "summary.json"))} == before


# ---------------------------------------------------------------- the source's own splits


def make_split_folders(root: Path, splits: dict[str, dict[str, int]]) -> None:
    """Keras' layout, ``root/<split>/<class>/<image>``; ``splits[split][class]`` images each,
    distinct across splits."""
    for seed, (split, classes) in enumerate(splits.items(), start=1):
        make_class_folders(root / split, classes, size=16, seed=seed)


def ingest_with(source: Path, out_base: Path, metadata_csv: Path | None = None, **overrides):
    """Run the stage on ``source`` with val 0.2, test 0.25 and ``overrides`` of params.yaml's
    ingest section; return (summary, manifest rows, quarantine rows)."""
    summary = ingest.run(
        source=source,
        out=out_base / "out",
        summary=out_base / "summary.json",
        data=params(
            "data", source=str(source), metadata_csv=str(metadata_csv) if metadata_csv else None
        ),
        ingest=params("ingest", val_fraction=0.2, test_fraction=0.25, **overrides),
        validate=params("validate", min_images_per_class=1),  # tiny corpora: the split alone
        progress=False,
    )
    assert json.loads((out_base / "summary.json").read_text()) == summary
    out = out_base / "out"
    return (
        summary,
        read_csv_rows(out / "manifest.csv"),
        read_csv_rows(out / "quarantine_report.csv"),
    )


@pytest.mark.parametrize("val_name", ["val", "validation"])
def test_keras_layout_keeps_every_image_in_its_folders_split(tmp_path, val_name):
    """``data/{train,<val_name>,test}/<class>/``: every image keeps its folder's split, its label
    is the class folder; the summary and the CLI line say the split was predefined."""
    root = tmp_path / "data"
    counts = {"cat": 3, "dog": 3}
    make_split_folders(root, {"train": {"cat": 6, "dog": 6}, val_name: counts, "test": counts})

    summary, manifest, quarantine = ingest_with(root, tmp_path, split_mode="auto")

    assert quarantine == [] and len(manifest) == 24
    ours = {"train": "train", val_name: "val", "test": "test"}
    for row in manifest:
        folder, label, _ = row["filepath"].split("/")
        assert (row["split"], row["label"]) == (ours[folder], label)
    assert {s: c["total"] for s, c in summary["splits"].items()} == {
        "train": 12,
        "val": 6,
        "test": 6,
    }
    assert summary["split_method"]["mode"] == "predefined"
    assert summary["split_method"]["carved_from_train"] == []
    assert "split: predefined" in ingest.describe(summary)
    assert "carved" not in ingest.describe(summary)
    for split in ("train", "val", "test"):
        assert list((tmp_path / "out" / "shards").glob(f"{split}-*.tfrecord")), split


def test_csv_split_column_is_kept(tmp_path):
    """A CSV manifest's ``split`` column (any case and spelling: train, validation, val, test) is
    the split; a row whose split is empty or unknown is quarantined as 'unknown_split'; the
    column does not reappear as metadata beside the manifest's own ``split``."""
    src = tmp_path / "src"
    given = ["train", "Train", "train", "validation", "val", " TEST ", "test", "holdout", ""]
    lines = ["filepath,label,split,site"]
    for i, split in enumerate(given * 2):
        label = ("ant", "bee")[i % 2]
        write_image(src / f"img/{i}.png", class_pattern(i % 2, 16, seed=i))
        lines.append(f"img/{i}.png,{label},{split},site-{i % 3}")
    (src / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")

    summary, manifest, quarantine = ingest_with(src / "labels.csv", tmp_path)

    expected = {"train": "train", "validation": "val", "val": "val", "test": "test"}
    assert {r["filepath"]: r["split"] for r in manifest} == {
        f"img/{i}.png": expected[s.strip().lower()]
        for i, s in enumerate(given * 2)
        if s.strip().lower() in expected
    }
    assert sorted((r["filepath"], r["reason"]) for r in quarantine) == sorted(
        (f"img/{i}.png", "unknown_split") for i in (7, 8, 16, 17)
    )
    assert list(manifest[0]).count("split") == 1 and "site" in manifest[0]
    assert summary["split_method"]["mode"] == "predefined"


def test_image_in_train_and_test_is_a_leak_kept_once_in_train(tmp_path):
    """The same image copied into train/ and test/ is a leak: kept once, in train (so the test
    set stays clean), the test copy quarantined as 'split_leak' naming the kept copy."""
    root = tmp_path / "data"
    counts = {"cat": 3, "dog": 3}
    make_split_folders(root, {"train": {"cat": 6, "dog": 6}, "val": counts, "test": counts})
    leaked = root / "test" / "cat" / "again.png"
    leaked.write_bytes((root / "train" / "cat" / "cat_000.png").read_bytes())

    summary, manifest, quarantine = ingest_with(root, tmp_path)

    assert [(r["filepath"], r["reason"], r["detail"]) for r in quarantine] == [
        ("test/cat/again.png", "split_leak", "also in train: train/cat/cat_000.png (kept there)")
    ]
    copies = [r for r in manifest if r["sha256"] == sha256_of(leaked)]
    assert [(r["filepath"], r["split"]) for r in copies] == [("train/cat/cat_000.png", "train")]
    assert summary["quarantine_reasons"] == {"split_leak": 1}
    assert summary["splits"]["test"]["total"] == 6


@pytest.mark.parametrize(
    ("given", "carved", "fraction"), [("validation", "test", 0.25), ("test", "val", 0.2)]
)
def test_missing_split_is_carved_out_of_train(tmp_path, given, carved, fraction):
    """Only train/ and validation/: test is carved out of train/, round(n * test_fraction) of
    each class's train/ images; the validation/ images stay val. Likewise val (val_fraction)
    out of train/ + test/. The summary and the CLI line say so."""
    root = tmp_path / "data"
    make_split_folders(root, {"train": {"cat": 12, "dog": 8}, given: {"cat": 3, "dog": 3}})

    summary, manifest, _ = ingest_with(root, tmp_path)

    for label, n in (("cat", 12), ("dog", 8)):
        from_train = Counter(
            r["split"] for r in manifest if r["filepath"].startswith(f"train/{label}/")
        )
        n_carved = int(n * fraction + 0.5)
        assert from_train == {carved: n_carved, "train": n - n_carved}, label
    ours = {"validation": "val", "test": "test"}[given]
    assert {r["split"] for r in manifest if r["filepath"].startswith(f"{given}/")} == {ours}
    assert summary["split_method"]["carved_from_train"] == [carved]
    assert f"split: predefined + carved {carved} from train" in ingest.describe(summary)


def test_split_mode_random_ignores_the_folders(tmp_path):
    """``split_mode: random`` on a Keras layout: labels still come from the class folders, the
    split is drawn afresh (stratified, the asked fractions), not taken from the folders."""
    root = tmp_path / "data"
    counts = {"cat": 3, "dog": 3}
    make_split_folders(root, {"train": {"cat": 6, "dog": 6}, "val": counts, "test": counts})

    summary, manifest, _ = ingest_with(root, tmp_path, split_mode="random")

    assert {r["label"] for r in manifest} == {"cat", "dog"}
    # 12 per class: round(12 * 0.25) = 3 test, round(12 * 0.2) = 2 val; the folders had 3 val
    assert Counter(r["split"] for r in manifest) == {"train": 14, "val": 4, "test": 6}
    assert any(r["split"] != r["filepath"].split("/")[0] for r in manifest)
    assert summary["split_method"]["mode"] == "random"
    assert "split: random, fractions" in ingest.describe(summary)


def test_split_mode_predefined_on_a_flat_layout_is_a_clear_error(tmp_path):
    root = tmp_path / "data"
    make_class_folders(root, {"cat": 3, "dog": 3}, size=16)
    with pytest.raises(
        ParamsError, match=rf"split_mode is predefined, but {re.escape(str(root))} has no splits"
    ):
        ingest_with(root, tmp_path, split_mode="predefined")
    assert not (tmp_path / "out").exists()


def test_class_named_train_in_a_flat_layout_is_a_class(tmp_path):
    """Classes train, bus, car: not a split layout; 'train' is a label, the split is random."""
    root = tmp_path / "data"
    make_class_folders(root, {"train": 8, "bus": 8, "car": 8}, size=16)

    summary, manifest, _ = ingest_with(root, tmp_path)

    assert summary["split_method"]["mode"] == "random"
    assert set(summary["classes"]) == {"train", "bus", "car"}
    assert {r["label"] for r in manifest if r["filepath"].startswith("train/")} == {"train"}
    assert {r["split"] for r in manifest if r["label"] == "train"} == {"train", "val", "test"}


# ---------------------------------------------------------------- grouped splits


def write_grouped_csv(src: Path, order_seed: int | None = None) -> Path:
    """A CSV manifest of 40 patients with 1-5 images each, mostly of one label; rows shuffled
    by ``order_seed`` (None: in patient order). The images are written once."""
    rng = np.random.default_rng(11)
    labels = ("ant", "bee", "cow")
    rows = []
    for p in range(40):
        main = int(rng.integers(3))
        for i in range(int(rng.integers(1, 6))):
            c = main if rng.random() < 0.7 else int(rng.integers(3))
            rel = f"img/p{p:02d}_{i}.png"
            if not (src / rel).exists():
                write_image(src / rel, class_pattern(c, 16, seed=p * 10 + i))
            rows.append(f"{rel},{labels[c]},patient-{p:02d}")
    if order_seed is not None:
        rows = [rows[i] for i in np.random.default_rng(order_seed).permutation(len(rows))]
    path = src / "labels.csv"
    path.write_text("filepath,label,patient\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_grouped_split_keeps_patients_whole_for_any_file_order(tmp_path):
    """``group_by: patient``: no patient in two splits; the same manifest for shuffled CSV
    rows; each label's share per split near its share overall; achieved vs asked fractions in
    the summary and the CLI line."""
    src = tmp_path / "src"
    summary, manifest, _ = ingest_with(write_grouped_csv(src), tmp_path / "a", group_by="patient")
    first = (tmp_path / "a" / "out" / "manifest.csv").read_bytes()
    for order_seed in (1, 2):
        ingest_with(write_grouped_csv(src, order_seed), tmp_path / "b", group_by="patient")
        assert (tmp_path / "b" / "out" / "manifest.csv").read_bytes() == first

    where: dict[str, set[str]] = {}
    for row in manifest:
        where.setdefault(row["patient"], set()).add(row["split"])
    assert len(where) == 40 and all(len(s) == 1 for s in where.values())
    n = len(manifest)
    overall = Counter(r["label"] for r in manifest)
    for split in ("train", "val", "test"):
        labels = Counter(r["label"] for r in manifest if r["split"] == split)
        for label, count in overall.items():
            assert abs(labels[label] / sum(labels.values()) - count / n) < 0.1, (split, labels)

    method = summary["split_method"]
    assert (method["group_by"], method["groups"], method["groups_spanning_splits"]) == (
        "patient",
        40,
        0,
    )
    asked, achieved = method["asked_fractions"], method["achieved_fractions"]
    assert asked == {"train": 0.55, "val": 0.2, "test": 0.25}
    assert achieved == {s: round(summary["splits"][s]["total"] / n, 4) for s in asked}
    gap = max(abs(achieved[s] - asked[s]) for s in asked)
    assert method["largest_fraction_gap"] == pytest.approx(gap, abs=1e-4) and gap < 0.05
    per_class = method["class_fractions"]
    assert set(per_class) == set(overall)
    for label, fractions in per_class.items():
        rows = [r for r in manifest if r["label"] == label]
        for split in asked:
            share = sum(r["split"] == split for r in rows) / len(rows)
            assert fractions[split] == pytest.approx(share, abs=1e-4), (label, split)
    class_gap = max(abs(f[s] - asked[s]) for f in per_class.values() for s in asked)
    assert method["largest_class_fraction_gap"] == pytest.approx(class_gap, abs=1e-4)
    line = ingest.describe(summary)
    assert "split: random, grouped by patient (40 groups, stable), fractions " in line
    assert f"largest gap {gap:.3f}, {class_gap:.3f} in one class" in line


def test_group_by_column_missing_or_empty_is_a_clear_error(tmp_path):
    src = tmp_path / "src"
    csv_path = write_grouped_csv(src)
    with pytest.raises(ParamsError, match=r"ingest.group_by names 'donor'.*\['patient'\]"):
        ingest_with(csv_path, tmp_path, group_by="donor")
    lines = csv_path.read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ","
    csv_path.write_text("\n".join(lines) + "\n")
    empty = lines[3].split(",")[0]
    with pytest.raises(ValueError, match=rf"1 image\(s\) of .* have no patient value.*: {empty}$"):
        ingest_with(csv_path, tmp_path, group_by="patient")


def test_predefined_split_with_group_by_reports_groups_spanning_splits(tmp_path):
    """The user's splits are kept even where a group spans them; the summary warns and names it."""
    root = tmp_path / "data"
    counts = {"cat": 2, "dog": 2}
    make_split_folders(root, {"train": counts, "val": counts, "test": counts})
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    metadata = root / "metadata.csv"
    patients = {f: f"p-{f.split('/')[0]}-{f.split('/')[1]}" for f in files}
    patients["test/cat/cat_000.png"] = patients["train/cat/cat_000.png"] = "p-shared"
    metadata.write_text(
        "filepath,patient\n" + "".join(f"{f},{p}\n" for f, p in patients.items()),
        encoding="utf-8",
    )

    summary, manifest, quarantine = ingest_with(root, tmp_path, metadata, group_by="patient")

    assert quarantine == []
    assert all(r["split"] == r["filepath"].split("/")[0] for r in manifest)
    method = summary["split_method"]
    assert method["mode"] == "predefined" and method["groups_spanning_splits"] == 1
    (warning,) = method["warnings"]
    assert "p-shared (1 train, 1 test)" in warning
    assert "WARNING: LEAK: 1 patient group(s) of the source's" in ingest.describe(summary)
