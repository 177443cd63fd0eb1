"""The exported SavedModel's contract, shared by export (writes it), evaluate (runs the
champion's), push (replays its warmup) and the tests: signatures, inputs, outputs, layout."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from imgpipe.errors import InputError

# The bytes signature and the warmup file are what a server relies on: their home is serving/.
from serving.warmup import BYTES_INPUT, BYTES_SIGNATURE, read_warmup

CANDIDATE_VERSION = 1
"""The version folder export writes; push copies it to the serving base as the next version."""
IMAGES_SIGNATURE, IMAGES_INPUT = "serving_images", "images"
OUTPUTS = ("probabilities", "class_index", "class_name", "class_names")
CLASSIFY_SIGNATURE, CLASSIFY_INPUT = "classify", "inputs"
CLASSIFY_METHOD = "tensorflow/serving/classify"
EXAMPLE_IMAGE_KEY = "image/encoded"
"""The tf.Example feature the classify signature reads: the same key as the TFRecord shards."""
SERVING, TFLITE, CARD = "serving", "tflite", "model_card.md"
"""An export's folders: the SavedModel in TF Serving's layout, the TFLite files, the card."""
TFLITE_FILES = {
    "float32": "model_float32.tflite",
    "int8": "model_int8.tflite",
    "int8_weights": "model_int8_weights.tflite",
}


def saved_model_dir(export_dir: Path, model_name: str) -> Path:
    """Where an export keeps its SavedModel: TF Serving's layout, as the candidate version."""
    return export_dir / SERVING / model_name / str(CANDIDATE_VERSION)


class SavedModelClassifier:
    """An exported SavedModel called through its signatures, as a server would."""

    def __init__(self, saved_model: Path) -> None:
        import tensorflow as tf

        self.path = Path(saved_model)
        if not (self.path / "saved_model.pb").is_file():
            raise FileNotFoundError(f"no SavedModel in {self.path}")
        self.loaded = tf.saved_model.load(str(self.path))
        missing = {BYTES_SIGNATURE, IMAGES_SIGNATURE} - set(self.loaded.signatures)
        if missing:
            raise InputError(f"{self.path}: missing signature(s) {sorted(missing)}")

    def predict_bytes(self, encoded: Sequence[bytes], batch_size: int = 64) -> np.ndarray:
        """Probabilities for encoded images through ``serving_default``."""
        import tensorflow as tf

        signature = self.loaded.signatures[BYTES_SIGNATURE]
        chunks = [
            signature(**{BYTES_INPUT: tf.constant(list(encoded[i : i + batch_size]))})
            for i in range(0, len(encoded), batch_size)
        ]
        return np.concatenate([c["probabilities"].numpy() for c in chunks])

    def class_names(self, encoded: bytes) -> list[str] | None:
        """The label of each probability column (None for models exported before the
        ``class_names`` output existed)."""
        import tensorflow as tf

        outputs = self.loaded.signatures[BYTES_SIGNATURE](**{BYTES_INPUT: tf.constant([encoded])})
        if "class_names" not in outputs:
            return None
        return [name.decode() for name in outputs["class_names"].numpy()[0]]

    def predict_images(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """All outputs for a uint8 batch through ``serving_images``."""
        import tensorflow as tf

        outputs = self.loaded.signatures[IMAGES_SIGNATURE](
            **{IMAGES_INPUT: tf.constant(images, tf.uint8)}
        )
        return {k: v.numpy() for k, v in outputs.items()}


def run_warmup(served: SavedModelClassifier) -> int:
    """Send every warmup request to the SavedModel as TF Serving would; fail on any error."""
    import tensorflow as tf

    loaded = served.loaded
    records = read_warmup(served.path)
    for index, record in enumerate(records):
        request = record.predict_log.request
        name = request.model_spec.signature_name or BYTES_SIGNATURE
        if name not in loaded.signatures:
            raise InputError(f"warmup request {index} names unknown signature {name!r}")
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        outputs = loaded.signatures[name](**inputs)
        if set(outputs) != set(OUTPUTS):
            raise InputError(f"warmup request {index}: outputs {sorted(outputs)}")
    return len(records)
