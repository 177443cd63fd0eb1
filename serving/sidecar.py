"""The logging sidecar: a gRPC pass-through in front of TF Serving (the real server or the local
stand-in) that logs sampled Predict and Classify calls with their responses.

Clients talk to the sidecar exactly as to TF Serving: every PredictionService and ModelService
method is forwarded as raw bytes, with the caller's deadline and metadata, and the server's
status comes back unchanged. Nothing is parsed on the request path; an answered Predict or
Classify is handed to ``serving.request_log.RequestLog``, which samples it and writes it off the
request path (``params.yaml``'s ``request_log`` section). A failed write is counted and logged,
never returned to the client. In ``make serve`` the sidecar takes port 8500 and the server moves
behind it; in the Kubernetes deployment it is the pod's second container (infra/k8s).

    imgpipe sidecar --upstream 127.0.0.1:8490 --port 8500   # params.yaml's request_log
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from serving.request_log import LogSettings, RequestLog
from serving.transport import (
    GRACE_SECONDS,
    MAX_MESSAGE_BYTES,
    bind,
    is_loopback,
    message_options,
    server_credentials,
    server_options,
    write_port_file,
)

log = logging.getLogger("serving.sidecar")

SERVICES = ("tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")
LOGGED = {
    "/tensorflow.serving.PredictionService/Predict": "predict",
    "/tensorflow.serving.PredictionService/Classify": "classify",
}
_HOP_HEADERS = ("user-agent", "grpc-", ":")  # set by each hop's own gRPC stack


class PassThrough(grpc.GenericRpcHandler):
    """Forwards every method of TF Serving's services to ``channel``; logs answered calls."""

    def __init__(self, channel: grpc.Channel, request_log: RequestLog) -> None:
        self.channel, self.request_log = channel, request_log
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method.lstrip("/").split("/")[0] not in SERVICES:
            return None  # UNIMPLEMENTED, as TF Serving answers
        if method not in self._handlers:
            self._handlers[method] = grpc.unary_unary_rpc_method_handler(self._forward(method))
        return self._handlers[method]

    def _forward(self, method: str) -> Any:
        upstream = self.channel.unary_unary(method)  # bytes in, bytes out
        kind = LOGGED.get(method)

        def forward(request: bytes, context: grpc.ServicerContext) -> bytes:
            metadata = [
                (key, value)
                for key, value in context.invocation_metadata()
                if not key.startswith(_HOP_HEADERS)
            ]
            try:
                response = upstream(request, timeout=context.time_remaining(), metadata=metadata)
            except grpc.RpcError as error:
                context.abort(error.code(), error.details() or "")
            if kind is not None:
                self.request_log.offer(kind, request, response)
            return response

        return forward


class Sidecar:
    """The pass-through server, ready to start; ``port`` 0 picks a free one."""

    def __init__(
        self,
        upstream: str,
        request_log: RequestLog,
        *,
        host: str = "127.0.0.1",
        port: int = 8500,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        workers: int = 16,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.request_log = request_log
        self.channel = grpc.insecure_channel(  # same pod or host
            upstream, options=message_options(max_message_bytes)
        )
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sidecar"),
            handlers=[PassThrough(self.channel, request_log)],
            options=server_options(max_message_bytes),
        )
        self.port, self.address = bind(self.server, host, port, credentials)

    def start(self) -> None:
        self.server.start()

    def stop(self, grace: float = GRACE_SECONDS) -> None:
        """Finish calls in flight, then write what is queued and close the log."""
        self.server.stop(grace).wait()
        self.channel.close()
        self.request_log.close()


def serve(
    settings: LogSettings,
    upstream: str,
    *,
    host: str,
    port: int,
    ssl_config_file: Path | None = None,
    port_file: Path | None = None,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> int:
    """Run the sidecar until SIGTERM or SIGINT; an exit status (2: a bad setting, said on
    stderr). ``kill -USR1`` prints every thread's stack."""
    from serving.config import ConfigError, read_ssl_config

    logging.basicConfig(level=logging.INFO, format="sidecar: %(levelname)s %(message)s")
    faulthandler.register(signal.SIGUSR1)
    if not ssl_config_file and not is_loopback(host):
        print(
            f"sidecar: error: --host {host} is not a loopback address, and gRPC without "
            "--ssl-config-file is plaintext: serve other hosts over TLS, or bind 127.0.0.1",
            file=sys.stderr,
        )
        return 2
    try:
        ssl = read_ssl_config(ssl_config_file) if ssl_config_file else None
    except ConfigError as exc:
        print(f"sidecar: error: {exc}", file=sys.stderr)
        return 2
    sidecar = Sidecar(
        upstream,
        RequestLog(settings),
        host=host,
        port=port,
        max_message_bytes=max_message_bytes,
        credentials=server_credentials(ssl) if ssl is not None else None,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    sidecar.start()
    log.info(
        "gRPC (%s) on %s -> %s; logging %.0f%% of Predict/Classify calls into %s",
        "plaintext" if ssl is None else "TLS",
        sidecar.address,
        upstream,
        100 * settings.sampling_rate,
        settings.directory,
    )
    if port_file:
        write_port_file(port_file, sidecar.port)
    stop.wait()
    sidecar.stop()
    counts = sidecar.request_log.counts
    log.info(
        "stopped: %d records written, %d dropped (queue full %d, write errors %d)",
        counts["written"],
        counts["dropped_queue_full"] + counts["dropped_write_error"],
        counts["dropped_queue_full"],
        counts["dropped_write_error"],
    )
    return 0
