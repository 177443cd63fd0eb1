"""``imgpipe pipeline ...``: compile the Kubeflow pipeline, run it with kfp.local, and schedule
it on a cluster (``kfp.Client``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from imgpipe.core.errors import InputError
from pipelines.cli_common import params_of as _params


def _pipeline_arguments(args: argparse.Namespace, tracking_uri: str) -> dict[str, Any]:
    arguments: dict[str, Any] = {"mlflow_tracking_uri": tracking_uri}
    if args.source:
        arguments["source"] = args.source
    if args.data_version:
        arguments["data_version"] = args.data_version
    if args.shared_volume:
        arguments["shared_volume"] = args.shared_volume
    return arguments


def cmd_pipeline_compile(args: argparse.Namespace) -> None:
    from pipelines.kubeflow import compile_to

    path = compile_to(_params(args), Path(args.out))
    print(f"pipeline: compiled to {path} (image {os.environ.get('IMGPIPE_IMAGE', 'default')})")


def cmd_pipeline_run_local(args: argparse.Namespace) -> None:
    import time

    from imgpipe.tracking.runs import tracking_uri
    from pipelines.kubeflow import run_local

    started = time.perf_counter()
    args.shared_volume = str(Path(args.shared_volume).resolve())
    run_local(
        _params(args),
        Path(args.pipeline_root).resolve(),
        **_pipeline_arguments(args, args.mlflow_tracking_uri or tracking_uri()),
    )
    print(
        f"pipeline: every stage ran with kfp.local in {time.perf_counter() - started:.0f} s; "
        f"artifacts under {args.pipeline_root}, serving versions, feature cache and checkpoints "
        f"under {args.shared_volume}"
    )


CRON_FIELDS = 6


def _kfp_client(args: argparse.Namespace) -> Any:
    import kfp

    return kfp.Client(host=args.host)


def cmd_pipeline_schedule(args: argparse.Namespace) -> None:
    import tempfile

    from pipelines.kubeflow import compile_to

    if len(args.cron.split()) != CRON_FIELDS:
        raise InputError(
            f"--cron needs 6 fields (seconds minutes hours day-of-month month day-of-week), "
            f"as Kubeflow reads it, got {args.cron!r}"
        )
    # A recurring run over a path reads whatever is there each night, with the same parameters:
    # cached steps would keep serving the first night's data. Cache only the sample data.
    caching = not args.source or args.source == "sample"
    client = _kfp_client(args)
    experiment = client.create_experiment(args.experiment)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_to(_params(args), Path(tmp) / "pipeline.yaml")
        recurring = client.create_recurring_run(
            experiment_id=experiment.experiment_id,
            job_name=args.name,
            cron_expression=args.cron,
            pipeline_package_path=str(package),
            params=_pipeline_arguments(args, args.mlflow_tracking_uri),
            max_concurrency=1,
            no_catchup=True,
            enable_caching=caching,
        )
    print(
        f"pipeline: scheduled {args.name!r} ({recurring.recurring_run_id}) in experiment "
        f"{args.experiment!r}, cron {args.cron!r}, caching {'on' if caching else 'off'}"
    )


def cmd_pipeline_schedules(args: argparse.Namespace) -> None:
    response = _kfp_client(args).list_recurring_runs(page_size=100)
    for run in response.recurring_runs or []:
        cron = getattr(getattr(run.trigger, "cron_schedule", None), "cron", None)
        print(f"{run.recurring_run_id}  {run.status}  {cron}  {run.display_name}")


def cmd_pipeline_disable(args: argparse.Namespace) -> None:
    _kfp_client(args).disable_recurring_run(args.id)
    print(f"pipeline: disabled recurring run {args.id}")


def cmd_pipeline_delete(args: argparse.Namespace) -> None:
    _kfp_client(args).delete_recurring_run(args.id)
    print(f"pipeline: deleted recurring run {args.id}")
