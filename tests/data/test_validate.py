"""components.validate: the Great Expectations suite that stops the pipeline on bad data.

Most tests build a small manifest directly (the columns ingest writes) so each one exercises a
single expectation; one slow test runs the real sample data through ingest and validate.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import PROJECT, params

from components import validate
from imgpipe.core.params import ValidateParams, load_params
from imgpipe.data.manifest import MANIFEST_COLUMNS
from imgpipe.data.tfrecords import SPLITS

# Three classes, enough images in every split for min_images_per_class=2.
BALANCED = {label: {"train": 6, "val": 3, "test": 3} for label in ("cat", "dog", "owl")}


def manifest_rows(counts: dict[str, dict[str, int]], *, side: int = 48) -> pd.DataFrame:
    """A manifest like ingest writes: ``counts[label][split]`` rows, each a distinct image."""
    labels = sorted(counts)
    rows = []
    for label in labels:
        for split, n in counts[label].items():
            for i in range(n):
                filepath = f"{label}/{split}_{i:03d}.png"
                rows.append(
                    {
                        "filepath": filepath,
                        "label": label,
                        "label_index": labels.index(label),
                        "split": split,
                        "sha256": hashlib.sha256(filepath.encode()).hexdigest(),
                        "width": side,
                        "height": side,
                        "mode": "L",
                        "format": "PNG",
                        "bytes": 1234,
                        "exif_transposed": False,
                    }
                )
    return pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))


def write_manifest(tmp_path: Path, frame: pd.DataFrame) -> Path:
    path = tmp_path / "manifest.csv"
    frame.to_csv(path, index=False)
    return path


def validate_params(**overrides) -> ValidateParams:
    """The project's validate params for these small manifests: any label set, 2 images per
    class and split."""
    return params("validate", **{"labels": [], "min_images_per_class": 2, **overrides})


def run_validate(tmp_path: Path, manifest: Path, p: ValidateParams | None = None) -> dict:
    """validate.run with its outputs in ``tmp_path`` (validate/, metrics/validate.json)."""
    return validate.run(
        manifest=manifest,
        out=tmp_path / "validate",
        summary=tmp_path / "metrics" / "validate.json",
        validate=p or validate_params(),
    )


def failure_line(error: validate.DataValidationError, expectation: str) -> str:
    """The one line of the error message that describes ``expectation``."""
    lines = [line for line in str(error).splitlines() if expectation in line]
    assert len(lines) == 1, f"expected one line naming {expectation} in:\n{error}"
    return lines[0]


def read_summary(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "metrics" / "validate.json").read_text())


# --- unit tests of the frames the expectations run on -------------------------------------------


def test_class_table_has_a_zero_row_for_a_class_missing_from_a_split():
    """Guards the zero fill: a class absent from a split must appear with 0 images, otherwise
    the min_images_per_class expectation never sees it and an empty split passes."""
    manifest = manifest_rows(
        {"a": {"train": 4, "val": 2, "test": 2}, "b": {"train": 2, "test": 1}}
    )  # no b in val
    table = validate.class_table(manifest)

    assert list(table["key"]) == [f"{label}/{split}" for label in ("a", "b") for split in SPLITS]
    by_key = table.set_index("key")
    assert by_key.loc["b/val", "images"] == 0
    assert by_key.loc["a/train", "images"] == 4
    assert by_key.loc["b/test", "images"] == 1
    assert table["images"].sum() == len(manifest)
    assert by_key.loc["a/val", "class_total"] == 8
    assert by_key.loc["b/val", "class_total"] == 3
    assert by_key.loc["a/test", "ratio_to_smallest_class"] == pytest.approx(8 / 3)
    assert by_key.loc["b/train", "ratio_to_smallest_class"] == pytest.approx(1.0)


def test_manifest_frame_counts_splits_per_image_without_changing_the_input():
    """Guards the split-disjointness column: an image (sha256) present in two splits gets
    splits_per_image 2 on each of its rows; others get 1; the caller's frame is untouched."""
    manifest = manifest_rows(BALANCED)
    leaked = manifest.index[manifest["split"] == "test"][0]
    manifest.loc[leaked, "sha256"] = manifest.loc[0, "sha256"]  # row 0 is in train
    before = manifest.copy()

    frame = validate.manifest_frame(manifest)

    assert frame.loc[0, "splits_per_image"] == 2
    assert frame.loc[leaked, "splits_per_image"] == 2
    others = frame.drop(index=[0, leaked])
    assert (others["splits_per_image"] == 1).all()
    assert "splits_per_image" not in manifest.columns
    pd.testing.assert_frame_equal(manifest, before)


def test_manifest_frame_same_image_twice_in_one_split_counts_one_split():
    """Guards that splits_per_image counts distinct splits, not rows: an exact copy inside one
    split is the uniqueness expectation's business, not a split leak."""
    manifest = manifest_rows(BALANCED)
    manifest.loc[1, "sha256"] = manifest.loc[0, "sha256"]  # both in cat/train
    frame = validate.manifest_frame(manifest)
    assert frame.loc[[0, 1], "splits_per_image"].tolist() == [1, 1]


# --- validate.run on small manifests ------------------------------------------------------------


def test_good_manifest_passes_and_writes_docs_results_and_summary(tmp_path):
    """Guards the happy path: a clean manifest passes every expectation and run() writes the
    Data Docs site, every outcome and a success summary."""
    p = validate_params(labels=("cat", "dog", "owl"))

    summary = run_validate(tmp_path, write_manifest(tmp_path, manifest_rows(BALANCED)), p)

    assert summary == read_summary(tmp_path)
    assert summary["success"] is True
    assert summary["failed_errors"] == 0
    assert summary["failed_warnings"] == 0
    expected = len(validate.manifest_expectations(p)) + len(validate.class_expectations(p))
    assert summary["expectations"] == expected
    index = tmp_path / "validate" / validate.DATA_DOCS / "index.html"
    assert index.is_file()
    assert "<html" in index.read_text().lower()
    results = json.loads((tmp_path / "validate" / validate.RESULTS).read_text())
    assert len(results) == expected
    assert all(r["success"] for r in results)
    assert {r["batch"] for r in results} == {"manifest", "classes"}
    assert {
        "expect_column_values_to_be_unique",
        "expect_column_distinct_values_to_equal_set",
        "expect_column_values_to_be_between",
    } <= {r["expectation"] for r in results}
    # Nothing temporary is left beside the outputs (atomic writes).
    leftovers = sorted(child.name for child in tmp_path.iterdir())
    assert leftovers == ["manifest.csv", "metrics", "validate"]


def test_class_below_min_images_per_class_fails_naming_expectation_and_row(tmp_path):
    """Guards the critical per-class count: one class short in one split stops the pipeline
    with a message naming the expectation and the class/split row; docs and a failing
    summary are still written so the failure can be inspected."""
    counts = {**BALANCED, "rare": {"train": 6, "val": 3, "test": 1}}
    with pytest.raises(validate.DataValidationError) as excinfo:
        run_validate(tmp_path, write_manifest(tmp_path, manifest_rows(counts)))

    line = failure_line(excinfo.value, "expect_column_values_to_be_between on column 'images'")
    assert "rare/test" in line
    assert "rare/val" not in line and "cat/test" not in line
    assert "1 offending row(s)" in line
    assert "1 error-level expectation(s) failed" in str(excinfo.value)
    assert (tmp_path / "validate" / validate.DATA_DOCS / "index.html").is_file()
    summary = read_summary(tmp_path)
    assert summary["success"] is False
    assert summary["failed_errors"] == 1
    results = json.loads((tmp_path / "validate" / validate.RESULTS).read_text())
    failed = [r for r in results if not r["success"]]
    assert [(r["column"], r["severity"], r["offending"]) for r in failed] == [
        ("images", "critical", ["rare/test"])
    ]


def test_duplicate_sha256_fails_naming_expectation_and_filepaths(tmp_path):
    """Guards the uniqueness expectation: two rows with one sha256 (an exact copy that escaped
    dedup) are a critical failure that names both file paths."""
    manifest = manifest_rows(BALANCED)
    manifest.loc[1, "sha256"] = manifest.loc[0, "sha256"]
    first, second = manifest.loc[0, "filepath"], manifest.loc[1, "filepath"]

    with pytest.raises(validate.DataValidationError) as excinfo:
        run_validate(tmp_path, write_manifest(tmp_path, manifest))

    line = failure_line(excinfo.value, "expect_column_values_to_be_unique on column 'sha256'")
    assert first in line and second in line
    assert "2 offending row(s)" in line
    assert manifest.loc[2, "filepath"] not in line


def test_image_in_two_splits_fails_split_disjointness(tmp_path):
    """Guards split disjointness: the same image in train and test is a critical failure on
    splits_per_image naming both file paths."""
    manifest = manifest_rows(BALANCED)
    leaked = manifest.index[manifest["split"] == "test"][0]
    manifest.loc[leaked, "sha256"] = manifest.loc[0, "sha256"]

    with pytest.raises(validate.DataValidationError) as excinfo:
        run_validate(tmp_path, write_manifest(tmp_path, manifest))

    line = failure_line(excinfo.value, "on column 'splits_per_image'")
    assert "expect_column_values_to_be_between" in line
    assert manifest.loc[0, "filepath"] in line and manifest.loc[leaked, "filepath"] in line


def test_unexpected_label_fails_naming_expectation_and_label(tmp_path, caplog):
    """Guards the label set check: with params.labels set, a label outside it is a critical
    failure naming expect_column_distinct_values_to_equal_set and the unexpected value, and
    the user sees that failure, not Great Expectations' renderer traceback (its Data Docs
    cannot word the "unexpected" sentence of this aggregate expectation)."""
    counts = {**BALANCED, "zebra": {"train": 6, "val": 3, "test": 3}}

    with caplog.at_level(logging.WARNING), pytest.raises(validate.DataValidationError) as excinfo:
        run_validate(
            tmp_path,
            write_manifest(tmp_path, manifest_rows(counts)),
            validate_params(labels=("cat", "dog", "owl")),
        )

    line = failure_line(excinfo.value, "expect_column_distinct_values_to_equal_set")
    assert "column 'label'" in line
    assert "'zebra'" in line
    # label_index 3 is out of range for three expected labels.
    assert "expect_column_values_to_be_between on column 'label_index'" in str(excinfo.value)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_missing_expected_label_fails_naming_the_missing_label(tmp_path):
    """Guards the other half of the label set check: a label in params.labels with no images
    at all fails and the message says which label is missing."""
    with pytest.raises(validate.DataValidationError) as excinfo:
        run_validate(
            tmp_path,
            write_manifest(tmp_path, manifest_rows(BALANCED)),
            validate_params(labels=("cat", "dog", "owl", "yak")),
        )

    line = failure_line(excinfo.value, "expect_column_distinct_values_to_equal_set")
    assert "missing value 'yak'" in line


def test_image_smaller_than_min_side_fails_naming_the_file(tmp_path):
    """Guards the image size bounds: an image narrower than min_side is a critical failure
    naming that file."""
    manifest = manifest_rows(BALANCED)
    manifest.loc[4, "width"] = 16

    with pytest.raises(validate.DataValidationError) as excinfo:
        run_validate(tmp_path, write_manifest(tmp_path, manifest), validate_params(min_side=32))

    line = failure_line(excinfo.value, "on column 'width'")
    assert manifest.loc[4, "filepath"] in line
    assert "on column 'height'" not in str(excinfo.value)


def test_class_imbalance_is_a_warning_not_an_error(tmp_path, caplog):
    """Guards severities: an imbalance above max_imbalance_ratio is logged and counted as a
    warning, but run() succeeds so the pipeline goes on."""
    counts = {"big": {"train": 30, "val": 6, "test": 6}, "small": {"train": 6, "val": 3, "test": 3}}
    with caplog.at_level(logging.WARNING, logger="components.validate"):
        summary = run_validate(
            tmp_path,
            write_manifest(tmp_path, manifest_rows(counts)),
            validate_params(max_imbalance_ratio=2.0),
        )

    assert summary["success"] is True
    assert summary["failed_errors"] == 0
    assert summary["failed_warnings"] >= 1
    assert read_summary(tmp_path) == summary
    warnings = [r.getMessage() for r in caplog.records if r.name == "components.validate"]
    assert any("ratio_to_smallest_class" in w and "big/train" in w for w in warnings), warnings
    results = json.loads((tmp_path / "validate" / validate.RESULTS).read_text())
    assert [r["severity"] for r in results if not r["success"]] == ["warning"]


def test_numeric_and_na_like_labels_are_labels_not_numbers_or_nulls(tmp_path):
    """Guards reading the manifest's text columns as text: class folders named "0"/"1" used to
    crash class_table (int + str) and a class named "NA" was read as a missing label."""
    counts = {
        "0": {"train": 6, "val": 3, "test": 3},
        "1": {"train": 6, "val": 3, "test": 3},
        "NA": {"train": 6, "val": 3, "test": 3},
    }

    summary = run_validate(
        tmp_path,
        write_manifest(tmp_path, manifest_rows(counts)),
        validate_params(labels=("0", "1", "NA")),
    )

    assert summary["success"] is True
    assert summary["failed_errors"] == 0


def test_empty_cell_is_still_a_missing_value(tmp_path):
    """Guards the other side of the text-column fix: an empty label cell is still null and
    fails expect_column_values_to_not_be_null naming the file."""
    manifest = manifest_rows(BALANCED)
    manifest.loc[2, "label"] = ""

    with pytest.raises(validate.DataValidationError) as excinfo:
        run_validate(tmp_path, write_manifest(tmp_path, manifest))

    line = failure_line(excinfo.value, "expect_column_values_to_not_be_null on column 'label'")
    assert manifest.loc[2, "filepath"] in line


def test_cli_validate_failure_exits_1_and_logs_failed_run(
    tmp_path, monkeypatch, capsys, tmp_mlflow
):
    """Guards the CLI adapter: a failed expectation exits with status 1 and one clear message
    (no traceback), and the MLflow run is marked failed with the Data Docs still logged."""
    from commands import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "test-validate-cli")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    counts = {**BALANCED, "rare": {"train": 6, "val": 3, "test": 1}}
    manifest = write_manifest(tmp_path, manifest_rows(counts))
    raw = load_params(PROJECT / "params.yaml")
    raw["validate"] = {**raw["validate"], "labels": [], "min_images_per_class": 2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    status = main(["validate", "--manifest", str(manifest)])

    err = capsys.readouterr().err
    assert status == 1
    assert "data validation failed" in err
    assert "expect_column_values_to_be_between on column 'images'" in err and "rare/test" in err
    assert "Traceback" not in err
    assert (tmp_path / "outputs/validate/data_docs/index.html").is_file()
    assert json.loads((tmp_path / "metrics/validate.json").read_text())["success"] is False

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tmp_mlflow)
    experiment = client.get_experiment_by_name("test-validate-cli")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FAILED"
    assert run.data.tags["stage.validate"] == "failed"
    assert run.data.params["validate.min_images_per_class"] == "2"
    assert run.data.metrics["validate.success"] == 0.0
    docs = [a.path for a in client.list_artifacts(run.info.run_id, "validate/data_docs")]
    assert "validate/data_docs/index.html" in docs


# --- the real sample data -----------------------------------------------------------------------


@pytest.mark.slow
def test_validate_passes_the_sample_data(tmp_path):
    """Guards the shipped defaults: the ELPV sample data, ingested with the project's
    params.yaml, passes the suite with those params and nothing is quarantined."""
    from components import ingest
    from imgpipe.core.params import DataParams, IngestParams, ValidateParams, section
    from imgpipe.data import sample_data

    data = tmp_path / "data"
    assert sample_data.run(data, progress=False) == 2624
    raw = load_params(PROJECT / "params.yaml")
    raw["data"] = {**raw["data"], "source": str(data), "metadata_csv": str(data / "metadata.csv")}
    ingest_summary = ingest.run(
        source=data,
        out=tmp_path / "ingest",
        summary=tmp_path / "metrics" / "ingest.json",
        data=section(DataParams, "data", raw),
        ingest=section(IngestParams, "ingest", raw),
        validate=section(ValidateParams, "validate", raw),
        progress=False,
    )
    assert ingest_summary["images"] == 2624
    assert ingest_summary["quarantined"] == 0

    shipped = section(ValidateParams, "validate", raw)
    manifest = tmp_path / "ingest" / "manifest.csv"
    summary = run_validate(tmp_path, manifest, shipped)

    assert summary["success"] is True
    assert summary["failed_errors"] == 0
    # The label-set expectation ran on a real set (not [], which accepts any labels).
    assert len(shipped.labels) == 4
    assert set(pd.read_csv(manifest)["label"]) == set(shipped.labels)
    assert (tmp_path / "validate" / validate.DATA_DOCS / "index.html").is_file()
