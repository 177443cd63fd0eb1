"""``imgpipe predict``, ``imgpipe score``, ``imgpipe fetch-model`` and ``imgpipe sidecar``:
asking the served model, scoring a folder of new images with it, seeding a serving volume from
the registry, and logging what the served model is asked."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from imgpipe.core.errors import InputError
from pipelines.cli_common import params_of as _params


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
