"""``imgpipe predict``, ``imgpipe score``, ``imgpipe fetch-model`` and ``imgpipe sidecar``:
asking the served model, scoring a folder of new images with it, seeding a serving volume from
the registry, and logging what the served model is asked."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from commands.common import Subcommands, add_command
from commands.common import params_of as _params
from imgpipe.core.errors import InputError


def _tls(args: argparse.Namespace) -> Any:
    """The client's TLS from predict's flags; any of them implies TLS, none means plaintext."""
    from serving.client import TLS

    given = (args.ca_cert, args.client_cert, args.client_key, args.tls_server_name)
    if not args.tls and not any(given):
        return None
    return TLS(args.ca_cert, args.client_cert, args.client_key, args.tls_server_name)


def cmd_predict(args: argparse.Namespace) -> None:
    from serving.client import ServingClient, ServingClientError, top_k

    tls = _tls(args)
    model = args.model
    if not model and getattr(args, "profile", None):
        from imgpipe.core.params import ServingParams, section

        model = section(ServingParams, "serving", _params(args)).model_name
    elif not model:  # params.yaml's serving section alone: no typed views to import
        from serving.config import served_model_name

        model = served_model_name(args.params)
    images = []
    for name in args.files:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"no such image file: {path}")
        images.append((path, path.read_bytes()))
    try:
        with ServingClient(
            args.server, timeout=args.timeout, retries=args.retries, tls=tls
        ) as client:
            for start in range(0, len(images), args.batch_size):
                chunk = images[start : start + args.batch_size]
                outputs = client.predict_bytes(
                    [data for _, data in chunk], model=model, version=args.version
                )
                served = int(outputs["model_version"])
                for (path, _), labels in zip(chunk, top_k(outputs, args.top_k), strict=True):
                    ranked = ", ".join(f"{label} {p:.3f}" for label, p in labels)
                    print(f"{path}: {ranked}  ({model} v{served})")
    except ServingClientError as exc:
        raise PredictError(str(exc)) from None


def cmd_score(args: argparse.Namespace) -> None:
    """Score a folder or CSV of images with a SavedModel, the registry's champion or a server;
    write the predictions and print the summary."""
    import contextlib

    from imgpipe.core.params import IngestParams, ServingParams, section
    from imgpipe.monitoring import scoring

    params = _params(args)
    serving = section(ServingParams, "serving", params)
    items = scoring.discover(Path(args.source), args.labels_from_folders)
    if not items:
        raise InputError(f"{args.source}: no image files to score")
    from serving.client import ServingClient, ServingClientError

    with contextlib.ExitStack() as stack:
        if args.server:
            client = stack.enter_context(ServingClient(args.server, timeout=args.timeout))
            predict = scoring.server_predictor(client, args.model or serving.model_name)
        else:
            saved_model = args.saved_model or _champion(serving.model_name, stack)
            predict = scoring.saved_model_predictor(saved_model, args.batch_size)
        try:
            rows = scoring.score(
                items,
                predict,
                max_pixels=section(IngestParams, "ingest", params).max_pixels,
                batch_size=args.batch_size,
            )
        except ServingClientError as exc:
            raise PredictError(str(exc)) from None
    out = scoring.write(rows, Path(args.out))
    print(scoring.describe(scoring.summarise(rows), out))


def _champion(name: str, stack: Any) -> Path:
    """The registry champion's SavedModel, in a temporary folder that ``stack`` removes."""
    import tempfile

    import mlflow

    from imgpipe.tracking import registry
    from imgpipe.tracking.runs import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    champion = registry.champion(name)
    if champion is None:
        raise InputError(
            f"no champion of {name!r} in the registry at {tracking_uri()}: run the pipeline, "
            "or give --saved-model DIR or --server HOST:PORT"
        )
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="imgpipe-score-")))
    return champion.download_saved_model(folder)


class PredictError(InputError):
    """The server refused or failed a prediction (the message says which call and why)."""


def cmd_fetch_model(args: argparse.Namespace) -> None:
    import mlflow

    from imgpipe.tracking import registry
    from imgpipe.tracking.runs import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    target = registry.fetch(args.model, args.alias, Path(args.base))
    print(f"fetch-model: {args.model}@{args.alias} -> {target}")


def cmd_sidecar(args: argparse.Namespace) -> None:
    from imgpipe.core.params import RequestLogParams, section
    from serving.request_log import LogSettings
    from serving.sidecar import serve

    params = section(RequestLogParams, "request_log", _params(args))
    code = serve(
        LogSettings.from_params(params, args.log_dir, args.log_folder),
        args.upstream,
        host=args.host,
        port=args.port,
        ssl_config_file=args.ssl_config_file,
        port_file=args.port_file,
    )
    if code:
        raise SystemExit(code)


def register(sub: Subcommands) -> None:
    p = add_command(
        sub, "predict", cmd_predict, "classify image files on a TF Serving (or local) server"
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--server", default="127.0.0.1:8500", help="gRPC HOST:PORT")
    p.add_argument("--model", help="served model name (default: serving.model_name)")
    p.add_argument("--version", type=int, help="pin a model version (default: latest)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--timeout", type=float, default=10.0, help="deadline per call, seconds")
    p.add_argument("--retries", type=int, default=3, help="retries on UNAVAILABLE, with backoff")
    p.add_argument("--batch-size", type=int, default=16, help="images per request")
    tls = p.add_argument_group(
        "TLS", "for a server with --ssl_config_file; any of these implies TLS (default: plaintext)"
    )
    tls.add_argument("--tls", action="store_true", help="TLS with gRPC's default trust roots")
    tls.add_argument(
        "--ca-cert", type=Path, metavar="FILE", help="CA bundle (PEM) that signed the server's"
    )
    tls.add_argument(
        "--client-cert", type=Path, metavar="FILE", help="client certificate (PEM), for mTLS"
    )
    tls.add_argument("--client-key", type=Path, metavar="FILE", help="its private key (PEM)")
    tls.add_argument(
        "--tls-server-name", metavar="NAME", help="the name to verify in the server's certificate"
    )

    p = add_command(
        sub,
        "score",
        cmd_score,
        "score a folder or CSV of new images with the champion (or a SavedModel, or a server) "
        "into a CSV or Parquet file",
    )
    p.add_argument("source", help="a folder of images, or a CSV with filepath[,label] columns")
    p.add_argument("--out", required=True, help="predictions.csv or predictions.parquet")
    p.add_argument(
        "--labels-from-folders",
        action="store_true",
        help="the folder of each image below SOURCE is its label (labelled feedback)",
    )
    p.add_argument(
        "--saved-model", type=Path, metavar="DIR", help="default: the registry's champion"
    )
    p.add_argument("--server", metavar="HOST:PORT", help="score through a TF Serving server")
    p.add_argument("--model", help="served model name (default: serving.model_name)")
    p.add_argument("--batch-size", type=int, default=32, help="images per call")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline per server call, seconds")

    p = add_command(
        sub,
        "sidecar",
        cmd_sidecar,
        "the logging sidecar: a gRPC pass-through in front of TF Serving that logs sampled "
        "Predict/Classify calls (params.yaml's request_log) until SIGTERM",
    )
    p.add_argument("--upstream", required=True, metavar="HOST:PORT", help="TF Serving's gRPC")
    p.add_argument("--port", type=int, required=True, help="gRPC port to serve (0: any free)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (beyond loopback: TLS only)"
    )
    p.add_argument(
        "--log-dir",
        "--log_dir",
        type=Path,
        help="replaces request_log.directory, the log root (retention and the bound cover it all)",
    )
    p.add_argument(
        "--log-folder",
        default="",
        help="this sidecar's folder under the log root (a pod's name); default: the root",
    )
    p.add_argument(
        "--ssl-config-file",
        "--ssl_config_file",
        type=Path,
        help="TF Serving's SSLConfig: serve gRPC over TLS",
    )
    p.add_argument(
        "--port-file", "--port_file", type=Path, help="write the bound port here when ready"
    )

    p = add_command(
        sub, "fetch-model", cmd_fetch_model, "copy a registry alias's SavedModel to a base path"
    )
    p.add_argument("--model", required=True, help="registered model = served model name")
    p.add_argument("--alias", default="champion")
    p.add_argument("--base", default="models", help="TF Serving base path root")
