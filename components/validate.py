"""validate: a Great Expectations suite over the ingest manifest; stops the pipeline on bad data.

Two batches are checked: the manifest itself (one row per image) and a class table (one row per
class and split). Expectations carry GX severities: ``critical`` failures raise
:class:`DataValidationError`, naming the expectation and the offending rows; ``warning`` failures
are reported and logged but let the pipeline go on. Data Docs HTML is written either way.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from imgpipe.core.fileio import atomic_path, write_json_atomic
from imgpipe.core.params import ValidateParams
from imgpipe.data.expectations import describe_outcome, run_suites
from imgpipe.data.manifest import MANIFEST_COLUMNS, read_manifest_frame
from imgpipe.data.tfrecords import SPLITS

log = logging.getLogger(__name__)

SHA256_REGEX = r"^[0-9a-f]{64}$"


class DataValidationError(RuntimeError):
    """An error-level (critical) expectation failed."""


DATA_DOCS, RESULTS = "data_docs", "validation_results.json"


def class_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """One row per (label, split), zeros included, with each class's ratio to the smallest class."""
    labels = sorted(manifest["label"].dropna().unique())
    index = pd.MultiIndex.from_product([labels, list(SPLITS)], names=["label", "split"])
    counts = manifest.groupby(["label", "split"]).size().reindex(index, fill_value=0)
    table = counts.rename("images").reset_index()
    totals = manifest["label"].value_counts()
    table["class_total"] = table["label"].map(totals).astype("int64")
    table["ratio_to_smallest_class"] = table["class_total"] / max(int(totals.min()), 1)
    table["key"] = table["label"] + "/" + table["split"]
    return table


def manifest_frame(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest plus the derived column that split disjointness is checked on."""
    frame = manifest.copy()
    frame["splits_per_image"] = frame.groupby("sha256")["split"].transform("nunique")
    return frame


def manifest_expectations(params: ValidateParams) -> list[Any]:
    from great_expectations import expectations as gxe

    critical: dict[str, Any] = {"severity": "critical"}
    core = ["filepath", "label", "label_index", "split", "sha256", "width", "height", "bytes"]
    exps = [
        gxe.ExpectTableColumnsToMatchSet(
            column_set=list(MANIFEST_COLUMNS), exact_match=False, **critical
        ),
        *[gxe.ExpectColumnValuesToNotBeNull(column=c, **critical) for c in core],
        *[
            gxe.ExpectColumnValuesToBeOfType(column=c, type_="int64", **critical)
            for c in ("label_index", "width", "height", "bytes")
        ],
        gxe.ExpectColumnValuesToMatchRegex(column="sha256", regex=SHA256_REGEX, **critical),
        gxe.ExpectColumnValuesToBeUnique(column="sha256", **critical),
        gxe.ExpectColumnValuesToBeUnique(column="filepath", **critical),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS), **critical),
        gxe.ExpectColumnValuesToBeBetween(
            column="splits_per_image",
            min_value=1,
            max_value=1,
            description="split disjointness: no image in two splits",
            **critical,
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="width", min_value=params.min_side, max_value=params.max_side, **critical
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="height", min_value=params.min_side, max_value=params.max_side, **critical
        ),
        gxe.ExpectColumnValuesToBeBetween(column="bytes", min_value=1, **critical),
    ]
    if params.labels:
        exps += [
            gxe.ExpectColumnDistinctValuesToEqualSet(
                column="label", value_set=list(params.labels), **critical
            ),
            gxe.ExpectColumnValuesToBeBetween(
                column="label_index", min_value=0, max_value=len(params.labels) - 1, **critical
            ),
        ]
    return exps


def class_expectations(params: ValidateParams) -> list[Any]:
    from great_expectations import expectations as gxe
    from great_expectations.expectations.metadata_types import FailureSeverity

    return [
        gxe.ExpectColumnValuesToBeBetween(
            column="images",
            min_value=params.min_images_per_class,
            severity=FailureSeverity.CRITICAL,
            description=f"each class has >= {params.min_images_per_class} images in every split",
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="ratio_to_smallest_class",
            max_value=params.max_imbalance_ratio,
            severity=FailureSeverity.WARNING,
            description=f"imbalance: no class over {params.max_imbalance_ratio}x the smallest",
        ),
    ]


def run(*, manifest: Path, out: Path, summary: Path, validate: ValidateParams) -> dict[str, Any]:
    """Validate the manifest; write Data Docs and every outcome to ``out``, the counts to
    ``summary``; raise ``DataValidationError`` on error-level failures."""
    params, manifest_csv = validate, manifest
    manifest = read_manifest_frame(manifest_csv)
    batches = {
        "manifest": (manifest_frame(manifest), manifest_expectations(params), ["filepath"]),
        "classes": (class_table(manifest), class_expectations(params), ["key"]),
    }
    with atomic_path(out) as staged:
        outcomes = run_suites(batches, staged / DATA_DOCS, "ingest")
        write_json_atomic(staged / RESULTS, outcomes)

    errors = [o for o in outcomes if not o["success"] and o["severity"] == "critical"]
    warnings = [o for o in outcomes if not o["success"] and o["severity"] != "critical"]
    counts = {
        "success": not errors,
        "expectations": len(outcomes),
        "failed_errors": len(errors),
        "failed_warnings": len(warnings),
    }
    write_json_atomic(summary, counts)
    for outcome in warnings:
        log.warning("data validation warning: %s", describe_outcome(outcome))
    if errors:
        raise DataValidationError(
            f"{len(errors)} error-level expectation(s) failed on {manifest_csv} "
            f"(Data Docs: {out / DATA_DOCS / 'index.html'}):\n"
            + "\n".join(f"  - {describe_outcome(o)}" for o in errors)
        )
    return counts


def metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Pass/fail counts, for MLflow."""
    return {
        "validate.success": float(summary["success"]),
        "validate.failed_errors": summary["failed_errors"],
        "validate.failed_warnings": summary["failed_warnings"],
    }


def log_to_mlflow(out: Path, summary: Path) -> None:
    """The Data Docs and every outcome, to the active MLflow run."""
    import mlflow

    if summary.is_file():
        mlflow.log_artifact(str(summary), "validate")
    if (out / RESULTS).is_file():
        mlflow.log_artifact(str(out / RESULTS), "validate")
    if (out / DATA_DOCS).is_dir():
        mlflow.log_artifacts(str(out / DATA_DOCS), "validate/data_docs")


def log_failure(out: Path, summary: Path) -> None:
    """After a failed validation: the counts and the Data Docs that say what failed."""
    import json

    import mlflow

    if summary.is_file():
        mlflow.log_metrics(metrics(json.loads(summary.read_text())))
    log_to_mlflow(out, summary)


def describe(summary: dict[str, Any]) -> str:
    return (
        f"{summary['expectations']} expectations, {summary['failed_warnings']} warning(s); "
        f"Data Docs: {DATA_DOCS}/index.html"
    )
