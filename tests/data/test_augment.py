"""augment: the view plan (pure, fast) and the materialised training set on tiny ingest shards
(slow: ingest and augment write TFRecords through TensorFlow).

The stage promises a balanced set, each image once as itself (view 0) plus augmented views, with
every view's randomness derived from (seed, image, view): the same bytes on every run.
"""

from __future__ import annotations

import io
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from conftest import PNG_SIGNATURE, make_class_folders, params, read_csv_rows, tree_digests
from PIL import Image

from components.augment import plan_views

# ------------------------------------------------------------------------------------ plan_views


@pytest.mark.parametrize("views", [0, 1, 2, 5])
def test_plan_views_balances_every_class_to_the_largest(views):
    """With balancing, every class totals (largest class count) * (1 + K) views, each image of
    a class gets within one view of its classmates, and none gets fewer than 1 + K."""
    labels = ["a"] * 7 + ["b"] * 3 + ["c"] * 1 + ["d"] * 7
    labels = [labels[i] for i in np.random.default_rng(0).permutation(len(labels))]

    plan = plan_views(labels, views_per_image=views, balance=True)

    assert len(plan) == len(labels)
    totals: Counter[str] = Counter()
    per_class: dict[str, list[int]] = defaultdict(list)
    for label, n in zip(labels, plan, strict=True):
        totals[label] += n
        per_class[label].append(n)
    assert set(totals.values()) == {7 * (1 + views)}, totals
    for label, counts in per_class.items():
        assert max(counts) - min(counts) <= 1, (label, counts)
        assert min(counts) >= 1 + views, (label, counts)
    assert per_class["c"] == [7 * (1 + views)]


def test_plan_views_without_balancing_gives_one_plus_k_each():
    """Without balancing every image gets itself plus K views, whatever the class sizes."""
    labels = ["a"] * 5 + ["b"] * 2
    assert plan_views(labels, views_per_image=3, balance=False) == [4] * 7
    assert plan_views(labels, views_per_image=0, balance=False) == [1] * 7


def test_plan_views_docstring_example_and_order():
    """The plan follows input order: smaller classes' extra views go round robin, first
    images first."""
    assert plan_views(["a", "a", "b"], views_per_image=1, balance=True) == [2, 2, 4]
    assert plan_views(["b", "a", "a", "a", "b"], views_per_image=0, balance=True) == [2, 1, 1, 1, 1]


# ------------------------------------------------------------------------------- augment.run

IMAGE_SIZE = 32
VIEWS = 2
CLASSES = {"a": 14, "b": 7}  # ingest (15% val, 15% test) leaves 10 and 5 training images


def _augment_params(seed: int, workers: int = 1):
    return params(
        "augment",
        seed=seed,
        workers=workers,
        views_per_image=VIEWS,
        balance_classes=True,  # what this module tests; params.yaml's default is off
        preview_images=4,
        images_per_shard=16,
    )


@pytest.fixture(scope="module")
def augmented(tmp_path_factory):
    """Ingest shards of 40x40 class-pattern PNGs (two train shards), augmented three times:
    twice with seed 7 (``a`` in this process, ``b`` by two worker processes, a shard each),
    once with seed 8 (``c``). Yields the paths and the three summaries."""
    from components import augment, ingest

    root = tmp_path_factory.mktemp("augment")
    make_class_folders(root / "data", CLASSES, size=40)
    ingest.run(
        source=root / "data",
        out=root / "ingest",
        summary=root / "metrics" / "ingest.json",
        data=params("data", source=str(root / "data"), metadata_csv=None),
        ingest=params("ingest", val_fraction=0.15, test_fraction=0.15, images_per_shard=8),
        validate=params("validate"),
        progress=False,
    )
    # The image size is the model's: augment reads it from the model params.
    model = params("model", image_size=IMAGE_SIZE)
    summaries = {}
    for name, seed, workers in (("a", 7, 1), ("b", 7, 2), ("c", 8, 1)):
        summaries[name] = augment.run(
            shards=root / "ingest" / "shards",
            out=root / name / "augment",
            summary=root / name / "augment.json",
            augment=_augment_params(seed, workers),
            model=model,
            progress=False,
        )
    return root, summaries


def _records(directory: Path) -> list[dict]:
    from imgpipe.data.tfrecords import read_records, split_files

    return read_records(split_files(directory, "train"))


def _views(directory: Path) -> list[dict[str, str]]:
    return read_csv_rows(directory / "views.csv")


def _pixels(encoded: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))


@pytest.mark.slow
def test_same_seed_gives_identical_bytes_with_any_worker_count(augmented):
    """Two runs with the same seed, one in this process and one by two worker processes,
    write byte-identical shards, views.csv and summaries (the per-shard order and the per-view
    generators must not make output depend on timing or on which worker took which shard)."""
    root, summaries = augmented
    assert len(list((root / "ingest" / "shards").glob("train-*"))) == 2
    shards_a = tree_digests(root / "a" / "augment" / "shards")
    assert len(shards_a) >= 3, shards_a  # 60 images at 16 per shard: several files
    assert shards_a == tree_digests(root / "b" / "augment" / "shards")
    views_a = (root / "a" / "augment" / "views.csv").read_bytes()
    assert views_a == (root / "b" / "augment" / "views.csv").read_bytes()
    assert summaries["a"] == summaries["b"]
    assert (root / "a" / "augment.json").read_bytes() == (root / "b" / "augment.json").read_bytes()


@pytest.mark.slow
def test_other_seed_changes_the_augmented_views_only(augmented):
    """Another seed changes the shards and the drawn parameters, but not the originals (view 0)
    nor how many views each image gets."""
    root, _ = augmented
    a, c = root / "a" / "augment", root / "c" / "augment"
    assert tree_digests(a / "shards") != tree_digests(c / "shards")
    assert (a / "views.csv").read_bytes() != (c / "views.csv").read_bytes()

    def by_view(directory: Path) -> dict[str, str]:
        records = _records(directory)
        return {r["image/filepath"].decode(): r["image/sha256"].decode() for r in records}

    views_a, views_c = by_view(a / "shards"), by_view(c / "shards")
    assert set(views_a) == set(views_c)
    originals = [k for k in views_a if k.endswith("#view0")]
    assert originals and all(views_a[k] == views_c[k] for k in originals)
    augmented_keys = [k for k in views_a if not k.endswith("#view0")]
    changed = sum(views_a[k] != views_c[k] for k in augmented_keys)
    assert changed == len(augmented_keys), (changed, len(augmented_keys))


@pytest.mark.slow
def test_every_training_image_appears_as_itself_plus_planned_views(augmented):
    """Each ingest training image appears exactly once as view 0, pixel for pixel the original
    resized the way training and serving resize (datasets.decode_and_resize, rounded), with no
    drawn parameters in views.csv; its augmented views 1..n-1 all differ from it."""
    from components.augment import Source
    from imgpipe.data.datasets import decode_and_resize

    root, _ = augmented
    directory = root / "a" / "augment"
    sources_in_shards = map(Source.from_record, _records(root / "ingest" / "shards"))
    ordered = sorted(sources_in_shards, key=lambda s: s.sha256)  # the order augment plans in
    sources = {s.filepath: s for s in ordered}
    planned = plan_views([s.label for s in ordered], VIEWS, True)
    plan = {s.filepath: n for s, n in zip(ordered, planned, strict=True)}
    records = _records(directory / "shards")

    grouped: dict[str, dict[int, dict]] = defaultdict(dict)
    for record in records:
        filepath, view = record["image/filepath"].decode().rsplit("#view", 1)
        assert int(view) not in grouped[filepath], f"{filepath} view {view} twice"
        grouped[filepath][int(view)] = record
    assert set(grouped) == set(sources)
    for filepath, views in grouped.items():
        source = sources[filepath]
        assert sorted(views) == list(range(plan[filepath])), filepath
        original = views[0]
        expected = np.rint(decode_and_resize(source.encoded, IMAGE_SIZE).numpy()).astype(np.uint8)
        np.testing.assert_array_equal(_pixels(original["image/encoded"]), expected)
        for view, record in views.items():
            assert record["image/class/text"].decode() == source.label
            assert int(record["image/class/label"]) == source.label_index
            assert int(record["image/height"]) == int(record["image/width"]) == IMAGE_SIZE
            pixels = _pixels(record["image/encoded"])
            assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
            if view:
                assert not np.array_equal(pixels, _pixels(original["image/encoded"])), (
                    filepath,
                    view,
                )

    params = _augment_params(7)
    rows = _views(directory)
    assert len(rows) == len(records)
    drawn = ("flip_h", "flip_v", "rot90", "angle", "zoom", "brightness", "contrast")
    for row in rows:
        if row["view"] == "0":
            assert all(row[k] == "" for k in drawn), row
        else:
            assert all(row[k] != "" for k in drawn), row
            assert abs(float(row["angle"])) <= params.rotation_degrees
            assert abs(float(row["zoom"]) - 1) <= params.zoom
            assert row["rot90"] in {"0", "1", "2", "3"}


@pytest.mark.slow
def test_summary_is_balanced_and_preview_is_a_png(augmented):
    """The summary counts every class at (largest training class) * (1 + K) and the views it
    made; preview.png is a real PNG that Pillow decodes."""
    root, summaries = augmented
    summary = summaries["a"]
    manifest = read_csv_rows(root / "ingest" / "manifest.csv")
    train_counts = Counter(r["label"] for r in manifest if r["split"] == "train")
    target = max(train_counts.values()) * (1 + VIEWS)
    assert summary["classes"] == {label: target for label in CLASSES}
    assert summary["source_images"] == sum(train_counts.values())
    assert summary["materialised_images"] == target * len(CLASSES)
    assert summary["augmented_views"] == summary["materialised_images"] - summary["source_images"]
    assert summary["image_size"] == IMAGE_SIZE
    assert json.loads((root / "a" / "augment.json").read_text()) == summary
    assert Counter(r["label"] for r in _views(root / "a" / "augment")) == summary["classes"]

    preview = root / "a" / "augment" / "preview.png"
    assert preview.read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(preview) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(preview) as image:
        width, height = image.size
        assert width > 100 and height > 100
        assert np.asarray(image.convert("L")).std() > 10  # not a blank canvas


# ---------------------------------------------------------------- fine-tuning's per-epoch views


def _epochs(
    shards: Path, seed: int, epochs: int, *, first_epoch: int = 0, balanced: int | None = None
) -> list[list[tuple[int, str, np.ndarray]]]:
    """Each fine-tuning epoch of the train split as fine-tuning reads it (``balanced``: the
    class-balanced draw), as (label, sha256, pixels) in order."""
    from imgpipe.data.datasets import image_dataset
    from imgpipe.data.tfrecords import count_records, split_files

    files = split_files(shards, "train")
    n = count_records(files)
    batches = image_dataset(
        files,
        IMAGE_SIZE,
        n,  # one batch per epoch
        shuffle_seed=seed,
        epochs=epochs,
        first_epoch=first_epoch,
        with_ids=True,
        count=n,
        views=params("augment"),
        balanced=balanced,
    )
    return [
        list(
            zip(
                labels.numpy().tolist(),
                [s.decode() for s in ids.numpy()],
                images.numpy(),
                strict=True,
            )
        )
        for images, labels, ids in batches
    ]


def _epoch_views(shards: Path, seed: int, epochs: int) -> list[dict[str, np.ndarray]]:
    """Each epoch's images of the train split, by sha256, in the data's own order."""
    return [{sha: image for _, sha, image in epoch} for epoch in _epochs(shards, seed, epochs)]


@pytest.mark.slow
def test_finetune_views_are_fresh_each_epoch_and_fixed_by_the_seed(augmented):
    """The views fine-tuning trains on: every epoch holds every training image once, each
    epoch draws another view of (nearly) every image, the same seed gives the same views bit
    for bit, and another seed other views. (Replicas and resumed runs see what one device sees:
    tests/model/test_distribute.py, tests/model/test_training.py.)"""
    root, _ = augmented
    shards = root / "ingest" / "shards"
    first, again, other = (
        _epoch_views(shards, 42, 2),
        _epoch_views(shards, 42, 2),
        _epoch_views(shards, 43, 1),
    )
    assert len(first) == 2 and first[0].keys() == first[1].keys() == other[0].keys()
    assert len(first[0]) == 15  # every training image (10 + 5), once
    changed = sum(not np.array_equal(first[0][k], first[1][k]) for k in first[0])
    assert changed >= len(first[0]) - 1, (changed, len(first[0]))
    for epoch in range(2):
        for key, image in first[epoch].items():
            np.testing.assert_array_equal(image, again[epoch][key])
    assert sum(not np.array_equal(first[0][k], other[0][k]) for k in first[0]) >= len(first[0]) - 1


def test_epoch_batches_build_under_a_global_seed_of_zero():
    """``train.seed: 0`` sets TensorFlow's global seed to 0, under which a shuffle seeded by a
    traced tensor cannot be built: each epoch is still a seeded permutation, the same as under
    another global seed, and epochs differ."""
    import tensorflow as tf

    from imgpipe.data.datasets import epoch_batches

    def shuffled(seed):
        return tf.data.Dataset.range(10).shuffle(10, seed=seed, reshuffle_each_iteration=False)

    def epochs(global_seed: int) -> list[list[int]]:
        tf.random.set_seed(global_seed)
        try:
            ds = epoch_batches(lambda s: shuffled(s).batch(10), 42, 3, first_epoch=1)
            return [batch.numpy().tolist() for batch in ds]
        finally:
            tf.random.set_seed(None)  # no global seed left behind for the next test

    zero = epochs(0)
    assert len(zero) == 2 and all(sorted(e) == list(range(10)) for e in zero), zero
    assert zero[0] != zero[1]
    assert epochs(0) == zero  # seeded
    assert len(epochs(7)) == 2


@pytest.mark.slow
def test_a_class_balanced_epoch_draws_each_class_alike_and_resumes_the_same(augmented):
    """``augment.balance_classes: per_epoch``: every fine-tuning epoch draws as many images as
    the train split holds (10 of class a, 5 of b), each class about as often as the other (the
    split's own order gives b a third); a class's image drawn twice in an epoch is another view
    the second time; the epochs are fixed by the seed, and a run resumed at epoch 12 sees what
    the uninterrupted run saw from there."""
    root, _ = augmented
    shards = root / "ingest" / "shards"
    epochs = _epochs(shards, 42, 20, balanced=len(CLASSES))
    assert [len(epoch) for epoch in epochs] == [15] * 20
    drawn = Counter(label for epoch in epochs for label, _, _ in epoch)
    assert 120 <= drawn[1] <= 180, drawn  # b: half of 300 draws (sd 9); as the data is: 100
    repeats = [
        (first, second)
        for epoch in epochs
        for i, (_, sha, first) in enumerate(epoch)
        for _, again, second in epoch[i + 1 :]
        if again == sha
    ]
    assert repeats and all(not np.array_equal(a, b) for a, b in repeats), len(repeats)
    resumed = _epochs(shards, 42, 20, first_epoch=12, balanced=len(CLASSES))
    assert len(resumed) == 8
    for ours, theirs in zip(resumed, epochs[12:], strict=True):
        assert [sha for _, sha, _ in ours] == [sha for _, sha, _ in theirs]
        for (_, _, a), (_, _, b) in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_per_epoch_draw_resumes_only_its_own_checkpoints(tmp_path):
    """Fine-tuning's checkpoints are resumed only by a run that draws the same images: a
    per-epoch class-balanced run is another run than one in the data's own order, while
    augment's one-off oversampling (the frozen phase's shards) changes nothing fine-tuning
    draws."""
    from imgpipe.model.checkpoints import fingerprint

    (tmp_path / "model.keras").write_bytes(b"frozen")
    (tmp_path / "train.tfrecord").write_bytes(b"records")

    def key(balance: bool | str) -> str:
        views = params("augment", balance_classes=balance)
        files = [str(tmp_path / "train.tfrecord")]
        return fingerprint(
            tmp_path / "model.keras", files, params("model"), params("finetune"), views, 1
        )

    assert key(False) == key(True) != key("per_epoch")
