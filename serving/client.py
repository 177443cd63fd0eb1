"""A client for TF Serving's gRPC API (the real server or the local stand-in): encoded images in,
top-k labels out. Deadlines on every call, retries with exponential backoff on UNAVAILABLE
(server starting, restarting or overloaded), and errors that say which server, model and call
failed.

    with ServingClient("127.0.0.1:8500") as client:
        outputs = client.predict_bytes([open("cell.png", "rb").read()], model="elpv_defects")
        print(top_k(outputs, k=3))
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

log = logging.getLogger(__name__)

RETRY_CODES = (grpc.StatusCode.UNAVAILABLE,)
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class ServingClientError(RuntimeError):
    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class ServingClient:
    def __init__(
        self,
        address: str,
        *,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.2,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        self.address, self.timeout, self.retries, self.backoff = address, timeout, retries, backoff
        self.channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
            ],
        )
        self.predictions = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def __enter__(self) -> ServingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def call(self, method: Any, request: Any, what: str) -> Any:
        """``method(request)`` with the deadline, retrying UNAVAILABLE with backoff."""
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=self.timeout)
            except grpc.RpcError as exc:
                code = exc.code()
                if code in RETRY_CODES and attempt < self.retries:
                    delay = self.backoff * 2**attempt
                    log.info(
                        "%s: %s from %s, retry in %.2f s", what, code.name, self.address, delay
                    )
                    time.sleep(delay)
                    continue
                raise ServingClientError(
                    f"{what} on {self.address} failed: {code.name}: {exc.details()}", code
                ) from None
        raise AssertionError("unreachable")

    @staticmethod
    def spec(request: Any, model: str, version: int | None, signature: str | None) -> None:
        request.model_spec.name = model
        if version is not None:
            request.model_spec.version.value = version
        if signature:
            request.model_spec.signature_name = signature

    def predict(
        self,
        inputs: dict[str, np.ndarray],
        *,
        model: str,
        version: int | None = None,
        signature: str = "serving_default",
    ) -> dict[str, np.ndarray]:
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        self.spec(request, model, version, signature)
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        response = self.call(self.predictions.Predict, request, f"Predict({model})")
        outputs = {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
        outputs["model_version"] = np.array(response.model_spec.version.value)
        return outputs

    def predict_bytes(
        self, images: Sequence[bytes], *, model: str, version: int | None = None
    ) -> dict[str, np.ndarray]:
        """The bytes signature on encoded images (JPEG, PNG, GIF, BMP)."""
        return self.predict(
            {"image_bytes": np.array(list(images), dtype=object)}, model=model, version=version
        )

    def metadata(self, model: str, version: int | None = None) -> Any:
        """The model's SignatureDefMap."""
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self.spec(request, model, version, None)
        response = self.call(
            self.predictions.GetModelMetadata, request, f"GetModelMetadata({model})"
        )
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signatures)
        return signatures

    def status(self, model: str, version: int | None = None) -> list[tuple[int, str]]:
        """(version, state name) of each version the server knows."""
        from tensorflow_serving.apis import get_model_status_pb2

        request = get_model_status_pb2.GetModelStatusRequest()
        self.spec(request, model, version, None)
        response = self.call(self.models.GetModelStatus, request, f"GetModelStatus({model})")
        names = get_model_status_pb2.ModelVersionStatus.State.Name
        return [(s.version, names(s.state)) for s in response.model_version_status]


def top_k(outputs: dict[str, np.ndarray], k: int) -> list[list[tuple[str, float]]]:
    """The k most likely labels per image from the bytes signature's outputs."""
    probabilities, names = outputs["probabilities"], outputs["class_names"]
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [
        [(names[i, j].decode(), float(probabilities[i, j])) for j in row]
        for i, row in enumerate(order)
    ]
