"""The gRPC client's retry policy against a server that answers UNAVAILABLE a few times (a
plain gRPC server on 127.0.0.1 with TF Serving's service, no model behind it)."""

from __future__ import annotations

import os
import threading

import grpc
import numpy as np
import pytest


def _flaky_server(failures: int):
    """A gRPC server on 127.0.0.1 whose Predict answers UNAVAILABLE ``failures`` times, then
    succeeds; returns it, its address and its servicer (``calls``: attempts that reached it)."""
    from concurrent import futures

    from serving.tensors import apis, to_proto

    api = apis()
    predict_pb2, prediction_service_pb2_grpc = api.predict_pb2, api.prediction_service_pb2_grpc

    class Flaky(prediction_service_pb2_grpc.PredictionServiceServicer):
        def __init__(self) -> None:
            self.calls, self.lock = 0, threading.Lock()

        def Predict(self, request, context):
            with self.lock:
                self.calls += 1
                attempt = self.calls
            if attempt <= failures:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"attempt {attempt}: warming up")
            response = predict_pb2.PredictResponse()
            response.model_spec.name = request.model_spec.name
            response.model_spec.version.value = 7
            to_proto(np.array([[0.25, 0.75]], np.float32), response.outputs["probabilities"])
            return response

    servicer = Flaky()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    return server, address, servicer


@pytest.mark.parametrize(("failures", "retries"), [(2, 2), (2, 4), (2, 1), (1, 0)])
def test_client_retries_unavailable_with_grpc_retry_policy(failures, retries):
    """Guards the client's retry policy: a server that answers UNAVAILABLE ``failures`` times
    is retried by gRPC itself; with enough retries the call succeeds on attempt failures + 1,
    with too few it fails after exactly retries + 1 attempts, naming the call, server, model
    and status. The request (300 KB) is larger than gRPC's default per-call retry buffer
    (256 KiB), past which a call would not be retried at all."""
    from serving.client import ServingClient, ServingClientError

    server, address, servicer = _flaky_server(failures)
    image = os.urandom(300_000)
    try:
        with ServingClient(address, timeout=30, retries=retries, backoff=0.01) as client:
            if retries >= failures:
                out = client.predict_bytes([image], model="flaky")
                assert int(out["model_version"]) == 7
                assert servicer.calls == failures + 1
            else:
                with pytest.raises(ServingClientError) as info:
                    client.predict_bytes([image], model="flaky")
                assert info.value.code == grpc.StatusCode.UNAVAILABLE
                assert servicer.calls == retries + 1
                assert str(info.value).startswith(
                    f"Predict(model 'flaky') on {address} failed: UNAVAILABLE: "
                    f"attempt {retries + 1}: warming up"
                ), str(info.value)
    finally:
        server.stop(None)


def test_client_refuses_more_retries_than_grpc_allows():
    from serving.client import MAX_RETRIES, ServingClient

    with pytest.raises(ValueError, match=r"retries must be 0 to 4 \(gRPC's limit\), got 5"):
        ServingClient("127.0.0.1:1", retries=MAX_RETRIES + 1)
