"""TF Serving's warmup file: the one home of its path and format.

A SavedModel's ``assets.extra/tf_serving_warmup_requests`` is a TFRecord file of
``tensorflow.serving.PredictionLog`` records; a server replays them before it reports the
version AVAILABLE, so the first real request does not pay for tracing and allocation. The export
writes the file (one Predict request per image on the bytes signature); the local server
(``serving/manager.py``) and the export's own check read it back.

    count = write_warmup(saved_model, "elpv_defects", [png_bytes, jpeg_bytes])
    records = read_warmup(saved_model)  # [PredictionLog, ...]
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

WARMUP = Path("assets.extra") / "tf_serving_warmup_requests"
"""Where TF Serving looks for warmup records, relative to a version's SavedModel folder."""
BYTES_SIGNATURE, BYTES_INPUT = "serving_default", "image_bytes"
"""The exported model's signature on encoded images and its input: what warmup requests and
``ServingClient.predict_bytes`` call."""


def write_warmup(saved_model: Path, model_name: str, encoded: Iterable[bytes]) -> int:
    """One PredictRequest per image on the bytes signature, as TF Serving's warmup file;
    returns how many were written."""
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    path = saved_model / WARMUP
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with tf.io.TFRecordWriter(str(path)) as writer:
        for image in encoded:
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name=BYTES_SIGNATURE)
            )
            request.inputs[BYTES_INPUT].CopyFrom(tf.make_tensor_proto([image], dtype=tf.string))
            log_record = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log_record.SerializeToString())
            count += 1
    return count


def read_warmup(saved_model: Path) -> list[Any]:
    """The warmup file's records as ``PredictionLog`` protos; FileNotFoundError without one."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = saved_model / WARMUP
    if not path.is_file():
        raise FileNotFoundError(f"no TF Serving warmup file at {path}")
    records = []
    for raw in tf.data.TFRecordDataset(str(path)):
        record = prediction_log_pb2.PredictionLog()
        record.ParseFromString(raw.numpy())
        records.append(record)
    return records
