"""A local stand-in for TensorFlow Serving: the same gRPC API, configs and model folders.

TF Serving's ``tensorflow_model_server`` binary is not installable from PyPI, so this server lets
the pipeline's models be served, and the contract tests run, on any machine. It answers
``tensorflow.serving.PredictionService`` (Predict, Classify, GetModelMetadata; Regress and
MultiInference are UNIMPLEMENTED) and ``tensorflow.serving.ModelService`` (GetModelStatus,
HandleReloadConfigRequest), and with ``--rest_api_port`` TF Serving's REST API and the
Prometheus metrics (``serving/rest.py``). It reads TF Serving's model config, batching and
monitoring files, loads every version the version policy allows, warms each up before it
reports AVAILABLE, swaps versions without failing requests in flight, caps message sizes, serves
gRPC over TLS or mTLS with TF Serving's ``--ssl_config_file`` (REST stays plaintext, as there),
binds 127.0.0.1 unless told otherwise (another host only with TLS), and stops cleanly on SIGTERM.
In production, run the real ``tensorflow/serving`` container with the same files (serving/README.md,
``infra/``).

    python -m serving.server --model_config_file serving/models.config --mount models:/models
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from serving.manager import ModelManager, ServingError, internal_error
from serving.metrics import Metrics
from serving.predict import (
    CLASSIFY_METHOD,
    DEFAULT_SIGNATURE,
    decode_inputs,
    find_signature,
    predict,
    run_signature,
)
from serving.transport import (
    GRACE_SECONDS,
    MAX_MESSAGE_BYTES,
    bind,
    is_loopback,
    server_credentials,
    server_options,
    write_port_file,
)

log = logging.getLogger("serving")


def _abort(context: grpc.ServicerContext, error: ServingError) -> None:
    context.abort(error.code, error.message)


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
        except Exception:  # a bug: the trace in the log, an id in the answer, counted
            code = grpc.StatusCode.INTERNAL
            context.abort(code, internal_error(api))
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
        signature = find_signature(servable, name, CLASSIFY_METHOD)
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
        ranked = scores if scores is not None else classes
        if ranked is None:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"classification signature {name!r} has neither a 'classes' nor a 'scores' output",
            )
        for row in range(len(examples)):
            result = response.result.classifications.add()
            for j in range(ranked.shape[1]):
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
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.metadata["signature_def"].Pack(servable.signature_def_map())
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

        try:
            states = self.manager.version_states(request.model_spec)
        except ServingError as error:
            return _abort(context, error)
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
    """The gRPC server, ready to start; ``port`` 0 picks a free one, and ``credentials``
    (``server_credentials``) serve it over TLS."""

    def __init__(
        self,
        manager: ModelManager,
        *,
        host: str = "127.0.0.1",
        port: int = 8500,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        workers: int = 16,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        self.manager, self.metrics = manager, Metrics()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
            options=server_options(max_message_bytes),
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionService(manager, self.metrics), self.server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelService(manager), self.server
        )
        self.port, self.address = bind(self.server, host, port, credentials)

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
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default loopback only; any other needs --ssl_config_file)",
    )
    p.add_argument("--enable_batching", action="store_true")
    p.add_argument("--batching_parameters_file", type=Path, default=None)
    p.add_argument("--monitoring_config_file", type=Path, default=None)
    p.add_argument("--rest_api_port", type=int, default=0, help="REST API and metrics (0: off)")
    p.add_argument(
        "--ssl_config_file",
        type=Path,
        default=None,
        help="SSLConfig (text proto; `python -m serving.config ssl` writes it): gRPC over TLS, "
        "mTLS with client_verify; REST stays plaintext, as in TF Serving",
    )
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
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="serving: %(levelname)s %(message)s")
    from serving.config import (
        ConfigError,
        batching_settings,
        read_batching_parameters,
        read_monitoring_config,
        read_ssl_config,
    )

    if not args.ssl_config_file and not is_loopback(args.host):
        print(
            f"serving: error: --host {args.host} is not a loopback address, and gRPC without "
            "--ssl_config_file is plaintext: serve other hosts over TLS (write the file with "
            "`python -m serving.config ssl`), or bind 127.0.0.1",
            file=sys.stderr,
        )
        return 2
    try:
        ssl = read_ssl_config(args.ssl_config_file) if args.ssl_config_file else None
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
        manager,
        host=args.host,
        port=args.port,
        max_message_bytes=args.max_message_bytes,
        credentials=server_credentials(ssl) if ssl is not None else None,
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
        # TLS covers the gRPC port only (as in TF Serving), and plaintext stays on loopback:
        # beyond it, gRPC goes out over TLS and REST stays on 127.0.0.1.
        rest_host = args.host if is_loopback(args.host) else "127.0.0.1"
        rest = RestServer(
            rest_host,
            args.rest_api_port,
            manager,
            server.metrics,
            prometheus,
            args.max_message_bytes,
            grace_seconds=int(GRACE_SECONDS),
        )
        rest.start()
    log.info(
        "gRPC (%s) on %s%s (batching %s); models %s",
        "plaintext" if ssl is None else "mTLS" if ssl.client_verify else "TLS",
        server.address,
        f", REST (plaintext) on {rest_host}:{rest.port}" if rest else "",
        "on" if batching else "off",
        ", ".join(
            f"{m.name} <- {manager.resolve_base(m.base_path)}"
            for m in config.model_config_list.config
        ),
    )
    if args.port_file:
        write_port_file(args.port_file, server.port)
    stop.wait()
    log.info("stopping: finishing requests in flight")
    if rest is not None:
        rest.stop()
    server.stop()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    code = main()
    # Stopped (requests in flight finished) or refused to start: nothing is left to do, and the
    # interpreter's teardown of TensorFlow and the loaded models would hold the exit, and
    # whoever waits on it, for seconds.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
