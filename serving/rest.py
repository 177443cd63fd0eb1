"""TF Serving's REST API on the local server (the ``--rest_api_port``):

- ``POST /v1/models/<name>[/versions/<N> | /labels/<L>]:predict`` with ``{"signature_name": ...,
  "instances": [...]}`` (row format) or ``{"inputs": ...}`` (columnar format); binary strings
  as ``{"b64": "..."}``; answers ``{"predictions": [...]}`` or ``{"outputs": ...}``;
- ``GET /v1/models/<name>[/versions/<N>]``: version status; ``.../metadata``: signatures;
- the Prometheus path of ``--monitoring_config_file``.

Errors answer ``{"error": "..."}`` with 400 (bad request), 404 (unknown model or version),
413 (body over the message cap), 429 (batch queue full) or 500.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import numpy as np

from serving.manager import ServingError

PATH = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<suffix>:predict|/metadata)?$"
)
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.UNIMPLEMENTED: 501,
}


def _bad(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _strings(value: Any, where: str) -> Any:
    """JSON values of a DT_STRING input -> bytes: ``{"b64": ...}`` decoded, text as UTF-8."""
    if isinstance(value, list):
        return [_strings(v, where) for v in value]
    if isinstance(value, dict):
        if set(value) != {"b64"} or not isinstance(value["b64"], str):
            raise _bad(f'{where}: a binary value must be {{"b64": "..."}}, got {value}')
        try:
            return base64.b64decode(value["b64"], validate=True)
        except ValueError:
            raise _bad(f"{where}: the b64 value is not valid base64") from None
    if isinstance(value, str):
        return value.encode()
    raise _bad(f'{where}: expected a string or {{"b64": ...}}, got {type(value).__name__}')


def _array(value: Any, info: Any, where: str) -> np.ndarray:
    import tensorflow as tf

    dtype = tf.dtypes.as_dtype(info.dtype)
    try:
        if dtype == tf.string:
            return np.array(_strings(value, where), dtype=object)
        array = np.array(value)
        if array.dtype == object or not (
            np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_
        ):
            raise ValueError("not a rectangular array of numbers")
        cast = array.astype(dtype.as_numpy_dtype)
        if not np.array_equal(cast.astype(np.float64), array.astype(np.float64)):
            raise ValueError("values out of range or not whole numbers for this type")
        return cast
    except (ValueError, TypeError) as exc:
        raise _bad(f"{where} cannot be read as {dtype.name}: {exc}") from None


def json_inputs(body: dict[str, Any]) -> Any:
    """``predict()``'s input builder for a REST body, checked like a gRPC request."""
    from serving.server import _check_shape, check_input_names

    has_rows, has_columns = "instances" in body, "inputs" in body
    if has_rows == has_columns:
        raise _bad("the request body needs exactly one of 'instances' (rows) or 'inputs' (columns)")

    def build(signature: Any, name: str) -> dict[str, np.ndarray]:
        inputs = dict(signature.inputs)
        single = next(iter(inputs)) if len(inputs) == 1 else None
        if has_rows:
            rows = body["instances"]
            if not isinstance(rows, list) or not rows:
                raise _bad("'instances' must be a non-empty list")
            named = all(isinstance(r, dict) and set(r) != {"b64"} for r in rows)
            if named:
                columns = {key: [r.get(key) for r in rows] for key in rows[0]}
                if any(set(r) != set(rows[0]) for r in rows):
                    raise _bad("every instance must name the same inputs")
            elif single:
                columns = {single: rows}
            else:
                raise _bad(
                    f"signature {name!r} has inputs {sorted(inputs)}: name them per instance"
                )
        else:
            value = body["inputs"]
            named = isinstance(value, dict) and set(value) != {"b64"}
            columns = value if named else ({single: value} if single else None)
            if columns is None:
                raise _bad(f"signature {name!r} has inputs {sorted(inputs)}: name them")
        check_input_names(columns, signature, name)
        arrays = {}
        for key, value in columns.items():
            arrays[key] = _array(value, inputs[key], f"input {key!r}")
            _check_shape(key, arrays[key].shape, inputs[key])
        return arrays

    return build


def _json_value(value: np.ndarray, name: str) -> Any:
    if value.dtype == object:

        def text(item: bytes) -> Any:
            if name.endswith("_bytes"):
                return {"b64": base64.b64encode(item).decode()}
            try:
                return item.decode()
            except UnicodeDecodeError:
                return {"b64": base64.b64encode(item).decode()}

        return np.vectorize(text, otypes=[object])(value).tolist() if value.size else []
    return value.tolist()


class RestHandler(BaseHTTPRequestHandler):
    server: Any  # RestServer

    def _send(self, status: int, payload: Any, content_type: str = "application/json") -> None:
        body = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, error: ServingError) -> None:
        self._send(HTTP_STATUS.get(error.code, 500), {"error": error.message})

    def _spec(self, match: re.Match[str]) -> Any:
        from tensorflow_serving.apis import model_pb2

        spec = model_pb2.ModelSpec(name=match["name"])
        if match["version"]:
            spec.version.value = int(match["version"])
        if match["label"]:
            spec.version_label = match["label"]
        return spec

    def do_GET(self) -> None:
        if self.path == self.server.prometheus_path:
            self._send(200, self.server.metrics.prometheus(), "text/plain; version=0.0.4")
            return
        match = PATH.match(self.path)
        if not match or match["suffix"] == ":predict":
            self._send(404, {"error": f"no such resource: GET {self.path}"})
            return
        try:
            if match["suffix"] == "/metadata":
                self._send(200, self._metadata(self._spec(match)))
            else:
                self._send(200, self._status(self._spec(match)))
        except ServingError as error:
            self._error(error)

    def _status(self, spec: Any) -> dict[str, Any]:
        from tensorflow_serving.apis import get_model_status_pb2

        names = get_model_status_pb2.ModelVersionStatus.State.Name
        states = list(self.server.manager.states(spec.name))
        if spec.HasField("version"):
            states = [(v, s) for v, s in states if v == spec.version.value]
            if not states:
                raise ServingError(
                    grpc.StatusCode.NOT_FOUND,
                    f"Could not find version {spec.version.value} of model {spec.name!r}",
                )
        return {
            "model_version_status": [
                {
                    "version": str(v),
                    "state": names(s.state),
                    "status": {
                        "error_code": "OK" if not s.error else "UNKNOWN",
                        "error_message": s.error,
                    },
                }
                for v, s in states
            ]
        }

    def _metadata(self, spec: Any) -> dict[str, Any]:
        from google.protobuf import json_format
        from tensorflow_serving.apis import get_model_metadata_pb2

        servable = self.server.manager.servable(spec)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        for key, value in servable.signature_defs.items():
            signatures.signature_def[key].CopyFrom(value)
        return {
            "model_spec": {"name": servable.name, "version": str(servable.version)},
            "metadata": {"signature_def": json_format.MessageToDict(signatures)},
        }

    def do_POST(self) -> None:
        match = PATH.match(self.path)
        if not match or match["suffix"] != ":predict":
            self._send(404, {"error": f"no such resource: POST {self.path}"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self._send(400, {"error": "Content-Length is not a number"})
            return
        if length > self.server.max_bytes:
            self._send(413, {"error": f"request body {length} bytes over {self.server.max_bytes}"})
            return
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            self._predict(match, length)
        except ServingError as error:
            code = error.code
            self._error(error)
        except Exception as exc:  # a bug: answer 500 with the reason, count it
            code = grpc.StatusCode.INTERNAL
            self._send(500, {"error": f"predict failed: {type(exc).__name__}: {exc}"})
        finally:
            self.server.metrics.record(
                "RestPredict", match["name"], code, time.perf_counter() - started
            )

    def _predict(self, match: re.Match[str], length: int) -> None:
        from serving.server import predict

        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except json.JSONDecodeError as exc:
            raise _bad(f"the request body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        spec = self._spec(match)
        spec.signature_name = body.get("signature_name", "")
        _, _, outputs = predict(self.server.manager, spec, json_inputs(body), [])
        values = {k: _json_value(v, k) for k, v in outputs.items()}
        if "instances" in body:
            rows = len(next(iter(outputs.values())))
            predictions = [
                next(iter(values.values()))[i]
                if len(values) == 1
                else {k: v[i] for k, v in values.items()}
                for i in range(rows)
            ]
            self._send(200, {"predictions": predictions})
        else:
            self._send(
                200, {"outputs": next(iter(values.values())) if len(values) == 1 else values}
            )

    def log_message(self, *args: Any) -> None:
        pass


class RestServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        manager: Any,
        metrics: Any,
        prometheus_path: str | None,
        max_bytes: int,
    ) -> None:
        super().__init__(address, RestHandler)
        self.manager, self.metrics = manager, metrics
        self.prometheus_path, self.max_bytes = prometheus_path, max_bytes
        self.thread = threading.Thread(target=self.serve_forever, name="rest", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
