"""TF Serving's REST API on the local server (``--rest_api_port``), a Starlette app run by uvicorn:

- ``POST /v1/models/<name>[/versions/<N> | /labels/<L>]:predict`` with ``{"signature_name": ...,
  "instances": [...]}`` (row format) or ``{"inputs": ...}`` (columnar format); binary strings
  as ``{"b64": "..."}``; answers ``{"predictions": [...]}`` or ``{"outputs": ...}``;
- ``GET /v1/models/<name>[/versions/<N> | /labels/<L>]``: version status; ``.../metadata``:
  signatures;
- ``GET`` the Prometheus path of ``--monitoring_config_file`` (``serving/metrics.py``).

Errors answer ``{"error": "..."}`` with the HTTP status TF Serving maps the gRPC code to: 400
(bad request), 404 (unknown model, version or path), 429 (RESOURCE_EXHAUSTED), 503
(UNAVAILABLE: among others a full batch queue, as in TF Serving), 500 (a bug); 405 for a known
path with another method. A body over the message cap is refused with 413 (Starlette's body
limit) before it is read whole.

    server = RestServer("127.0.0.1", 8501, manager, metrics, "/monitoring/prometheus/metrics", cap)
    server.start()  # serves on its own thread
    server.stop()   # finishes requests in flight
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
import time
from typing import Any

import grpc
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving.manager import ModelManager, ServingError, internal_error
from serving.metrics import Metrics
from serving.predict import (
    STATUS_BY_NUMBER,
    InputBuilder,
    check_input_names,
    check_shape,
    predict,
)

log = logging.getLogger(__name__)

HTTP_STATUS = {  # TF Serving's ToHTTPStatusCode (model_servers/http_server.cc); others: 500
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
MODEL_PATHS = (  # TF Serving's: a model, one version of it, or a labelled version
    "/v1/models/{name}",
    "/v1/models/{name}/versions/{version:int}",
    "/v1/models/{name}/labels/{label}",
)


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


def json_inputs(body: dict[str, Any]) -> InputBuilder:
    """``predict()``'s input builder for a REST body, checked like a gRPC request."""
    has_rows, has_columns = "instances" in body, "inputs" in body
    if has_rows == has_columns:
        raise _bad("the request body needs exactly one of 'instances' (rows) or 'inputs' (columns)")

    def build(signature: Any, name: str) -> dict[str, np.ndarray]:
        inputs = dict(signature.inputs)
        single = next(iter(inputs)) if len(inputs) == 1 else None
        columns: dict[str, Any]
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
            if isinstance(value, dict) and set(value) != {"b64"}:
                columns = value
            elif single:
                columns = {single: value}
            else:
                raise _bad(f"signature {name!r} has inputs {sorted(inputs)}: name them")
        check_input_names(columns, signature, name)
        arrays = {}
        for key, value in columns.items():
            arrays[key] = _array(value, inputs[key], f"input {key!r}")
            check_shape(key, arrays[key].shape, inputs[key])
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


def _spec(request: Request) -> Any:
    from tensorflow_serving.apis import model_pb2

    params = request.path_params
    spec = model_pb2.ModelSpec(name=params["name"])
    if "version" in params:
        spec.version.value = params["version"]
    if "label" in params:
        spec.version_label = params["label"]
    return spec


class RestApi:
    """The endpoints, over one server's model manager and metrics."""

    def __init__(self, manager: ModelManager, metrics: Metrics) -> None:
        self.manager, self.metrics = manager, metrics

    def status(self, request: Request) -> Response:
        from tensorflow_serving.apis import get_model_status_pb2

        names = get_model_status_pb2.ModelVersionStatus.State.Name
        states = self.manager.version_states(_spec(request))
        return JSONResponse(
            {
                "model_version_status": [
                    {
                        "version": str(version),
                        "state": names(state.state),
                        "status": {
                            "error_code": STATUS_BY_NUMBER[state.error_code].name,
                            "error_message": state.error,
                        },
                    }
                    for version, state in states
                ]
            }
        )

    def metadata(self, request: Request) -> Response:
        from google.protobuf import json_format

        servable = self.manager.servable(_spec(request))
        return JSONResponse(
            {
                "model_spec": {"name": servable.name, "version": str(servable.version)},
                "metadata": {
                    "signature_def": json_format.MessageToDict(servable.signature_def_map())
                },
            }
        )

    async def predict(self, request: Request) -> Response:
        body = await request.body()  # over the cap: Starlette answers 413
        name = request.path_params["name"]
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return JSONResponse(await run_in_threadpool(self._predict, _spec(request), body))
        except ServingError as error:
            code = error.code
            raise
        except Exception:  # a bug: the trace in the log, an id in the answer, counted
            code = grpc.StatusCode.INTERNAL
            return JSONResponse({"error": internal_error("REST predict")}, status_code=500)
        finally:
            self.metrics.record("RestPredict", name, code, time.perf_counter() - started)

    def _predict(self, spec: Any, raw: bytes) -> dict[str, Any]:
        try:
            body = json.loads(raw or b"null")
        except json.JSONDecodeError as exc:
            raise _bad(f"the request body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        spec.signature_name = body.get("signature_name", "")
        _, _, outputs = predict(self.manager, spec, json_inputs(body), [])
        values = {k: _json_value(v, k) for k, v in outputs.items()}
        if "instances" not in body:
            return {"outputs": next(iter(values.values())) if len(values) == 1 else values}
        rows = len(next(iter(outputs.values())))
        return {
            "predictions": [
                next(iter(values.values()))[i]
                if len(values) == 1
                else {k: v[i] for k, v in values.items()}
                for i in range(rows)
            ]
        }


def _serving_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServingError)
    return JSONResponse({"error": exc.message}, status_code=HTTP_STATUS.get(exc.code, 500))


def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse(
        {"error": f"{exc.detail}: {request.method} {request.url.path}"},
        status_code=exc.status_code,
        headers=exc.headers,
    )


def build_app(
    manager: ModelManager, metrics: Metrics, prometheus_path: str | None, max_body_bytes: int
) -> Starlette:
    """The REST API as an ASGI app; ``prometheus_path`` None: no metrics endpoint."""
    api = RestApi(manager, metrics)
    routes = []
    for path in MODEL_PATHS:
        routes += [
            Route(f"{path}:predict", api.predict, methods=["POST"]),
            Route(f"{path}/metadata", api.metadata, methods=["GET"]),
            Route(path, api.status, methods=["GET"]),
        ]
    if prometheus_path:

        def prometheus(request: Request) -> Response:
            text, content_type = metrics.exposition(request.headers.get("accept"))
            return Response(text, headers={"Content-Type": content_type})

        routes.append(Route(prometheus_path, prometheus, methods=["GET"]))
    return Starlette(
        routes=routes,
        exception_handlers={ServingError: _serving_error, HTTPException: _http_error},
        max_body_size=max_body_bytes,
    )


class RestServer:
    """The REST API served by uvicorn on its own thread. The port is bound here (0 picks a free
    one), so a port in use fails at once."""

    def __init__(
        self,
        host: str,
        port: int,
        manager: ModelManager,
        metrics: Metrics,
        prometheus_path: str | None,
        max_body_bytes: int,
        *,
        grace_seconds: int = 10,
    ) -> None:
        self.socket = socket.create_server((host, port))
        self.port = int(self.socket.getsockname()[1])
        config = uvicorn.Config(
            build_app(manager, metrics, prometheus_path, max_body_bytes),
            lifespan="off",
            log_config=None,  # the server's own logging setup
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=grace_seconds,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, name="rest", daemon=True
        )

    def start(self, timeout: float = 30.0) -> None:
        """Start serving; returns once uvicorn accepts connections."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the REST server did not start on port {self.port}")
            time.sleep(0.01)

    def stop(self) -> None:
        """Refuse new connections, finish requests in flight, then close the socket."""
        self.server.should_exit = True
        self.thread.join()
        self.socket.close()
