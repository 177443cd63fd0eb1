"""A client for TF Serving's gRPC API (the real server or the local stand-in): encoded images in,
top-k labels out. One deadline per call, retries included; UNAVAILABLE (server starting,
restarting or overloaded) is retried with exponential backoff by gRPC's own retry policy (a
service config on the channel); errors say which call, server, model and status failed, and
what a failed TLS handshake means. Plaintext unless given ``TLS`` (TF Serving's
``--ssl_config_file``):

    with ServingClient("127.0.0.1:8500", timeout=10, retries=3) as client:
        outputs = client.predict_bytes([open("cell.png", "rb").read()], model="elpv_defects")
        print(top_k(outputs, k=3))

    ServingClient("serving.example:8500", tls=TLS(ca_cert=Path("ca.crt")))
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from serving.tensors import apis, to_ndarray, to_proto
from serving.transport import message_options
from serving.warmup import BYTES_INPUT, BYTES_SIGNATURE

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_RETRIES = 4
"""gRPC allows at most 5 attempts per call (A6 client retries: larger maxAttempts are cut to 5)."""
SERVICES = ("tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")


class ClientSettingsError(ValueError):
    """The client's own settings (TLS files, retries, backoff) do not go together; the message
    says which."""


class ServingClientError(RuntimeError):
    """A call failed; ``code`` is the gRPC status (None when no status came back) and
    ``details`` the server's message."""

    def __init__(
        self, message: str, code: grpc.StatusCode | None = None, details: str = ""
    ) -> None:
        super().__init__(message)
        self.code, self.details = code, details


@dataclass(frozen=True)
class TLS:
    """How to reach a server over TLS: ``ca_cert``, the CA bundle that signed its certificate
    (None: gRPC's default roots, for a certificate from a public CA); ``client_cert`` and
    ``client_key`` for a server that verifies clients (mTLS); ``server_name`` when the address
    is not a name the certificate holds."""

    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ClientSettingsError(
                "a client certificate and its key go together (mTLS: --client-cert and "
                "--client-key): give both or neither"
            )

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials; every file is read and checked here, before any call."""
        from serving.config import ConfigError, read_pem

        def read(path: Path | None, kind: str, what: str) -> bytes | None:
            if path is None:
                return None
            try:
                return read_pem(path, kind, what).encode()
            except ConfigError as exc:
                raise ServingClientError(str(exc)) from None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_cert, "certificate", "the CA certificate"),
            private_key=read(self.client_key, "key", "the client key"),
            certificate_chain=read(self.client_cert, "certificate", "the client certificate"),
        )


def explain_unavailable(details: str, tls: TLS | None) -> str:
    """What gRPC's UNAVAILABLE details mean when a TLS handshake is the cause, with the flag
    that fixes it; "" otherwise. gRPC (1.85) reports each case this way: an untrusted server
    certificate as "CERTIFICATE_VERIFY_FAILED", a name it does not hold as "Hostname
    Verification Check failed", a plaintext server to a TLS client as "WRONG_VERSION_NUMBER",
    and a TLS server closing a plaintext connection, or an mTLS server one without a trusted
    client certificate, as "Socket closed"."""
    if "CERTIFICATE_VERIFY_FAILED" in details:
        reason = details.split("CERTIFICATE_VERIFY_FAILED:")[-1].removesuffix(": OK").strip()
        return (
            f"the TLS handshake failed: the server's certificate was not verified ({reason}); "
            "pass the CA that signed it with --ca-cert"
        )
    if "Hostname Verification Check failed" in details:
        return (
            "the TLS handshake failed: the server's certificate does not name the host "
            "connected to; connect by a name it holds or pass --tls-server-name"
        )
    if "WRONG_VERSION_NUMBER" in details:
        return "the TLS handshake failed: the server did not answer in TLS (it may be plaintext)"
    if "Socket closed" not in details:
        return ""
    if tls is None:
        return "the server closed the connection: it may require TLS (pass --ca-cert or --tls)"
    if tls.client_cert is None:
        return (
            "the server closed the connection after the TLS handshake: it may require a client "
            "certificate (mTLS): pass --client-cert and --client-key"
        )
    return (
        "the server closed the connection after the TLS handshake: it may not trust the "
        f"client certificate {tls.client_cert} (signed by a CA other than its custom_ca)"
    )


def service_config(retries: int, backoff: float, max_backoff: float) -> str:
    """The channel's service config (JSON): UNAVAILABLE is retried ``retries`` times on both TF
    Serving services, waiting a random time up to ``backoff`` * 2**n seconds (at most
    ``max_backoff``) before retry n; ``retries`` 0: no retry policy."""
    method: dict[str, Any] = {"name": [{"service": service} for service in SERVICES]}
    if retries:
        method["retryPolicy"] = {
            "maxAttempts": retries + 1,
            "initialBackoff": f"{backoff:.9f}s",  # a JSON Duration
            "maxBackoff": f"{max_backoff:.9f}s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    return json.dumps({"methodConfig": [method]})


class ServingClient:
    """A channel to one server; ``timeout`` is each call's deadline in seconds (all attempts
    together) and ``retries`` how often UNAVAILABLE is retried (0 to ``MAX_RETRIES``)."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        tls: TLS | None = None,
    ) -> None:
        if not 0 <= retries <= MAX_RETRIES:
            raise ClientSettingsError(
                f"retries must be 0 to {MAX_RETRIES} (gRPC's limit), got {retries}"
            )
        if not 0 < backoff <= max_backoff:
            raise ClientSettingsError(
                f"need 0 < backoff <= max_backoff, got {backoff} and {max_backoff}"
            )
        self.address, self.timeout, self.retries, self.tls = address, timeout, retries, tls
        options = [
            *message_options(max_message_bytes),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", service_config(retries, backoff, max_backoff)),
            # a request larger than the retry buffer is never retried: make room for any
            ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
        ]
        if tls is None:
            self.channel = grpc.insecure_channel(address, options=options)
        else:
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            self.channel = grpc.secure_channel(address, tls.credentials(), options=options)
        self.apis = apis()
        self.predictions = self.apis.prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = self.apis.model_service_pb2_grpc.ModelServiceStub(self.channel)

    def __enter__(self) -> ServingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def call(self, method: Any, request: Any, what: str) -> Any:
        """``method(request)`` with the deadline; ``what`` names the call in errors."""
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
            unavailable = code == grpc.StatusCode.UNAVAILABLE
            tried = f" (retried up to {self.retries} times)" if unavailable and self.retries else ""
            meaning = explain_unavailable(details, self.tls) if unavailable else ""
            said = f"{meaning} [gRPC: {details}]" if meaning else details
            raise ServingClientError(
                f"{what} on {self.address} failed: {code.name}: {said}{tried}", code, details
            ) from None

    @staticmethod
    def spec(request: Any, model: str, version: int | None, signature: str | None) -> str:
        """Fill ``request.model_spec``; returns how errors name the call's target."""
        request.model_spec.name = model
        if version is not None:
            request.model_spec.version.value = version
        if signature:
            request.model_spec.signature_name = signature
        return f"model {model!r}" + (f" version {version}" if version is not None else "")

    def predict(
        self,
        inputs: dict[str, np.ndarray],
        *,
        model: str,
        version: int | None = None,
        signature: str = BYTES_SIGNATURE,
    ) -> dict[str, np.ndarray]:
        """Predict on ``signature``; the outputs, plus ``model_version``: the version that
        answered."""
        request = self.apis.predict_pb2.PredictRequest()
        target = self.spec(request, model, version, signature)
        for name, value in inputs.items():
            to_proto(value, request.inputs[name])
        response = self.call(self.predictions.Predict, request, f"Predict({target})")
        outputs = {k: to_ndarray(v) for k, v in response.outputs.items()}
        outputs["model_version"] = np.array(response.model_spec.version.value)
        return outputs

    def predict_bytes(
        self, images: Sequence[bytes], *, model: str, version: int | None = None
    ) -> dict[str, np.ndarray]:
        """The bytes signature on encoded images (JPEG, PNG, GIF, BMP)."""
        return self.predict(
            {BYTES_INPUT: np.array(list(images), dtype=object)}, model=model, version=version
        )

    def metadata(self, model: str, version: int | None = None) -> Any:
        """The model's SignatureDefMap."""
        get_model_metadata_pb2 = self.apis.get_model_metadata_pb2
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        target = self.spec(request, model, version, None)
        response = self.call(
            self.predictions.GetModelMetadata, request, f"GetModelMetadata({target})"
        )
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signatures)
        return signatures

    def status(self, model: str, version: int | None = None) -> list[tuple[int, str]]:
        """(version, state name) of each version the server knows."""
        get_model_status_pb2 = self.apis.get_model_status_pb2
        request = get_model_status_pb2.GetModelStatusRequest()
        target = self.spec(request, model, version, None)
        response = self.call(self.models.GetModelStatus, request, f"GetModelStatus({target})")
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
