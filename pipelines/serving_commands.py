"""``imgpipe predict`` and ``imgpipe fetch-model``: asking the served model, and seeding a
serving volume from the registry."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from imgpipe.errors import InputError
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
        from imgpipe.params import ServingParams, section

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


class PredictError(InputError):
    """The server refused or failed a prediction (the message says which call and why)."""


def cmd_fetch_model(args: argparse.Namespace) -> None:
    import mlflow

    from imgpipe import registry
    from imgpipe.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    target = registry.fetch(args.model, args.alias, Path(args.base))
    print(f"fetch-model: {args.model}@{args.alias} -> {target}")
