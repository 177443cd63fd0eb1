"""The exported SavedModel: its contract (signatures, inputs, outputs, layout), shared by
export (writes it with ``write_saved_model``), evaluate (runs the champion's), push (replays its
warmup) and the tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imgpipe.core.errors import InputError

# The bytes signature and the warmup file are what a server relies on: their home is serving/.
from serving.warmup import BYTES_INPUT, BYTES_SIGNATURE, read_warmup

CANDIDATE_VERSION = 1
"""The version folder export writes; push copies it to the serving base as the next version."""
IMAGES_SIGNATURE, IMAGES_INPUT = "serving_images", "images"
OUTPUTS = ("probabilities", "class_index", "class_name", "class_names")
EMBEDDING_SIGNATURE, EMBEDDING_OUTPUT = "embedding", "embedding"
"""Encoded images in (like ``serving_default``), the backbone's pooled features out: what the
monitor compares served traffic with the reference profile on."""
CLASSIFY_SIGNATURE, CLASSIFY_INPUT = "classify", "inputs"
CLASSIFY_METHOD = "tensorflow/serving/classify"
EXAMPLE_IMAGE_KEY = "image/encoded"
"""The tf.Example feature the classify signature reads: the same key as the TFRecord shards."""
SERVING, TFLITE, CARD = "serving", "tflite", "model_card.md"
"""An export's folders: the SavedModel in TF Serving's layout, the TFLite files, the card."""
WEIGHTS = "weights.sha256"
"""Beside them, ``weights_digest`` of the SavedModel: what push registers it by, so that push
knows the champion exported again without loading TensorFlow."""
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

    def embed_bytes(self, encoded: Sequence[bytes], batch_size: int = 64) -> np.ndarray:
        """The backbone's pooled features for encoded images through ``embedding``."""
        import tensorflow as tf

        if EMBEDDING_SIGNATURE not in self.loaded.signatures:
            raise InputError(
                f"{self.path}: no {EMBEDDING_SIGNATURE!r} signature (exported before the monitor "
                "existed: export the model again)"
            )
        signature = self.loaded.signatures[EMBEDDING_SIGNATURE]
        chunks = [
            signature(**{BYTES_INPUT: tf.constant(list(encoded[i : i + batch_size]))})
            for i in range(0, len(encoded), batch_size)
        ]
        return np.concatenate([c[EMBEDDING_OUTPUT].numpy() for c in chunks])

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


def write_saved_model(
    model: Any, labels: Sequence[str], image_size: int, path: Path, max_pixels: int
) -> None:
    """The serving signatures around ``model`` (whose preprocessing is already inside it).
    Encoded images are refused before decoding when their header claims more than
    ``max_pixels`` pixels: INVALID_ARGUMENT naming the limit, from TF Serving as from here."""
    import keras
    import tensorflow as tf

    from imgpipe.data.datasets import decode_and_resize, header_pixels, resize
    from imgpipe.model.training import POOLED_LAYER

    names = tf.constant(list(labels))
    # One traced function of the network for all four signatures, giving the probabilities
    # and the pooled features together: each signature calls it instead of tracing the network
    # again (a third less time to write the SavedModel, the same graph in every signature).
    both = keras.Model(model.inputs, [model.output, model.get_layer(POOLED_LAYER).output])
    network = tf.function(
        lambda images: both(images, training=False),
        input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32)],
    )

    def classify(images: Any) -> dict[str, Any]:
        probabilities, _ = network(images)
        index = tf.argmax(probabilities, axis=1)
        return {
            "probabilities": probabilities,
            "class_index": index,
            "class_name": tf.gather(names, index),
            "class_names": tf.tile(names[None], [tf.shape(probabilities)[0], 1]),
        }

    def checked(encoded: Any) -> Any:
        within = tf.debugging.assert_less_equal(
            header_pixels(encoded),
            tf.constant(max_pixels, tf.int64),
            message=f"image refused before decoding: its header claims more pixels than "
            f"serving.max_image_pixels = {max_pixels}",
        )
        with tf.control_dependencies([within]):
            return decode_and_resize(encoded, image_size)

    def decoded(image_bytes: Any) -> Any:
        return tf.map_fn(
            checked,
            image_bytes,
            fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32),
        )

    def from_bytes(image_bytes: Any) -> dict[str, Any]:
        return classify(decoded(image_bytes))

    def embedding(image_bytes: Any) -> dict[str, Any]:
        return {EMBEDDING_OUTPUT: network(decoded(image_bytes))[1]}

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
    archive.add_endpoint(
        EMBEDDING_SIGNATURE, embedding, [tf.TensorSpec([None], tf.string, name=BYTES_INPUT)]
    )
    archive.write_out(str(path), verbose=False)
    _set_method_name(path, CLASSIFY_SIGNATURE, CLASSIFY_METHOD)


def weights_digest(saved_model: Path) -> str:
    """One sha256 of a SavedModel's weights: of each floating-point variable's dtype, shape
    and values, sorted, so that the same trained weights exported twice give the same digest (the
    checkpoint's own bytes differ from one export to the next)."""
    import hashlib

    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(Path(saved_model) / "variables" / "variables"))
    parts = []
    for name in reader.get_variable_to_shape_map():
        value = np.asarray(reader.get_tensor(name))
        if value.dtype.kind != "f":  # counters, seed generators' states, the checkpoint's own
            continue
        meta = f"{value.dtype}{value.shape}".encode()
        parts.append(hashlib.sha256(meta + np.ascontiguousarray(value).tobytes()).hexdigest())
    return hashlib.sha256("".join(sorted(parts)).encode()).hexdigest()


def read_weights_digest(export_dir: Path) -> str:
    """The ``weights_digest`` an export wrote beside its SavedModel."""
    path = Path(export_dir) / WEIGHTS
    if not path.is_file():
        raise InputError(f"{path}: no such file (exported before it existed: export again)")
    digest = path.read_text(encoding="utf-8").strip()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise InputError(f"{path}: not a sha256 hex digest: {digest[:80]!r}")
    return digest


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
