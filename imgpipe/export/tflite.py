"""The TFLite models export writes, runs and compares with the SavedModel.

Each takes one ``image`` (1 x size x size x 3, RGB 0-255: float32, or uint8 for the full-integer
int8 model whose output is uint8 probabilities in steps of 1/256); the int8-weights model
(dynamic-range quantization) takes and returns float32 like the float one. Parity runs over a
whole split (export: the test split, and validation): the TFLite models see the same decoded
pixels as the SavedModel.

A quantization-aware model (imgpipe.model.quantization) already computes what the integer model
will: its full-integer model takes its quantization from the model's own roundings, with no
calibration images, and it has no float32 or int8-weights form. Every file is converted from the
model's frozen graph, so none has a signature: its one input is the image, its one output the
probabilities.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imgpipe.data.tfrecords import Split
from imgpipe.evaluation.metrics import classification_metrics
from imgpipe.export.savedmodel import TFLITE_FILES, SavedModelClassifier


def write_tflite(
    model: Any,
    image_size: int,
    directory: Path,
    representative: Iterable[np.ndarray],
    int8: bool,
    int8_weights: bool,
) -> dict[str, Path]:
    """float32 and (optionally) a full-integer int8 model with uint8 input and output, and a
    model with int8 weights and float activations (dynamic-range quantization). Each is
    converted from the model's frozen graph, as a quantization-aware model's must be: one input
    (the image), one output (the probabilities), no signature."""
    import tensorflow as tf

    from imgpipe.model.quantization import is_quantized

    paths: dict[str, Path] = {}
    converter = _converter(model, image_size)
    if is_quantized(model):
        if int8:
            paths["int8"] = directory / TFLITE_FILES["int8"]
            paths["int8"].write_bytes(_quantization_aware_int8(converter()))
        return paths
    paths["float32"] = directory / TFLITE_FILES["float32"]
    paths["float32"].write_bytes(converter().convert())
    if int8:
        samples = list(representative)

        def dataset() -> Iterator[list[np.ndarray]]:
            for image in samples:
                yield [image[None].astype(np.float32)]

        calibrated = converter()
        calibrated.optimizations = [tf.lite.Optimize.DEFAULT]
        calibrated.representative_dataset = dataset
        calibrated.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        calibrated.inference_input_type = tf.uint8
        calibrated.inference_output_type = tf.uint8
        paths["int8"] = directory / TFLITE_FILES["int8"]
        paths["int8"].write_bytes(calibrated.convert())
    if int8_weights:
        weights = converter()
        weights.optimizations = [tf.lite.Optimize.DEFAULT]  # no representative data
        paths["int8_weights"] = directory / TFLITE_FILES["int8_weights"]
        paths["int8_weights"].write_bytes(weights.convert())
    return paths


def _converter(model: Any, image_size: int) -> Callable[[], Any]:
    """New TFLite converters of ``model``'s graph for one image, traced once. The converter
    reads a quantization-aware model's roundings as quantization only from a frozen graph (not
    from a SavedModel), so every model is converted from its concrete function, without the
    SavedModel a converter would otherwise write and read back (several seconds a file)."""
    import tensorflow as tf

    function = tf.function(
        lambda image: {"probabilities": model(image, training=False)},
        input_signature=[tf.TensorSpec([1, image_size, image_size, 3], tf.float32, name="image")],
    ).get_concrete_function()

    def converter() -> Any:
        made = tf.lite.TFLiteConverter.from_concrete_functions([function], model)
        made.experimental_lower_to_saved_model = False
        return made

    return converter


def _quantization_aware_int8(converter: Any) -> bytes:
    """The full-integer model of a quantization-aware model: uint8 in and out, every tensor
    quantized as the model's roundings say (``converter``: one of ``_converter``'s)."""
    import tensorflow as tf

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.uint8
    return bytes(converter.convert())


class TFLiteClassifier:
    """One TFLite model through ai-edge-litert: float RGB 0-255 images in, probabilities out,
    (de)quantising where the model is integer."""

    def __init__(self, path: Path) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path))
        self.runner: Any = None
        if "serving_default" in self.interpreter.get_signature_list():  # earlier releases' files
            self.runner = self.interpreter.get_signature_runner("serving_default")
            self.input = self.runner.get_input_details()["image"]
            self.output = self.runner.get_output_details()["probabilities"]
        else:  # export's: one input, one output, no signature
            self.interpreter.allocate_tensors()
            self.input = self.interpreter.get_input_details()[0]
            self.output = self.interpreter.get_output_details()[0]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        x = image[None]
        if self.input["dtype"] != np.float32:
            scale, zero = self.input["quantization"]
            info = np.iinfo(self.input["dtype"])
            x = np.clip(np.round(x / scale + zero), info.min, info.max)
        x = x.astype(self.input["dtype"])
        if self.runner is not None:
            y = self.runner(image=x)["probabilities"][0]
        else:
            self.interpreter.set_tensor(self.input["index"], x)
            self.interpreter.invoke()
            y = self.interpreter.get_tensor(self.output["index"])[0]
        if self.output["dtype"] != np.float32:
            scale, zero = self.output["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return y


def _decoded(encoded: Sequence[bytes], image_size: int) -> Iterator[np.ndarray]:
    """Each image's pixels, decoded and resized as in training."""
    from imgpipe.data.datasets import encoded_dataset

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
