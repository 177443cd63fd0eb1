"""export: the fine-tuned model as a TF Serving SavedModel, TFLite float32 and int8, a parity
report and a model card.

The SavedModel (TF Serving layout ``serving/<model_name>/1/``) carries the whole inference path
in its graph, so clients send what they have:

- ``serving_default``: ``image_bytes``, a batch of encoded images (JPEG, PNG, GIF, BMP), decoded
  and resized exactly as in training (``imgpipe.data.datasets.decode_and_resize``);
- ``serving_images``: ``images``, a batch of uint8 RGB tensors of any size, resized the same way.

Both return ``probabilities`` (float32, one column per class), ``class_index`` (int64),
``class_name`` (string) and ``class_names`` (string, the label of every column, per image, so
clients can name the top k). A third signature, ``classify`` (method
``tensorflow/serving/classify``), serves TF Serving's Classify API: serialized ``tf.Example``
protos with the encoded image under ``image/encoded`` in, ``classes`` and ``scores`` out.
``assets.extra/tf_serving_warmup_requests`` holds real validation images as TF Serving
``PredictionLog`` records, so a server can warm the model before it reports AVAILABLE; export
replays them against the SavedModel it wrote and fails on any error, so that push, which
trusts its input folder, never registers a version a server would refuse. An
``embedding`` signature (encoded images in, the backbone's pooled features out) and
``assets.extra/reference_profile.npz`` (``imgpipe.monitoring.reference``: a sample of validation
images as this version sees them) are what ``imgpipe monitor`` compares served traffic with.

The SavedModel's signatures are written by ``imgpipe.export.savedmodel``, the TFLite models and
their parity with it by ``imgpipe.export.tflite``, the model card by ``imgpipe.export.model_card``:
this stage puts them together, atomically, in one folder.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from imgpipe.core.fileio import atomic_path, write_json_atomic
from imgpipe.core.params import ExportParams, ModelParams, MonitorParams, ServingParams
from imgpipe.data.labels import read_labels
from imgpipe.data.lineage import TRAINED_ON, TRAINING_SPLITS, manifest_labels, write_trained_on
from imgpipe.data.manifest import LABELS, MANIFEST, SHARDS
from imgpipe.data.tfrecords import read_split, split_files
from imgpipe.evaluation.metrics import rounded
from imgpipe.export.model_card import model_card
from imgpipe.export.savedmodel import (
    CARD,
    TFLITE,
    TFLITE_FILES,
    WEIGHTS,
    SavedModelClassifier,
    run_warmup,
    saved_model_dir,
    weights_digest,
    write_saved_model,
)
from imgpipe.export.tflite import parity, write_tflite
from imgpipe.model import backbones
from imgpipe.monitoring.reference import build_reference, write_reference
from serving.warmup import write_warmup

log = logging.getLogger(__name__)


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


def run(
    *,
    tuned: Path,
    dataset: Path,
    evaluation: Path,
    out: Path,
    summary: Path,
    export: ExportParams,
    model: ModelParams,
    serving: ServingParams,
    monitor: MonitorParams,
    progress: bool = True,
) -> dict[str, Any]:
    """Export the ``tuned`` model into ``out``: serving/<model_name>/1/ (SavedModel), tflite/
    (models + labels.txt), trained_on.txt (the images it trained and was tuned on),
    weights.sha256 (what push registers the weights by), the
    reference profile of ``monitor.reference_images`` validation images, and model_card.md
    (with the test metrics of ``evaluation``). Returns
    the parity and sizes report also written to ``summary``."""
    import keras

    from imgpipe.data.datasets import image_dataset

    params, model_params = export, model
    size = backbones.image_size(model_params)
    labels = read_labels(dataset / LABELS)
    shards = dataset / SHARDS
    from imgpipe.model import ordinal, quantization  # noqa: F401 (register their layers for load_model)

    network = keras.models.load_model(tuned, compile=False)
    started = time.perf_counter()
    with atomic_path(out) as staged:
        saved_model = saved_model_dir(staged, serving.model_name)
        saved_model.parent.mkdir(parents=True)
        write_saved_model(network, labels, size, saved_model, serving.max_image_pixels)
        (staged / WEIGHTS).write_text(weights_digest(saved_model) + "\n", encoding="utf-8")
        validation = read_split(shards, "val")  # the warmup, the reference profile, parity
        warmups = write_warmup(
            saved_model, serving.model_name, validation.encoded[: params.warmup_images]
        )
        served = SavedModelClassifier(saved_model)
        run_warmup(served)
        sample = np.random.default_rng(0).permutation(len(validation.encoded))
        sample = np.sort(sample[: monitor.reference_images])
        write_reference(
            build_reference(
                served, [validation.encoded[i] for i in sample], monitor.embedding_dims
            ),
            saved_model,
        )

        trained_on = manifest_labels(dataset / MANIFEST, TRAINING_SPLITS)
        write_trained_on(staged / TRAINED_ON, trained_on)
        (staged / TFLITE).mkdir()
        shutil.copyfile(dataset / LABELS, staged / TFLITE / LABELS)
        representative = (
            image.numpy()[0]
            for image, _ in image_dataset(
                split_files(shards, "train"), size, 1, shuffle_seed=0
            ).take(params.representative_images)
        )
        tflite = write_tflite(
            network, size, staged / TFLITE, representative, params.int8, params.int8_weights
        )
        export_seconds = time.perf_counter() - started

        report = {
            "model_name": serving.model_name,
            "image_size": size,
            "warmup_requests": warmups,
            "export_seconds": export_seconds,
            "sizes_mb": {
                "saved_model": _size_mb(saved_model),
                **{f"tflite_{kind}": _size_mb(path) for kind, path in tflite.items()},
            },
            "parity": parity(served, tflite, read_split(shards), labels, size, progress),
            # The same on validation: what a recipe (post-training or quantization-aware
            # int8) is chosen on; the test split's figures above only report.
            "parity_validation": parity(served, tflite, validation, labels, size, progress),
        }
        evaluation_metrics = json.loads(Path(evaluation).read_text())
        (staged / CARD).write_text(
            model_card(
                serving.model_name,
                model_params,
                size,
                labels,
                evaluation_metrics,
                report,
                params,
            ),
            encoding="utf-8",
        )
    report = rounded(report, 6)
    write_json_atomic(summary, report)
    return report


PARITY_METRICS = (("parity", "parity"), ("parity_validation", "parity.validation"))
"""The report's parity sections and their MLflow metric prefixes."""


def metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Sizes and the parity report, for MLflow."""
    return {
        **{f"export.size_mb.{k}": v for k, v in summary["sizes_mb"].items()},
        **{  # the test split's as parity.<model>.*, validation's as parity.validation.<model>.*
            f"{prefix}.{kind}.{k}": v
            for section, prefix in PARITY_METRICS
            for kind, values in summary.get(section, {}).items()
            if isinstance(values, dict)
            for k, v in values.items()
        },
    }


def log_to_mlflow(out: Path, summary: Path) -> None:
    import mlflow

    mlflow.log_artifact(str(summary), "export")
    mlflow.log_artifact(str(out / CARD), "export")


def describe(summary: dict[str, Any]) -> str:
    sizes, parity = summary["sizes_mb"], summary["parity"]
    lines = [f"SavedModel {sizes['saved_model']:.1f} MB ({summary['model_name']})"]
    for kind in TFLITE_FILES:
        if f"tflite_{kind}" in parity:
            p = parity[f"tflite_{kind}"]
            lines.append(
                f"TFLite {kind} {sizes[f'tflite_{kind}']:.1f} MB, top-1 agreement "
                f"{p['top1_agreement']:.4f}, accuracy {p['accuracy']:.4f} "
                f"(SavedModel {parity['saved_model']['accuracy']:.4f}) on {parity['images']} images"
            )
    return "; ".join(lines)
