"""Batch scoring (TFX's BulkInferrer): a model over a folder or CSV of new images, every image
checked as ingest checks it, the predictions written as CSV or Parquet.

The model is a SavedModel (a folder, or the registry's champion fetched into a temporary one)
or a TF Serving server over gRPC. Each image goes to the model as ingest would store it (EXIF
orientation applied, deep or odd modes turned into 8-bit PNG), so it sees what training saw.
Nothing is dropped in silence: an image that cannot be used keeps its row, with the reason and
no prediction. With labels (class folders, or a ``label`` column) each row says whether the
prediction was right, and the summary gives the accuracy with its 95 % interval: the form a
labelling tool exports as feedback.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgpipe.core.errors import InputError
from imgpipe.core.fileio import atomic_path, sha256_bytes
from imgpipe.data.images import ImageRejected, check_image

log = logging.getLogger(__name__)

FORMATS = (".csv", ".parquet")
Predict = Callable[[Sequence[bytes]], tuple[np.ndarray, list[str]]]
"""Encoded images -> (probabilities, the label of each column)."""


@dataclass(frozen=True)
class Item:
    filepath: str
    """As given: relative to the folder or the CSV's folder."""
    path: Path
    label: str | None


def discover(source: Path, labels_from_folders: bool = False) -> list[Item]:
    """The images to score: every regular, non-hidden file under a folder (with
    ``labels_from_folders``, the first folder below it is the label), or the rows of a CSV
    ``filepath[,label]`` (paths relative to the CSV's folder)."""
    if source.is_dir():
        items = []
        for path in sorted(source.rglob("*")):
            relative = path.relative_to(source)
            if any(part.startswith(".") for part in relative.parts) or not path.is_file():
                continue
            if labels_from_folders and len(relative.parts) < 2:
                raise InputError(
                    f"{path}: with labels from folders, images sit in <label>/ under {source}"
                )
            label = relative.parts[0] if labels_from_folders else None
            items.append(Item(relative.as_posix(), path, label))
        return items
    if source.suffix.lower() != ".csv" or not source.is_file():
        raise InputError(f"{source}: give a folder of images or a CSV with a filepath column")
    if labels_from_folders:
        raise InputError(f"{source}: a CSV gives its labels in a label column, not by folders")
    with open(source, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if "filepath" not in (reader.fieldnames or []):
            raise InputError(f"{source}: no filepath column (columns: {reader.fieldnames})")
        labelled = "label" in (reader.fieldnames or [])
        return [
            Item(
                row["filepath"],
                source.parent / row["filepath"],
                (row["label"] or None) if labelled else None,
            )
            for row in reader
        ]


def saved_model_predictor(saved_model: Path | Any, batch_size: int) -> Predict:
    """A SavedModel folder, or a ``SavedModelClassifier`` already loaded, as a ``Predict``."""
    from imgpipe.export.savedmodel import SavedModelClassifier

    model = (
        saved_model
        if isinstance(saved_model, SavedModelClassifier)
        else SavedModelClassifier(saved_model)
    )
    names: list[str] = []

    def predict(encoded: Sequence[bytes]) -> tuple[np.ndarray, list[str]]:
        if not names:  # the model's own labels, asked once
            names.extend(model.class_names(encoded[0]) or [])
        if not names:
            raise InputError(f"{saved_model}: exported without class_names; export it again")
        return model.predict_bytes(encoded, batch_size), names

    return predict


def server_predictor(client: Any, model: str) -> Predict:
    """Through a TF Serving server (``serving.client.ServingClient``)."""

    def predict(encoded: Sequence[bytes]) -> tuple[np.ndarray, list[str]]:
        outputs = client.predict_bytes(encoded, model=model)
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in outputs["class_names"][0]]
        return np.asarray(outputs["probabilities"], np.float64), names

    return predict


def _checked(item: Item, max_pixels: int) -> tuple[dict[str, Any], bytes | None]:
    row: dict[str, Any] = {"filepath": item.filepath, "label": item.label}
    try:
        data = item.path.read_bytes()
    except OSError as exc:
        return {**row, "error": "unreadable", "detail": str(exc)}, None
    row["sha256"] = sha256_bytes(data)
    try:
        checked = check_image(data, max_pixels=max_pixels)
    except ImageRejected as exc:
        return {**row, "error": exc.reason, "detail": exc.detail}, None
    return row, checked.encoded


def score(
    items: Sequence[Item],
    predict: Predict,
    *,
    max_pixels: int,
    batch_size: int,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One row per item, in order: its prediction and the probability of each class, or why it
    could not be scored."""
    from tqdm import tqdm

    rows: list[dict[str, Any]] = []
    pending: list[tuple[dict[str, Any], bytes]] = []

    def flush() -> None:
        if not pending:
            return
        probs, names = predict([encoded for _, encoded in pending])
        for (row, _), p in zip(pending, probs, strict=True):
            best = int(np.argmax(p))
            row.update(predicted=names[best], confidence=float(p[best]))
            if row["label"] is not None:
                row["correct"] = int(names[best] == row["label"])
            row.update({f"p_{name}": float(v) for name, v in zip(names, p, strict=True)})
        pending.clear()

    for item in tqdm(items, desc="score", unit="img", disable=not progress):
        row, encoded = _checked(item, max_pixels)
        rows.append(row)
        if encoded is not None:
            pending.append((row, encoded))
            if len(pending) == batch_size:
                flush()
    flush()
    return rows


def write(rows: Sequence[dict[str, Any]], out: Path) -> Path:
    """``rows`` as CSV or Parquet (by ``out``'s suffix), atomically."""
    import pandas as pd

    if out.suffix.lower() not in FORMATS:
        raise InputError(f"{out}: write predictions as one of {', '.join(FORMATS)}")
    columns = ["filepath", "sha256", "label", "predicted", "confidence", "correct"]
    columns += sorted({k for r in rows for k in r if k.startswith("p_")})
    columns += ["error", "detail"]
    table = pd.DataFrame(list(rows), columns=columns)
    if table["label"].isna().all():
        table = table.drop(columns=["label", "correct"])
    else:
        table["correct"] = table["correct"].astype("Int64")  # empty where not scored
    with atomic_path(out) as staged:
        if out.suffix.lower() == ".csv":
            table.to_csv(staged, index=False, lineterminator="\n")
        else:
            table.to_parquet(staged, index=False)
    return out


def summarise(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """How many were scored and rejected (by reason), the predicted classes, and with labels
    the accuracy and its 95 % Wilson interval."""
    from scipy.stats import binomtest

    rows = list(rows)
    scored = [r for r in rows if "predicted" in r]
    summary: dict[str, Any] = {
        "images": len(rows),
        "scored": len(scored),
        "rejected": dict(Counter(r["error"] for r in rows if "error" in r)),
        "predicted": dict(sorted(Counter(r["predicted"] for r in scored).items())),
    }
    labelled = [r for r in scored if r.get("label") is not None]
    if labelled:
        right = sum(r["correct"] for r in labelled)
        interval = binomtest(right, len(labelled)).proportion_ci(method="wilson")
        summary["labelled"] = len(labelled)
        summary["accuracy"] = right / len(labelled)
        summary["accuracy_interval"] = [float(interval.low), float(interval.high)]
    return summary


def describe(summary: dict[str, Any], out: Path) -> str:
    text = f"score: {summary['scored']} of {summary['images']} images scored into {out}"
    if summary["rejected"]:
        reasons = ", ".join(f"{k} {n}" for k, n in sorted(summary["rejected"].items()))
        text += f"; not scored (the rows say why): {reasons}"
    if summary["predicted"]:
        text += "; predicted " + ", ".join(f"{k} {n}" for k, n in summary["predicted"].items())
    if "accuracy" in summary:
        low, high = summary["accuracy_interval"]
        text += (
            f"; accuracy on the {summary['labelled']} labelled images {summary['accuracy']:.4f} "
            f"(95% interval {low:.4f} to {high:.4f})"
        )
    return text
