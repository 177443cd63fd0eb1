"""``imgpipe score``: a folder or CSV of new images through a real exported SavedModel, every
image checked as ingest checks it, predictions as CSV and Parquet. Scoring through a server is
in test_serving (it needs the running one)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import make_class_folders

from commands import main
from imgpipe.data.images import check_image
from imgpipe.export.savedmodel import SavedModelClassifier
from imgpipe.monitoring import scoring

pytestmark = pytest.mark.slow

LABELS = ("crack", "finger", "intact")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, export_classifier):
    return export_classifier(tmp_path_factory.mktemp("model") / "1", "scored", LABELS, seed=1)


def test_a_folder_is_scored_like_the_saved_model_and_bad_files_keep_their_rows(
    saved_model, tmp_path
):
    written = make_class_folders(tmp_path / "new", {"crack": 5, "finger": 4}, size=40, ext="jpg")
    (tmp_path / "new" / "finger" / "broken.png").write_text("not an image")
    (tmp_path / "new" / "crack" / ".hidden.png").write_bytes(b"")  # skipped, like ingest
    out = tmp_path / "predictions.csv"

    assert main(["score", str(tmp_path / "new"), "--labels-from-folders", "--saved-model",
                 str(saved_model), "--out", str(out), "--batch-size", "4"]) == 0  # fmt: skip

    table = pd.read_csv(out)
    assert len(table) == 10 and list(table.columns[:6]) == [
        "filepath", "sha256", "label", "predicted", "confidence", "correct",
    ]  # fmt: skip
    broken = table[table.filepath == "finger/broken.png"].iloc[0]
    assert broken.error == "not_an_image" and pd.isna(broken.predicted)
    scored = table[table.error.isna()]
    paths = [p for name in written for p in written[name]]
    encoded = [check_image(p.read_bytes(), max_pixels=10**8).encoded for p in paths]
    expected = SavedModelClassifier(saved_model).predict_bytes(encoded)
    by_path = {f"{p.parent.name}/{p.name}": i for i, p in enumerate(paths)}
    for _, row in scored.iterrows():
        probs = expected[by_path[row.filepath]]
        assert [row[f"p_{c}"] for c in LABELS] == pytest.approx(probs, abs=1e-6)
        assert row.predicted == LABELS[int(np.argmax(probs))]
        assert row.correct == int(row.predicted == row.label)
    summary = scoring.summarise(
        scoring.score(
            scoring.discover(tmp_path / "new", labels_from_folders=True),
            scoring.saved_model_predictor(saved_model, 8),
            max_pixels=10**8,
            batch_size=8,
            progress=False,
        )
    )
    assert summary["scored"] == 9 and summary["rejected"] == {"not_an_image": 1}
    low, high = summary["accuracy_interval"]
    assert low <= summary["accuracy"] == scored.correct.mean() <= high


def test_a_csv_of_new_images_without_labels_goes_to_parquet(saved_model, tmp_path):
    written = make_class_folders(tmp_path / "imgs", {"x": 3}, size=24)
    listing = tmp_path / "new.csv"
    lines = ["filepath"] + [f"imgs/x/{p.name}" for p in written["x"]] + ["imgs/x/missing.png"]
    listing.write_text("\n".join(lines) + "\n")
    out = tmp_path / "predictions.parquet"

    main(["score", str(listing), "--saved-model", str(saved_model), "--out", str(out)])

    table = pd.read_parquet(out)
    assert "label" not in table.columns and len(table) == 4
    assert table.predicted.notna().sum() == 3
    assert table.set_index("filepath").loc["imgs/x/missing.png", "error"] == "unreadable"


def test_bad_requests_name_what_is_wrong(tmp_path):
    make_class_folders(tmp_path / "flat", {"a": 1}, size=8)
    (tmp_path / "flat" / "stray.png").write_bytes(b"x")
    with pytest.raises(scoring.InputError, match=r"stray\.png: with labels from folders"):
        scoring.discover(tmp_path / "flat", labels_from_folders=True)
    (tmp_path / "list.csv").write_text("filepath\nflat/a/a_000.png\n")
    with pytest.raises(scoring.InputError, match="label column, not by folders"):
        scoring.discover(tmp_path / "list.csv", labels_from_folders=True)
    with pytest.raises(scoring.InputError, match=r"one of \.csv, \.parquet"):
        scoring.write([{"filepath": "a"}], tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()
