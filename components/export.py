"""export: the fine-tuned model as a TF Serving SavedModel, TFLite float32 and int8, a parity
report and a model card.

The SavedModel (TF Serving layout ``serving/<model_name>/1/``) carries the whole inference path
in its graph, so clients send what they have:

- ``serving_default``: ``image_bytes``, a batch of encoded images (JPEG, PNG, GIF, BMP), decoded
  and resized exactly as in training (``imgpipe.datasets.decode_and_resize``);
- ``serving_images``: ``images``, a batch of uint8 RGB tensors of any size, resized the same way.

Both return ``probabilities`` (float32, one column per class), ``class_index`` (int64),
``class_name`` (string) and ``class_names`` (string, the label of every column, per image, so
clients can name the top k). A third signature, ``classify`` (method
``tensorflow/serving/classify``), serves TF Serving's Classify API: serialized ``tf.Example``
protos with the encoded image under ``image/encoded`` in, ``classes`` and ``scores`` out.
``assets.extra/tf_serving_warmup_requests`` holds real validation images as TF Serving
``PredictionLog`` records, so a server can warm the model before it reports AVAILABLE.

The TFLite models take one ``image`` (1 x size x size x 3, RGB 0-255: float32, or uint8 for the
full-integer int8 model whose output is uint8 probabilities in steps of 1/256); the int8-weights
model (dynamic-range quantization) takes and returns float32 like the float one. Parity runs over
the whole test split: the TFLite models see the same decoded pixels as the SavedModel.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imgpipe import backbones
from imgpipe.fileio import atomic_path, write_json_atomic
from imgpipe.labels import read_labels
from imgpipe.lineage import TRAINED_ON, TRAINING_SPLITS, manifest_labels, write_trained_on
from imgpipe.manifest import LABELS, MANIFEST, SHARDS
from imgpipe.metrics import classification_metrics, rounded
from imgpipe.params import ExportParams, ModelParams, ServingParams
from imgpipe.savedmodel import (
    BYTES_INPUT,
    BYTES_SIGNATURE,
    CARD,
    CLASSIFY_INPUT,
    CLASSIFY_METHOD,
    CLASSIFY_SIGNATURE,
    EXAMPLE_IMAGE_KEY,
    IMAGES_INPUT,
    IMAGES_SIGNATURE,
    TFLITE,
    TFLITE_FILES,
    SavedModelClassifier,
    run_warmup,
    saved_model_dir,
)
from imgpipe.tfrecords import Split, read_split, split_files
from serving.warmup import write_warmup

log = logging.getLogger(__name__)

# --- the SavedModel ------------------------------------------------------------------------


def write_saved_model(model: Any, labels: Sequence[str], image_size: int, path: Path) -> None:
    """The serving signatures around ``model`` (whose preprocessing is already inside it)."""
    import keras
    import tensorflow as tf

    from imgpipe.datasets import decode_and_resize, resize

    names = tf.constant(list(labels))

    def classify(images: Any) -> dict[str, Any]:
        probabilities = model(images, training=False)
        index = tf.argmax(probabilities, axis=1)
        return {
            "probabilities": probabilities,
            "class_index": index,
            "class_name": tf.gather(names, index),
            "class_names": tf.tile(names[None], [tf.shape(probabilities)[0], 1]),
        }

    def from_bytes(image_bytes: Any) -> dict[str, Any]:
        images = tf.map_fn(
            lambda encoded: decode_and_resize(encoded, image_size),
            image_bytes,
            fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32),
        )
        return classify(images)

    def from_images(images: Any) -> dict[str, Any]:
        return classify(resize(images, image_size))

    def from_examples(inputs: Any) -> dict[str, Any]:
        features = tf.io.parse_example(
            inputs, {EXAMPLE_IMAGE_KEY: tf.io.FixedLenFeature([], tf.string)}
        )
        outputs = from_bytes(features[EXAMPLE_IMAGE_KEY])
        return {"classes": outputs["class_names"], "scores": outputs["probabilities"]}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        BYTES_SIGNATURE, from_bytes, [tf.TensorSpec([None], tf.string, name=BYTES_INPUT)]
    )
    archive.add_endpoint(
        IMAGES_SIGNATURE,
        from_images,
        [tf.TensorSpec([None, None, None, 3], tf.uint8, name=IMAGES_INPUT)],
    )
    archive.add_endpoint(
        CLASSIFY_SIGNATURE, from_examples, [tf.TensorSpec([None], tf.string, name=CLASSIFY_INPUT)]
    )
    archive.write_out(str(path), verbose=False)
    _set_method_name(path, CLASSIFY_SIGNATURE, CLASSIFY_METHOD)


def _set_method_name(path: Path, signature: str, method: str) -> None:
    """Mark one signature with a TF Serving method name (Keras exports every signature as
    predict). TF Serving's Classify API only runs signatures marked classify."""
    from tensorflow.core.protobuf import saved_model_pb2

    pb = Path(path) / "saved_model.pb"
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString(pb.read_bytes())
    for graph in saved.meta_graphs:
        graph.signature_def[signature].method_name = method
    pb.write_bytes(saved.SerializeToString(deterministic=True))
    # fingerprint.pb hashes saved_model.pb: recompute it so it describes the edited graph.
    from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting

    (Path(path) / "fingerprint.pb").write_bytes(fingerprinting.CreateFingerprintDef(str(path)))


# --- TFLite ----------------------------------------------------------------------------------


def write_tflite(
    model: Any,
    image_size: int,
    directory: Path,
    representative: Iterable[np.ndarray],
    int8: bool,
    int8_weights: bool,
) -> dict[str, Path]:
    """float32 and (optionally) a full-integer int8 model with uint8 input and output, and a
    model with int8 weights and float activations (dynamic-range quantization)."""
    import keras
    import tensorflow as tf

    paths: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="imgpipe-tflite-") as tmp:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(
            "serving_default",
            lambda image: {"probabilities": model(image, training=False)},
            [tf.TensorSpec([1, image_size, image_size, 3], tf.float32, name="image")],
        )
        archive.write_out(tmp, verbose=False)

        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        paths["float32"] = directory / TFLITE_FILES["float32"]
        paths["float32"].write_bytes(converter.convert())
        if int8:
            samples = list(representative)

            def dataset() -> Iterator[dict[str, np.ndarray]]:
                for image in samples:
                    yield {"image": image[None].astype(np.float32)}

            converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = dataset
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.uint8
            converter.inference_output_type = tf.uint8
            paths["int8"] = directory / TFLITE_FILES["int8"]
            paths["int8"].write_bytes(converter.convert())
        if int8_weights:
            converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
            converter.optimizations = [tf.lite.Optimize.DEFAULT]  # no representative data
            paths["int8_weights"] = directory / TFLITE_FILES["int8_weights"]
            paths["int8_weights"].write_bytes(converter.convert())
    return paths


class TFLiteClassifier:
    """One TFLite model through ai-edge-litert: float RGB 0-255 images in, probabilities out,
    (de)quantising where the model is integer."""

    def __init__(self, path: Path) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.runner = Interpreter(model_path=str(path)).get_signature_runner("serving_default")
        self.input = self.runner.get_input_details()["image"]
        self.output = self.runner.get_output_details()["probabilities"]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        x = image[None]
        if self.input["dtype"] != np.float32:
            scale, zero = self.input["quantization"]
            info = np.iinfo(self.input["dtype"])
            x = np.clip(np.round(x / scale + zero), info.min, info.max)
        y = self.runner(image=x.astype(self.input["dtype"]))["probabilities"][0]
        if self.output["dtype"] != np.float32:
            scale, zero = self.output["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return y


# --- parity and the model card ---------------------------------------------------------------


def _decoded(encoded: Sequence[bytes], image_size: int) -> Iterator[np.ndarray]:
    """Each image's pixels, decoded and resized as in training."""
    from imgpipe.datasets import encoded_dataset

    for batch in encoded_dataset(encoded, image_size, 1):
        yield batch.numpy()[0]


def parity(
    served: SavedModelClassifier,
    tflite: dict[str, Path],
    test: Split,
    labels: Sequence[str],
    image_size: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Top-1 agreement of each TFLite model with the SavedModel over the whole test split, and
    the accuracy of each."""
    from tqdm import tqdm

    examples = list(_decoded(test.encoded, image_size))
    y_true = test.labels
    started = time.perf_counter()
    reference = served.predict_bytes(test.encoded)
    seconds = {"saved_model": time.perf_counter() - started}
    report: dict[str, Any] = {
        "images": len(examples),
        "saved_model": {
            "accuracy": classification_metrics(y_true, reference, labels)["accuracy"],
            "ms_per_image_batched": 1000 * seconds["saved_model"] / max(1, len(examples)),
        },
    }
    for kind, path in tflite.items():
        classifier = TFLiteClassifier(path)
        started = time.perf_counter()
        probs = np.stack(
            [
                classifier(image)
                for image in tqdm(examples, desc=f"parity {kind}", unit="img", disable=not progress)
            ]
        )
        elapsed = time.perf_counter() - started
        report[f"tflite_{kind}"] = {
            "top1_agreement": float(np.mean(probs.argmax(1) == reference.argmax(1))),
            "accuracy": classification_metrics(y_true, probs, labels)["accuracy"],
            "max_abs_probability_diff": float(np.abs(probs - reference).max()),
            "ms_per_image": 1000 * elapsed / max(1, len(examples)),
        }
    return report


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


def model_card(
    model_name: str,
    model_params: ModelParams,
    image_size: int,
    labels: Sequence[str],
    evaluation: dict[str, Any],
    report: dict[str, Any],
    params: ExportParams,
) -> str:
    """The model card: what the model is, the data and its licence, test metrics, slices,
    deployment artifacts and their parity, and the limits a user must know."""
    test = evaluation["test"]
    lines = [
        f"# Model card: {model_name}",
        "",
        "## Model",
        f"- {model_params.backbone} backbone ({model_params.weights or 'random'} weights), "
        f"{image_size} px input, fine-tuned; classes: {', '.join(labels)}.",
        "- Preprocessing is inside the model: send encoded images (`serving_default`, input "
        f"`{BYTES_INPUT}`) or uint8 RGB tensors of any size (`{IMAGES_SIGNATURE}`).",
        "",
        "## Data",
        f"- {params.data_description or 'not described (set export.data_description)'}",
        f"- Licence: {params.data_licence}.",
        f"- Test split: {test['images']} images, never used for training or model selection.",
        "",
        "## Test metrics",
        "| metric | value |",
        "|---|---|",
        *(
            f"| {m.replace('_', ' ')} | {test[m]:.4f} |"
            for m in ("accuracy", "balanced_accuracy", "macro_f1", "ece")
        ),
        "",
        "| class | precision | recall | F1 | images |",
        "|---|---|---|---|---|",
        *(
            f"| {label} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | "
            f"{c['support']} |"
            for label, c in test["per_class"].items()
        ),
    ]
    if evaluation.get("slices"):
        lines += [
            "",
            "## Slices",
            "| slice | images | accuracy | balanced accuracy | macro-F1 |",
            "|---|---|---|---|---|",
        ]
        for column, values in evaluation["slices"].items():
            for value, m in values.items():
                lines.append(
                    f"| {column} = {value} | {m['images']} | {m['accuracy']:.4f} | "
                    f"{m['balanced_accuracy']:.4f} | {m['macro_f1']:.4f} |"
                )
    lines += [
        "",
        "## Artifacts and parity (whole test split)",
        "| artifact | size (MB) | accuracy | top-1 agreement with SavedModel |",
        "|---|---|---|---|",
        f"| SavedModel | {report['sizes_mb']['saved_model']:.1f} | "
        f"{report['parity']['saved_model']['accuracy']:.4f} | - |",
    ]
    for kind in TFLITE_FILES:
        if f"tflite_{kind}" in report["parity"]:
            p = report["parity"][f"tflite_{kind}"]
            lines.append(
                f"| TFLite {kind} | {report['sizes_mb'][f'tflite_{kind}']:.1f} | "
                f"{p['accuracy']:.4f} | {p['top1_agreement']:.4f} |"
            )
    weak = [label for label, c in test["per_class"].items() if c["recall"] < 0.5]
    lines += [
        "",
        "## Limits",
        f"- Trained and tested on one data set; expect lower accuracy on images from other "
        f"cameras, resolutions or {', '.join(evaluation.get('slices', {})) or 'sources'}.",
    ]
    if weak:
        lines.append(
            f"- Classes recognised less than half the time on the test split: {', '.join(weak)}."
        )
    lines.append(
        f"- Expected calibration error {test['ece']:.3f}: treat probabilities as scores, not "
        "as calibrated likelihoods, unless this is small."
    )
    if "tflite_int8" in report["parity"]:
        lines.append(
            "- The full-integer int8 TFLite model outputs probabilities in steps of 1/256; "
            "its quantized activations can flip the top-1 class of images the float model "
            "scores with a small margin (see its agreement above)."
        )
    return "\n".join(lines) + "\n"


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
    progress: bool = True,
) -> dict[str, Any]:
    """Export the ``tuned`` model into ``out``: serving/<model_name>/1/ (SavedModel), tflite/
    (models + labels.txt), trained_on.txt (the images it trained and was tuned on) and
    model_card.md (with the test metrics of ``evaluation``). Returns
    the parity and sizes report also written to ``summary``."""
    import keras

    from imgpipe.datasets import image_dataset

    params, model_params = export, model
    size = backbones.image_size(model_params)
    labels = read_labels(dataset / LABELS)
    shards = dataset / SHARDS
    from imgpipe import ordinal  # noqa: F401 (registers the ordinal head for load_model)

    network = keras.models.load_model(tuned, compile=False)
    started = time.perf_counter()
    with atomic_path(out) as staged:
        saved_model = saved_model_dir(staged, serving.model_name)
        saved_model.parent.mkdir(parents=True)
        write_saved_model(network, labels, size, saved_model)
        warmup = read_split(shards, "val", params.warmup_images).encoded
        warmups = write_warmup(saved_model, serving.model_name, warmup)
        served = SavedModelClassifier(saved_model)
        run_warmup(served)

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


def metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Sizes and the parity report, for MLflow."""
    return {
        **{f"export.size_mb.{k}": v for k, v in summary["sizes_mb"].items()},
        **{
            f"parity.{kind}.{k}": v
            for kind, values in summary["parity"].items()
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
