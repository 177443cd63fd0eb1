"""imgpipe: the pipeline's stages, experiments, MLflow, serving, monitoring and Kubeflow.

A thin command per module, each registering its own subcommands:

- ``commands.stages``: every declared stage (``pipelines.stages``) and ``profile``;
- ``commands.data``: ``sample-data``, ``fashion-mnist-data``;
- ``commands.experiments``: ``seeds``, ``crossval``, ``growing-data``;
- ``commands.tracking``: MLflow's ``runs``, ``ui``, ``mlflow-access``, ``summary``;
- ``commands.serving``: ``predict``, ``score``, ``sidecar``, ``fetch-model``;
- ``commands.monitor``: ``monitor``;
- ``commands.kubeflow``: ``pipeline compile / run-local / schedule ...``.

A command parses its arguments, calls the library (``imgpipe``) or an orchestrator
(``pipelines``) and prints; nothing else. Stage paths default to ``dvc.yaml``'s, so ``imgpipe
ingest`` alone does what ``dvc repro ingest`` does. Expected failures (bad params, bad data, a
failed expectation) print one clear message and exit with status 1; anything else is a bug and
shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from imgpipe.core.logs import quiet_for_logs

GROUPS = ("data", "stages", "experiments", "tracking", "serving", "monitor", "kubeflow")
"""The command modules, in the order ``imgpipe --help`` lists their subcommands."""

log = logging.getLogger("imgpipe")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgpipe", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        importlib.import_module(f"commands.{group}").register(sub)
    return parser


OWN_PACKAGES = ("imgpipe", "components", "pipelines", "serving", "commands")


def _ours(exc: Exception) -> bool:
    """Bad input this project named in the message: an ``InputError`` (or another error class
    of ours, like serving's ``ConfigError``), or a missing or existing file, which names it."""
    if isinstance(exc, (FileNotFoundError, FileExistsError)):
        return True
    return type(exc).__module__.split(".")[0] in OWN_PACKAGES  # InputError is imgpipe.core.errors


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"imgpipe {args.command}: %(levelname)s %(message)s",
    )
    for noisy in ("alembic", "mlflow", "great_expectations", "tensorflow", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_for_logs()
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        if not _ours(exc):
            raise  # a bug, here or in a library: its traceback says where
        print(f"imgpipe {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        from components.validate import DataValidationError
        from imgpipe.tracking.access import AccessError
        from imgpipe.tracking.registry import PushError

        if isinstance(exc, DataValidationError):
            print(f"imgpipe {args.command}: data validation failed: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, (PushError, AccessError)):
            print(f"imgpipe {args.command}: error: {exc}", file=sys.stderr)
            return 1
        raise
    except Exception as exc:  # MLflow's 401 or 403 on a call no `needs` names
        from imgpipe.tracking.access import refused

        if (message := refused(exc)) is None:
            raise
        print(f"imgpipe {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0


def run() -> None:
    """The ``imgpipe`` console script: :func:`main`, then its exit status, without the
    interpreter's teardown when the command has nothing left running
    (``imgpipe.core.process``): about 2 s per stage process under ``dvc repro``."""
    from imgpipe.core.process import end_now, nothing_pending

    code = main()
    if nothing_pending():
        end_now(code)
    sys.exit(code)
