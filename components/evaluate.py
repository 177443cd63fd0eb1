"""evaluate: the fine-tuned model on the test split (read only here and by export's parity
report), and the blessing gate.

Metrics: accuracy, balanced accuracy, macro-F1, per-class precision/recall/F1, the confusion
matrix, expected calibration error, and all of them sliced by manifest metadata columns. They
are the served model's (with the decision finetune fitted for ``finetune.objective``, if any);
beside them, the network's own decision (the calibrated argmax) and the figures of the groups
of classes declared in ``evaluate.class_groups``, for both decisions. Figures:
the confusion matrix, a reliability diagram and the most confidently misclassified images.

Blessing, like TFX's Evaluator: the candidate must reach absolute floors and, when the registry
has a ``champion``, must not be worse than it beyond a non-inferiority margin, at a stated
confidence (``imgpipe.evaluation.gate``). The champion is not judged by the figures it was
registered with: its own SavedModel is run here, through its bytes signature, on the test images
that neither model trained on (the registry keeps the list of images each version trained on), and
the two are compared image by image.
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np

from imgpipe.core import figures
from imgpipe.core.errors import InputError
from imgpipe.core.fileio import atomic_path, write_json_atomic
from imgpipe.core.params import EvaluateParams, ModelParams, ServingParams
from imgpipe.data.labels import read_labels
from imgpipe.data.lineage import changes, lineage_digest, relabelled
from imgpipe.data.manifest import LABELS, MANIFEST, SHARDS, read_manifest
from imgpipe.data.tfrecords import Split, read_split
from imgpipe.evaluation import gate
from imgpipe.evaluation.calibration import Decision, own_decision, untempered
from imgpipe.evaluation.metrics import (
    calibration_bins,
    classification_metrics,
    confusion_matrix,
    decision_metrics,
    decision_text,
    expected_calibration_error,
    group_index,
    group_metrics,
    rounded,
)
from imgpipe.export.savedmodel import SavedModelClassifier
from imgpipe.model import backbones
from imgpipe.model.saliency import grad_cam
from imgpipe.tracking import registry
from imgpipe.tracking.registry import Champion

log = logging.getLogger(__name__)

PREDICTIONS, BLESSING = "predictions.csv", "blessing.json"
CONFUSION_PNG, CALIBRATION_PNG, MISCLASSIFIED_PNG = (
    "confusion.png",
    "calibration.png",
    "misclassified.png",
)


def decoded(encoded: Sequence[bytes], chosen: np.ndarray, image_size: int) -> np.ndarray:
    """The ``chosen`` images as the model sees them: float RGB 0-255 at its input size."""
    from imgpipe.data.datasets import decode_and_resize

    if not len(chosen):
        return np.zeros((0, image_size, image_size, 3), np.float32)
    return np.stack([decode_and_resize(encoded[i], image_size).numpy() for i in chosen])


def predict_keras(model: Any, encoded: Sequence[bytes], image_size: int, batch: int) -> np.ndarray:
    """The Keras model on the images decoded exactly as in training and serving."""
    from imgpipe.data.datasets import encoded_dataset

    batches = encoded_dataset(encoded, image_size, batch)
    return np.concatenate([np.asarray(model(x, training=False)) for x in batches])


def _read_manifest(manifest: Path, columns: Sequence[str]) -> dict[str, dict[str, str]]:
    """Every row of ingest's manifest by sha256, checked to have the ``columns`` slices need."""
    try:
        return {row["sha256"]: row for row in read_manifest(manifest, columns=columns)}
    except InputError as error:
        raise InputError(f"evaluate.slice_by: {error}") from None


def slice_metrics(
    rows: Sequence[dict[str, str]],
    y_true: np.ndarray,
    probs: np.ndarray,
    labels: Sequence[str],
    columns: Sequence[str],
    bins: int,
) -> dict[str, dict[str, Any]]:
    """Metrics per value of each metadata column (per-class detail left out)."""
    out: dict[str, dict[str, Any]] = {}
    for column in columns:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, row in enumerate(rows):
            groups[row.get(column) or "(missing)"].append(i)
        out[column] = {}
        for value, index in sorted(groups.items()):
            m = classification_metrics(y_true[index], probs[index], labels, bins)
            m.pop("per_class")
            out[column][value] = m
    return out


# --- figures -------------------------------------------------------------------------------


def plot_confusion(cm: np.ndarray, labels: Sequence[str], path: Path) -> None:
    plt = figures.pyplot()
    n = len(labels)
    fig, axes = plt.subplots(1, 2, figsize=(4 + 2.2 * n, 1.5 + 1.1 * n))
    recall = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    for ax, values, title, fmt in (
        (axes[0], cm, "counts", "{:d}"),
        (axes[1], recall, "share of each actual class (recall on the diagonal)", "{:.2f}"),
    ):
        ax.imshow(recall, cmap="Blues", vmin=0, vmax=1)
        for i in range(n):
            for j in range(n):
                value = values[i, j]
                ax.text(
                    j,
                    i,
                    fmt.format(int(value) if fmt == "{:d}" else float(value)),
                    ha="center",
                    va="center",
                    color="white" if recall[i, j] > 0.5 else "black",
                    fontsize=9,
                )
        ax.set_xticks(range(n), labels, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(n), labels, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"test split confusion matrix ({int(cm.sum())} images)")
    fig.tight_layout()
    figures.save(fig, path)


def plot_calibration(rows: Sequence[dict[str, Any]], ece: float, path: Path) -> None:
    plt = figures.pyplot()
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    centres = [(r["lower"] + r["upper"]) / 2 for r in rows]
    width = rows[0]["upper"] - rows[0]["lower"]
    used = [r["count"] > 0 for r in rows]
    top.bar(
        [c for c, u in zip(centres, used, strict=True) if u],
        [r["accuracy"] for r in rows if r["count"]],
        width=width * 0.9,
        label="accuracy",
        color="tab:blue",
    )
    top.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    top.set_ylabel("accuracy in bin")
    top.set_title(f"reliability diagram, expected calibration error {ece:.3f}", fontsize=10)
    top.legend(fontsize=8)
    bottom.bar(centres, [r["count"] for r in rows], width=width * 0.9, color="tab:grey")
    bottom.set_xlabel("top-1 confidence")
    bottom.set_ylabel("images")
    fig.tight_layout()
    figures.save(fig, path)


def most_confidently_wrong(labels: np.ndarray, probs: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` misclassified images with the highest confidence."""
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    return wrong[np.argsort(-probs[wrong, predicted[wrong]], kind="stable")][:count]


def plot_misclassified(
    test: Split,
    probs: np.ndarray,
    labels: Sequence[str],
    chosen: np.ndarray,
    images: np.ndarray,
    heat: np.ndarray,
    path: Path,
) -> int:
    """The ``chosen`` test images (as the model saw them) with actual, predicted and
    confidence, each beside its Grad-CAM map for the predicted class (``heat``)."""
    plt = figures.pyplot()
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != test.labels)
    cols = 4
    rows = max(1, -(-len(chosen) // cols))
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(2.0 * 2 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for n, i in enumerate(chosen):
        image, overlay = axes[n // cols][2 * (n % cols)], axes[n // cols][2 * (n % cols) + 1]
        pixels = np.clip(images[n], 0, 255).astype(np.uint8)
        image.imshow(pixels)
        overlay.imshow(pixels)
        overlay.imshow(heat[n], cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
        overlay.set_title("Grad-CAM", fontsize=7)
        image.set_title(
            f"actual {labels[test.labels[i]]}\npredicted {labels[predicted[i]]} "
            f"({probs[i, predicted[i]]:.2f})",
            fontsize=7,
        )
    if not len(chosen):
        axes[0][0].text(0.5, 0.5, "no misclassified test images", ha="center")
    fig.suptitle(
        f"most confidently misclassified ({len(wrong)} wrong in all), with where the model "
        "looked for the class it predicted",
        fontsize=9,
    )
    fig.tight_layout()
    figures.save(fig, path)
    return len(chosen)


# --- the stage -------------------------------------------------------------------------------


def champion_probabilities(champion: Champion, test: Split, labels: Sequence[str]) -> np.ndarray:
    """The champion's own SavedModel's probabilities on this test split."""
    with tempfile.TemporaryDirectory(prefix="imgpipe-champion-") as tmp:
        try:
            saved_model = champion.download_saved_model(Path(tmp))
        except Exception as exc:
            raise RuntimeError(
                f"cannot fetch the SavedModel of champion {champion.name} v{champion.version} "
                f"from the MLflow registry to compare with it: {exc}"
            ) from exc
        served = SavedModelClassifier(saved_model)
        probs = served.predict_bytes(test.encoded)
        names = served.class_names(test.encoded[0])
    if probs.shape[1] != len(labels) or names not in (None, list(labels)):
        raise InputError(
            f"champion {champion.name} v{champion.version} predicts classes "
            f"{names or probs.shape[1]}, the candidate {list(labels)}: they are not comparable; "
            "register under another serving.model_name"
        )
    return probs


def against_champion(
    champion: Champion,
    test: Split,
    probs: np.ndarray,
    labels: Sequence[str],
    params: EvaluateParams,
    data_labels: dict[str, str],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The champion's figures and the paired comparison, on the test images the champion did
    not train on (the candidate never trained on any: they are today's test split); and which
    of the champion's training images carry another label in today's data (``data_labels``,
    sha256 -> label of every image ingest kept)."""
    theirs = champion_probabilities(champion, test, labels)
    trained_on = champion.trained_on()
    keep = np.ones(len(test.sha256), dtype=bool)
    if trained_on is not None:
        keep = np.array([digest not in trained_on for digest in test.sha256], dtype=bool)
    known = trained_on or {}
    moved = relabelled(known, data_labels)
    baseline = {
        "version": champion.version,
        "run_id": champion.run_id,
        "lineage": trained_on is not None,
        "excluded": int((~keep).sum()),
        "images": int(keep.sum()),
        "labels_known": sum(
            was is not None and digest in data_labels for digest, was in known.items()
        ),
        "relabelled": len(moved),
        "relabelled_by_class": changes(moved),
    }
    if trained_on is None:
        log.warning(
            "evaluate: champion %s v%d has no record of the images it trained on (registered "
            "before lineage was kept): compared on the whole test split",
            champion.name,
            champion.version,
        )
    if not keep.any():
        return baseline, {"images": 0}
    m = classification_metrics(test.labels[keep], theirs[keep], labels, params.calibration_bins)
    baseline.update({k: m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")})
    comparison = gate.compare(
        test.labels[keep],
        probs[keep].argmax(axis=1),
        theirs[keep].argmax(axis=1),
        classes=len(labels),
        samples=params.bootstrap_samples,
        confidence=params.confidence,
    )
    return baseline, comparison


REGISTRY: Final = "registry"
"""``champion=REGISTRY``: compare with the registry's current champion of ``serving.model_name``."""


def decisions(
    y_true: np.ndarray,
    served: np.ndarray,
    own: np.ndarray,
    labels: Sequence[str],
    groups: Mapping[str, Sequence[str]],
) -> dict[str, Any]:
    """The network's own decision's figures (``own``: its calibrated probabilities) and, when
    ``groups`` are declared, both decisions' figures on the groups of classes."""
    figures: dict[str, Any] = {"argmax": decision_metrics(y_true, own.argmax(axis=1), labels)}
    if groups:
        figures["groups"] = {
            name: group_metrics(y_true, probs.argmax(axis=1), labels, groups)
            for name, probs in (("served", served), ("argmax", own))
        }
    return figures


def run(
    *,
    tuned: Path,
    decision: Path,
    dataset: Path,
    out: Path,
    summary: Path,
    confusion: Path,
    calibration: Path,
    evaluate: EvaluateParams,
    model: ModelParams,
    serving: ServingParams,
    champion: Champion | Literal["registry"] | None = REGISTRY,
) -> dict[str, Any]:
    """Evaluate the ``tuned`` model on ``dataset``'s test split and decide its blessing.
    ``decision``: finetune's decision.json, to score the network's own decision beside the
    served one and report the ECE the scores had before the temperature was folded in.

    ``out`` receives predictions.csv, blessing.json and the figures; ``confusion`` (one row per
    test image) and ``calibration`` (one row per confidence bin) are DVC plots. ``champion``:
    the model to compare with (None: only the floors apply)."""
    import keras

    params = evaluate
    if champion == REGISTRY:
        champion = registry.champion(serving.model_name)
    size = backbones.image_size(model)
    labels = read_labels(dataset / LABELS)
    groups = {name: list(members) for name, members in params.class_groups.items()}
    if groups:  # before the model runs: a typo in params is an error at once
        group_index(groups, labels, "evaluate.class_groups")
    every_image = _read_manifest(dataset / MANIFEST, params.slice_by)
    manifest = {sha: row for sha, row in every_image.items() if row["split"] == "test"}
    test = read_split(dataset / SHARDS)
    missing = [s for s in test.sha256 if s not in manifest]
    if missing:
        raise InputError(
            f"{len(missing)} test shard image(s) are not test rows of "
            f"{dataset / MANIFEST} (first sha256 {missing[0]}): rerun ingest"
        )
    from imgpipe.model import ordinal, quantization  # noqa: F401 (register their layers for load_model)

    network = keras.models.load_model(tuned, compile=False)
    probs = predict_keras(network, test.encoded, size, params.batch_size)
    bins = params.calibration_bins
    candidate = classification_metrics(test.labels, probs, labels, bins)
    folded: Decision = json.loads(decision.read_text())
    fitted = float(folded["temperature"])

    def again(m: Any) -> np.ndarray:
        return predict_keras(m, test.encoded, size, params.batch_size)

    before = untempered(network, probs, fitted, again)
    candidate["ece_uncalibrated"] = expected_calibration_error(test.labels, before, bins)
    candidate["temperature"] = fitted
    candidate["objective"] = folded.get("objective", "accuracy")
    own = own_decision(network, probs, folded, again)
    rows = [manifest[s] for s in test.sha256]
    slices = slice_metrics(rows, test.labels, probs, labels, params.slice_by, bins)
    baseline, comparison = (
        against_champion(
            champion, test, probs, labels, params, {s: r["label"] for s, r in every_image.items()}
        )
        if champion
        else (None, None)
    )
    blessing = gate.bless(candidate, baseline, comparison, params)
    blessing["test_set"] = {"images": len(test.sha256), "sha256": lineage_digest(test.sha256)}
    predicted = probs.argmax(axis=1)
    reliability = calibration_bins(test.labels, probs, bins)

    with atomic_path(out) as staged:
        staged.mkdir()
        with open(staged / PREDICTIONS, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(
                [
                    "sha256",
                    "filepath",
                    "label",
                    "predicted",
                    "confidence",
                    "correct",
                    *params.slice_by,
                    *(f"p_{label}" for label in labels),
                ]
            )
            for i, row in enumerate(rows):
                writer.writerow(
                    [
                        test.sha256[i],
                        row["filepath"],
                        labels[test.labels[i]],
                        labels[predicted[i]],
                        f"{probs[i, predicted[i]]:.6f}",
                        int(predicted[i] == test.labels[i]),
                        *(row.get(c, "") for c in params.slice_by),
                        *(f"{p:.6f}" for p in probs[i]),
                    ]
                )
        write_json_atomic(staged / BLESSING, rounded(blessing, 6))
        plot_confusion(
            confusion_matrix(test.labels, predicted, len(labels)), labels, staged / CONFUSION_PNG
        )
        plot_calibration(reliability, candidate["ece"], staged / CALIBRATION_PNG)
        chosen = most_confidently_wrong(test.labels, probs, params.misclassified_examples)
        images = decoded(test.encoded, chosen, size)
        heat = grad_cam(network, images, predicted[chosen]) if len(chosen) else images[..., 0]
        plot_misclassified(test, probs, labels, chosen, images, heat, staged / MISCLASSIFIED_PNG)

    with atomic_path(confusion) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["actual", "predicted"])
        writer.writerows(
            [labels[a], labels[p]] for a, p in zip(test.labels, predicted, strict=True)
        )
    with atomic_path(calibration) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        table = csv.DictWriter(f, fieldnames=list(reliability[0]), lineterminator="\n")
        table.writeheader()
        table.writerows(rounded([r for r in reliability if r["count"]]))
    metrics = rounded(
        {
            "test": candidate,
            **decisions(test.labels, probs, own, labels, groups),
            "slices": slices,
            "blessed": blessing["blessed"],
            "champion": baseline,
            "comparison": comparison,
            "test_set": blessing["test_set"],
            "checks": [c["reason"] for c in blessing["checks"]],
        }
    )
    write_json_atomic(summary, metrics)
    return {**metrics, "blessing": blessing}


def metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Test metrics (overall, per class, per slice) and the decision, for MLflow."""
    test = summary["test"]
    keys = ("accuracy", "balanced_accuracy", "macro_f1", "ece", "ece_uncalibrated", "temperature")
    values = {f"test.{k}": test[k] for k in keys if k in test}
    for label, per_class in test["per_class"].items():
        values.update({f"test.{k}.{label}": per_class[k] for k in ("precision", "recall", "f1")})
    headline = ("accuracy", "balanced_accuracy", "macro_f1")
    if "argmax" in summary:
        values.update({f"test.argmax.{k}": summary["argmax"][k] for k in headline})
        for label, per_class in summary["argmax"]["per_class"].items():
            values[f"test.argmax.recall.{label}"] = per_class["recall"]
    for decided, m in summary.get("groups", {}).items():
        prefix = "test.groups" if decided == "served" else f"test.{decided}.groups"
        values.update({f"{prefix}.{k}": m[k] for k in headline})
    for column, groups in summary["slices"].items():
        for value, m in groups.items():
            key = "".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in value)
            values.update(
                {
                    f"test.slice.{column}.{key}.{k}": m[k]
                    for k in ("accuracy", "balanced_accuracy", "macro_f1")
                }
            )
    values["blessed"] = float(summary["blessed"])
    comparison, champion = summary.get("comparison"), summary.get("champion")
    if champion:
        gated = ("images", "excluded", "relabelled")  # relabelled: not in older summaries
        values.update({f"gate.{k}": champion[k] for k in gated if k in champion})
    if comparison and comparison["images"]:
        for metric in gate.GATED:
            values.update(
                {f"gate.{metric}.{k}": comparison[metric][k] for k in ("difference", "low", "high")}
            )
    return values


def log_to_mlflow(out: Path) -> None:
    """The decision and its reasons, the predictions and the figures."""
    import mlflow

    blessing = json.loads((out / BLESSING).read_text())
    mlflow.set_tags(
        {
            "blessed": str(blessing["blessed"]).lower(),
            "blessing": "; ".join(c["reason"] for c in blessing["checks"]),
        }
    )
    for name in (BLESSING, PREDICTIONS, CONFUSION_PNG, CALIBRATION_PNG, MISCLASSIFIED_PNG):
        mlflow.log_artifact(str(out / name), "evaluate")


def describe(summary: dict[str, Any]) -> str:
    test = summary["test"]
    verdict = "BLESSED" if summary["blessed"] else "NOT blessed"
    return (
        f"test {decision_text(summary)}, macro-F1 {test['macro_f1']:.4f}, ECE {test['ece']:.3f} "
        f"(uncalibrated {test['ece_uncalibrated']:.3f}) on {test['images']} images; "
        f"{verdict}: " + "; ".join(summary["checks"])
    )
