"""TensorProto <-> numpy without TensorFlow's runtime, for a client that only sends requests.

``tf.make_tensor_proto`` and ``tf.make_ndarray`` need ``import tensorflow``, which takes
seconds; the TF Serving API's messages are plain protobuf. ``apis()`` loads those messages
without running TensorFlow's package ``__init__`` (only its generated ``*_pb2`` modules), and
``to_proto`` / ``to_ndarray`` convert the dtypes a classifier's signatures use. Where
TensorFlow is already loaded, nothing is skipped.

>>> request = apis().predict_pb2.PredictRequest()
>>> to_ndarray(to_proto(np.array([[1.5, 2.0]], np.float32), request.inputs["x"])).tolist()
[[1.5, 2.0]]
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

import numpy as np

API_MODULES = (
    "predict_pb2",
    "prediction_service_pb2_grpc",
    "model_service_pb2_grpc",
    "get_model_metadata_pb2",
    "get_model_status_pb2",
)
LOG_MODULES = ("classification_pb2", "logging_pb2", "prediction_log_pb2")
"""What the request log adds: the Classify messages and TF Serving's ``PredictionLog``."""

# TensorFlow's DataType enum (tensorflow/core/framework/types.proto) for the numpy dtypes
# sent and read here; the values are the proto's, fixed by the wire format.
DT_FLOAT, DT_DOUBLE, DT_INT32, DT_UINT8, DT_STRING, DT_INT64, DT_BOOL = 1, 2, 3, 4, 7, 9, 10
_NUMPY = {
    DT_FLOAT: np.float32,
    DT_DOUBLE: np.float64,
    DT_INT32: np.int32,
    DT_UINT8: np.uint8,
    DT_INT64: np.int64,
    DT_BOOL: np.bool_,
}
_TYPED_FIELD = {  # where a TensorProto without tensor_content keeps its values
    DT_FLOAT: "float_val",
    DT_DOUBLE: "double_val",
    DT_INT32: "int_val",
    DT_UINT8: "int_val",
    DT_INT64: "int64_val",
    DT_BOOL: "bool_val",
}


def apis(names: tuple[str, ...] = API_MODULES) -> types.SimpleNamespace:
    """The TF Serving API modules (``predict_pb2``, the gRPC stubs...), loaded without running
    ``tensorflow/__init__.py``: a stand-in parent package lends its path while the generated
    modules load, then goes, so that a later ``import tensorflow`` loads the real one (which
    finds the same message modules already loaded)."""
    if "tensorflow" in sys.modules:
        return _import_apis(names)
    spec = importlib.util.find_spec("tensorflow")
    if spec is None or not spec.submodule_search_locations:
        return _import_apis(names)
    stand_in = types.ModuleType("tensorflow")
    stand_in.__path__ = list(spec.submodule_search_locations)
    sys.modules["tensorflow"] = stand_in
    try:
        return _import_apis(names)
    finally:
        if sys.modules.get("tensorflow") is stand_in:
            del sys.modules["tensorflow"]


def _import_apis(names: tuple[str, ...]) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        **{name: importlib.import_module(f"tensorflow_serving.apis.{name}") for name in names}
    )


def to_proto(value: Any, proto: Any) -> Any:
    """Fill the empty ``TensorProto`` ``proto`` (a request's ``inputs[name]``) with a numpy
    array (bytes objects for strings), as ``tf.make_tensor_proto`` makes it for these dtypes."""
    array = np.asarray(value)
    for size in array.shape:
        proto.tensor_shape.dim.add().size = size
    if array.dtype.kind in ("O", "S", "U"):
        proto.dtype = DT_STRING
        proto.string_val.extend(
            item.encode() if isinstance(item, str) else bytes(item) for item in array.reshape(-1)
        )
        return proto
    for dtype, numpy_type in _NUMPY.items():
        if array.dtype == numpy_type:
            proto.dtype = dtype
            proto.tensor_content = np.ascontiguousarray(array, numpy_type).tobytes()
            return proto
    raise ValueError(
        f"cannot send a {array.dtype} tensor: use bytes or one of "
        + ", ".join(np.dtype(t).name for t in _NUMPY.values())
    )


def to_ndarray(proto: Any) -> np.ndarray:
    """A ``TensorProto``'s values as numpy, as ``tf.make_ndarray`` reads these dtypes (strings
    as an object array of bytes)."""
    shape = [dim.size for dim in proto.tensor_shape.dim]
    if proto.dtype == DT_STRING:
        return np.array(list(proto.string_val), dtype=object).reshape(shape)
    numpy_type = _NUMPY.get(proto.dtype)
    if numpy_type is None:
        raise ValueError(f"the server answered with a tensor of DataType {proto.dtype}")
    if proto.tensor_content:
        return np.frombuffer(proto.tensor_content, numpy_type).reshape(shape).copy()
    values: np.ndarray = np.array(getattr(proto, _TYPED_FIELD[proto.dtype]), numpy_type)
    count = int(np.prod(shape)) if shape else 1
    if values.size == count:
        return values.reshape(shape)
    return np.full(shape, values[-1] if values.size else 0, numpy_type)  # TF's repeated last
