"""``imgpipe``: one subcommand per stage, each a thin adapter over ``components.<stage>.run``.

Defaults match ``dvc.yaml``, so ``imgpipe ingest`` alone does what ``dvc repro ingest`` does.
Expected failures (bad params, bad data, a failed expectation) print one clear message and exit
with status 1; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from components.config import ParamsError

log = logging.getLogger("imgpipe")


def _params(args: argparse.Namespace) -> dict:
    from components.config import load_params

    return load_params(args.params)


def cmd_sample_data(args: argparse.Namespace) -> None:
    from components import sample_data

    sample_data.run(Path(args.target), force=args.force)


def cmd_ingest(args: argparse.Namespace) -> None:
    from components import ingest
    from components.config import DataParams, IngestParams, section
    from components.tracking import stage_run

    params = _params(args)
    data, ingest_params = (
        section(DataParams, "data", params),
        section(IngestParams, "ingest", params),
    )
    outputs = ingest.IngestOutputs(Path(args.out), Path(args.summary))
    with stage_run("ingest"):
        summary = ingest.run(Path(args.source or data.source), outputs, data, ingest_params)
        ingest.log_to_mlflow(outputs, data, ingest_params)
    splits = ", ".join(f"{s} {c['total']}" for s, c in summary["splits"].items())
    print(
        f"ingest: {summary['images']} images ({splits}); {summary['quarantined']} quarantined "
        f"(see {outputs.directory / ingest.QUARANTINE})"
    )


def cmd_validate(args: argparse.Namespace) -> None:
    from components import validate
    from components.config import ValidateParams, section
    from components.tracking import stage_run

    params = section(ValidateParams, "validate", _params(args))
    outputs = validate.ValidateOutputs(Path(args.out), Path(args.summary))
    with stage_run("validate"):
        try:
            summary = validate.run(Path(args.manifest), outputs, params)
        finally:
            validate.log_to_mlflow(outputs, params)
    print(
        f"validate: {summary['expectations']} expectations, {summary['failed_warnings']} "
        f"warning(s); Data Docs: {outputs.directory / validate.DATA_DOCS / 'index.html'}"
    )


def cmd_summary(args: argparse.Namespace) -> None:
    from components.tracking import tracking_uri

    for name in ("ingest", "validate"):
        path = Path("metrics") / f"{name}.json"
        if path.is_file():
            print(f"{name}: {json.dumps(json.loads(path.read_text()), sort_keys=True)}")
    print(f"MLflow: {tracking_uri()} (browse with `make ui`)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgpipe", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, func: Callable[[argparse.Namespace], None], help: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = add("sample-data", cmd_sample_data, "write the offline ELPV sample data as class folders")
    p.add_argument("target", nargs="?", default="data")
    p.add_argument("--force", action="store_true", help="replace a folder that holds other data")

    p = add("ingest", cmd_ingest, "check, deduplicate and split the raw images; write shards")
    p.add_argument("--params", default="params.yaml")
    p.add_argument(
        "--source", help="folder of class folders or CSV manifest (default: data.source)"
    )
    p.add_argument("--out", default="outputs/ingest")
    p.add_argument("--summary", default="metrics/ingest.json")

    p = add("validate", cmd_validate, "run the Great Expectations suite on the manifest")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--manifest", default="outputs/ingest/manifest.csv")
    p.add_argument("--out", default="outputs/validate")
    p.add_argument("--summary", default="metrics/validate.json")

    add("summary", cmd_summary, "print the pipeline's metrics and where MLflow is")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"imgpipe {args.command}: %(levelname)s %(message)s",
    )
    for noisy in ("alembic", "mlflow", "great_expectations", "tensorflow", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    try:
        args.func(args)
    except (ParamsError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"imgpipe {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        from components.validate import DataValidationError

        if not isinstance(exc, DataValidationError):
            raise
        print(f"imgpipe {args.command}: data validation failed: {exc}", file=sys.stderr)
        return 1
    return 0
