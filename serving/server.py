"""A local stand-in for TensorFlow Serving: the same gRPC API, configs and model folders.

TF Serving's ``tensorflow_model_server`` binary is not installable from PyPI, so this server lets
the pipeline's models be served, and the contract tests run, on any machine. It answers
``tensorflow.serving.PredictionService`` (Predict, Classify, GetModelMetadata; Regress and
MultiInference are UNIMPLEMENTED) and ``tensorflow.serving.ModelService`` (GetModelStatus,
HandleReloadConfigRequest), reads TF Serving's model config, batching and monitoring files,
loads every version the version policy allows, warms each up before it reports AVAILABLE,
swaps versions without failing requests in flight, caps message sizes, binds 127.0.0.1 unless
told otherwise, and stops cleanly on SIGTERM. In production, run the real ``tensorflow/serving``
container with the same files (README, ``infra/``).

    python -m serving.server --model_config_file serving/models.config --mount models:/models
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from serving.batching import QueueFull
from serving.manager import ModelManager, ServingError

log = logging.getLogger("serving")

DEFAULT_SIGNATURE = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
GRACE_SECONDS = 10.0


def _abort(context: grpc.ServicerContext, error: ServingError) -> None:
    context.abort(error.code, error.message)


def _dtype_name(enum: int) -> str:
    from tensorflow.core.framework import types_pb2

    return types_pb2.DataType.Name(enum)


def _check_shape(name: str, shape: tuple[int, ...], info: Any) -> None:
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
    expected, given = set(signature.inputs), set(given)
    if expected != given:
        missing, extra = sorted(expected - given), sorted(given - expected)
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
        _check_shape(name, array.shape, info)
        arrays[name] = array
    return arrays


def run_signature(servable: Any, name: str, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    import tensorflow as tf

    try:
        return servable.call(name, inputs)
    except QueueFull as exc:  # as TF Serving: UNAVAILABLE, so clients back off and retry
        raise ServingError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
    except tf.errors.OpError as exc:  # TensorFlow's status codes are gRPC's, number for number
        raise ServingError(
            STATUS_BY_NUMBER.get(exc.error_code, grpc.StatusCode.INTERNAL), exc.message
        ) from None


STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def _signature(servable: Any, name: str, method: str | None) -> Any:
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


def predict(
    manager: ModelManager, spec: Any, inputs: Any, output_filter: list[str]
) -> tuple[Any, str, dict[str, np.ndarray]]:
    """The Predict API, shared by gRPC and REST: resolve the version and signature, build and
    check the inputs (``inputs(signature_def, signature_name)``), run, filter the outputs."""
    servable = manager.servable(spec)
    name = spec.signature_name or DEFAULT_SIGNATURE
    signature = _signature(servable, name, None)
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


class Metrics:
    """Request counts and latencies, for the Prometheus endpoint and the logs."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = {}
        self.latency_sum: dict[tuple[str, str], float] = {}

    def record(self, api: str, model: str, code: grpc.StatusCode, seconds: float) -> None:
        with self.lock:
            key = (api, model, code.name)
            self.requests[key] = self.requests.get(key, 0) + 1
            self.latency_sum[(api, model)] = self.latency_sum.get((api, model), 0.0) + seconds

    def prometheus(self) -> str:
        lines = ["# TYPE imgpipe_serving_requests_total counter"]
        with self.lock:
            for (api, model, code), count in sorted(self.requests.items()):
                lines.append(
                    f'imgpipe_serving_requests_total{{api="{api}",model="{model}",'
                    f'code="{code}"}} {count}'
                )
            lines.append("# TYPE imgpipe_serving_latency_seconds_sum counter")
            for (api, model), total in sorted(self.latency_sum.items()):
                lines.append(
                    f'imgpipe_serving_latency_seconds_sum{{api="{api}",model="{model}"}} '
                    f"{total:.6f}"
                )
        return "\n".join(lines) + "\n"


class PredictionService:
    """tensorflow.serving.PredictionService."""

    def __init__(self, manager: ModelManager, metrics: Metrics) -> None:
        self.manager, self.metrics = manager, metrics

    def _serve(self, api: str, request: Any, context: Any, handler: Any) -> Any:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return handler(request)
        except ServingError as error:
            code = error.code
            _abort(context, error)
        except Exception as exc:  # a bug: answer INTERNAL with the reason, count it
            log.exception("%s failed", api)
            code = grpc.StatusCode.INTERNAL
            context.abort(code, f"{api} failed: {type(exc).__name__}: {exc}")
        finally:
            self.metrics.record(api, request.model_spec.name, code, time.perf_counter() - started)

    def Predict(self, request: Any, context: Any) -> Any:
        return self._serve("Predict", request, context, self._predict)

    def _predict(self, request: Any) -> Any:
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        servable, name, outputs = predict(
            self.manager,
            request.model_spec,
            lambda signature, name: decode_inputs(request.inputs, signature, name),
            list(request.output_filter),
        )
        response = predict_pb2.PredictResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = name
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response

    def Classify(self, request: Any, context: Any) -> Any:
        return self._serve("Classify", request, context, self._classify)

    def _classify(self, request: Any) -> Any:
        from tensorflow_serving.apis import classification_pb2

        servable = self.manager.servable(request.model_spec)
        name = request.model_spec.signature_name or DEFAULT_SIGNATURE
        signature = _signature(servable, name, CLASSIFY_METHOD)
        kind = request.input.WhichOneof("kind")
        if kind != "example_list":
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Classify takes input.example_list here, got {kind or 'no input'}",
            )
        examples = np.array(
            [e.SerializeToString() for e in request.input.example_list.examples], dtype=object
        )
        if not len(examples):
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Classify got no examples")
        (input_name,) = signature.inputs
        outputs = run_signature(servable, name, {input_name: examples})
        response = classification_pb2.ClassificationResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = name
        classes, scores = outputs.get("classes"), outputs.get("scores")
        for row in range(len(examples)):
            result = response.result.classifications.add()
            width = (scores if scores is not None else classes).shape[1]
            for j in range(width):
                item = result.classes.add()
                if classes is not None:
                    item.label = classes[row, j].decode()
                if scores is not None:
                    item.score = float(scores[row, j])
        return response

    def GetModelMetadata(self, request: Any, context: Any) -> Any:
        return self._serve("GetModelMetadata", request, context, self._metadata)

    def _metadata(self, request: Any) -> Any:
        from tensorflow_serving.apis import get_model_metadata_pb2

        fields = list(request.metadata_field)
        if fields != ["signature_def"]:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"metadata_field must be ['signature_def'], got {fields}",
            )
        servable = self.manager.servable(request.model_spec)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        for key, value in servable.signature_defs.items():
            signatures.signature_def[key].CopyFrom(value)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.metadata["signature_def"].Pack(signatures)
        return response

    def Regress(self, request: Any, context: Any) -> Any:
        context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "Regress: the exported models are classifiers and have no regression signature",
        )

    def MultiInference(self, request: Any, context: Any) -> Any:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "MultiInference is not supported here")


class ModelService:
    """tensorflow.serving.ModelService."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    def GetModelStatus(self, request: Any, context: Any) -> Any:
        from tensorflow_serving.apis import get_model_status_pb2

        spec = request.model_spec
        try:
            states = list(self.manager.states(spec.name))
        except ServingError as error:
            return _abort(context, error)
        if spec.HasField("version"):
            states = [(v, s) for v, s in states if v == spec.version.value]
            if not states:
                context.abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"Could not find version {spec.version.value} of model {spec.name!r}",
                )
        response = get_model_status_pb2.GetModelStatusResponse()
        for version, state in states:
            status = response.model_version_status.add(version=version, state=state.state)
            status.status.error_code = state.error_code
            status.status.error_message = state.error
        return response

    def HandleReloadConfigRequest(self, request: Any, context: Any) -> Any:
        from tensorflow_serving.apis import model_management_pb2

        from serving.config import ConfigError, check_model_config

        response = model_management_pb2.ReloadConfigResponse()
        try:
            check_model_config(request.config, "ReloadConfigRequest.config")
            self.manager.reload(request.config)
        except ConfigError as exc:
            response.status.error_code = 3  # INVALID_ARGUMENT
            response.status.error_message = str(exc)
        return response


class LocalServer:
    """The gRPC server, ready to start; ``port`` 0 picks a free one."""

    def __init__(
        self,
        manager: ModelManager,
        *,
        host: str = "127.0.0.1",
        port: int = 8500,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        workers: int = 16,
    ) -> None:
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        self.manager, self.metrics = manager, Metrics()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionService(manager, self.metrics), self.server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelService(manager), self.server
        )
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if not self.port:
            raise OSError(f"cannot bind {host}:{port}")
        self.address = f"{host}:{self.port}"

    def start(self) -> None:
        self.server.start()

    def stop(self, grace: float = GRACE_SECONDS) -> None:
        """Refuse new calls, let running ones finish (up to ``grace`` s), then unload."""
        self.server.stop(grace).wait()
        self.manager.stop()


def _mount(text: str) -> tuple[str, Path]:
    host, sep, container = text.rpartition(":")
    if not sep or not host or not container.startswith("/"):
        raise argparse.ArgumentTypeError(f"expected HOST_DIR:/CONTAINER_DIR, got {text!r}")
    return container, Path(host)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.server", description=__doc__.split("\n")[0])
    p.add_argument("--model_config_file", type=Path, default=None)
    p.add_argument("--model_name", help="serve one model (instead of --model_config_file)")
    p.add_argument("--model_base_path", help="with --model_name")
    p.add_argument("--port", type=int, default=8500, help="gRPC port (0: any free port)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--enable_batching", action="store_true")
    p.add_argument("--batching_parameters_file", type=Path, default=None)
    p.add_argument("--monitoring_config_file", type=Path, default=None)
    p.add_argument("--rest_api_port", type=int, default=0, help="REST API and metrics (0: off)")
    p.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0)
    p.add_argument("--max_message_bytes", type=int, default=MAX_MESSAGE_BYTES)
    p.add_argument(
        "--mount",
        type=_mount,
        action="append",
        default=[],
        metavar="HOST_DIR:/CONTAINER_DIR",
        help="read base paths under CONTAINER_DIR from HOST_DIR, like docker run -v",
    )
    p.add_argument("--port_file", type=Path, help="write the bound gRPC port here when ready")
    return p


def _model_config(args: argparse.Namespace) -> Any:
    from tensorflow_serving.config import model_server_config_pb2

    from serving.config import read_model_config

    if args.model_config_file:
        return read_model_config(args.model_config_file)
    if not (args.model_name and args.model_base_path):
        raise SystemExit("give --model_config_file, or --model_name with --model_base_path")
    config = model_server_config_pb2.ModelServerConfig()
    config.model_config_list.config.add(
        name=args.model_name,
        base_path=str(Path(args.model_base_path).resolve()),
        model_platform="tensorflow",
    )
    return config


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="serving: %(levelname)s %(message)s")
    from serving.config import (
        ConfigError,
        batching_settings,
        read_batching_parameters,
        read_monitoring_config,
    )

    try:
        config = _model_config(args)
        batching = (
            batching_settings(read_batching_parameters(args.batching_parameters_file))
            if args.enable_batching
            else None
        )
        monitoring = (
            read_monitoring_config(args.monitoring_config_file)
            if args.monitoring_config_file
            else None
        )
    except ConfigError as exc:
        print(f"serving: error: {exc}", file=sys.stderr)
        return 2

    manager = ModelManager(
        config,
        mounts=dict(args.mount),
        batching=batching,
        poll_seconds=args.file_system_poll_wait_seconds,
    )
    server = LocalServer(
        manager, host=args.host, port=args.port, max_message_bytes=args.max_message_bytes
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    rest = None
    if args.rest_api_port:
        from serving.rest import RestServer

        prometheus = (
            monitoring.prometheus_config.path
            if monitoring is not None and monitoring.prometheus_config.enable
            else None
        )
        rest = RestServer(
            (args.host, args.rest_api_port),
            manager,
            server.metrics,
            prometheus,
            args.max_message_bytes,
        )
        rest.start()
    log.info(
        "gRPC on %s%s (batching %s); models %s",
        server.address,
        f", REST on {args.host}:{rest.server_port}" if rest else "",
        "on" if batching else "off",
        ", ".join(
            f"{m.name} <- {manager.resolve_base(m.base_path)}"
            for m in config.model_config_list.config
        ),
    )
    if args.port_file:
        tmp = args.port_file.with_suffix(".tmp")
        tmp.write_text(str(server.port))
        tmp.replace(args.port_file)
    stop.wait()
    log.info("stopping: finishing requests in flight")
    if rest is not None:
        rest.stop()
    server.stop()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
