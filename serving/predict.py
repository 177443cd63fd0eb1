"""The Predict API's request logic, shared by the gRPC server (``serving/server.py``) and the REST
API (``serving/rest.py``): resolve the model version and signature, check the inputs against the
signature's names, dtypes and shapes, run it, and turn failures into TF Serving's status codes.

    servable, signature_name, outputs = predict(manager, request.model_spec, build_inputs, [])

``build_inputs(signature_def, signature_name)`` turns the request's own encoding (TensorProtos
for gRPC, JSON for REST) into arrays, using :func:`check_input_names` and :func:`check_shape`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from serving.batching import QueueFull
from serving.manager import ModelManager, Servable, ServingError

DEFAULT_SIGNATURE = "serving_default"  # TF Serving's signature when a request names none
PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
"""TensorFlow's error codes are gRPC's, number for number."""

InputBuilder = Callable[[Any, str], dict[str, np.ndarray]]


def _dtype_name(enum: int) -> str:
    from tensorflow.core.framework import types_pb2

    return types_pb2.DataType.Name(enum)


def check_shape(name: str, shape: tuple[int, ...], info: Any) -> None:
    """INVALID_ARGUMENT unless ``shape`` fits the signature input ``info`` (a TensorInfo;
    -1 dimensions take any size)."""
    if info.tensor_shape.unknown_rank:
        return
    want = [d.size for d in info.tensor_shape.dim]
    if len(shape) != len(want) or any(w not in (-1, s) for w, s in zip(want, shape, strict=False)):
        spec = "[" + ", ".join("?" if w == -1 else str(w) for w in want) + "]"
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"input {name!r} has shape {list(shape)}, the signature expects {spec}",
        )


def check_input_names(given: Any, signature: Any, signature_name: str) -> None:
    """INVALID_ARGUMENT unless the request names exactly the signature's inputs."""
    expected, names = set(signature.inputs), set(given)
    if expected != names:
        missing, extra = sorted(expected - names), sorted(names - expected)
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"signature {signature_name!r} takes inputs {sorted(expected)}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unexpected {extra}" if extra else ""),
        )


def decode_inputs(tensors: Any, signature: Any, signature_name: str) -> dict[str, np.ndarray]:
    """Request TensorProtos -> arrays, checked against the signature's names, dtypes, shapes."""
    import tensorflow as tf

    check_input_names(tensors, signature, signature_name)
    arrays = {}
    for name, tensor in tensors.items():
        info = signature.inputs[name]
        if tensor.dtype != info.dtype:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input {name!r} has dtype {_dtype_name(tensor.dtype)}, the signature expects "
                f"{_dtype_name(info.dtype)}",
            )
        try:
            array = tf.make_ndarray(tensor)
        except Exception as exc:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT, f"input {name!r} is not a valid tensor: {exc}"
            ) from None
        check_shape(name, array.shape, info)
        arrays[name] = array
    return arrays


def find_signature(servable: Servable, name: str, method: str | None) -> Any:
    """The SignatureDef ``name`` of ``servable``; with ``method``, it must have that method."""
    signature = servable.signature_defs.get(name)
    if signature is None:
        raise ServingError(
            # TF Serving: FAILED_PRECONDITION for Predict, INVALID_ARGUMENT for Classify
            grpc.StatusCode.INVALID_ARGUMENT if method else grpc.StatusCode.FAILED_PRECONDITION,
            f"Serving signature key {name!r} not found in {servable.name} "
            f"v{servable.version} (signatures: {sorted(servable.signature_defs)})",
        )
    if method and signature.method_name != method:
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Expected {method} signature, but {name!r} has method_name {signature.method_name!r}",
        )
    return signature


def run_signature(servable: Servable, name: str, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """Run a signature; a full batch queue and TensorFlow errors become ServingErrors."""
    import tensorflow as tf

    try:
        return servable.call(name, inputs)
    except QueueFull as exc:  # as TF Serving: UNAVAILABLE, so clients back off and retry
        raise ServingError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
    except tf.errors.OpError as exc:
        raise ServingError(
            STATUS_BY_NUMBER.get(exc.error_code, grpc.StatusCode.INTERNAL), exc.message
        ) from None


def predict(
    manager: ModelManager, spec: Any, inputs: InputBuilder, output_filter: list[str]
) -> tuple[Servable, str, dict[str, np.ndarray]]:
    """The Predict API: resolve the version and signature of ``spec`` (a ModelSpec), build and
    check the inputs, run, keep the outputs ``output_filter`` names (all when empty)."""
    servable = manager.servable(spec)
    name = spec.signature_name or DEFAULT_SIGNATURE
    signature = find_signature(servable, name, None)
    arrays = inputs(signature, name)
    wanted = output_filter or list(signature.outputs)
    unknown = sorted(set(wanted) - set(signature.outputs))
    if unknown:
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"output_filter names {unknown}, not outputs of {name!r} ({sorted(signature.outputs)})",
        )
    outputs = run_signature(servable, name, arrays)
    return servable, name, {key: outputs[key] for key in wanted}
