"""``imgpipe pipeline ...``: compile the Kubeflow pipeline, run it with kfp.local, and schedule
it on a cluster (``kfp.Client``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from commands.common import Command, Subcommands
from commands.common import params_of as _params
from imgpipe.core.errors import InputError
from pipelines.stages import LOCAL_PIPELINE_ROOT, LOCAL_SHARED


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


def register(sub: Subcommands) -> None:
    pipeline = sub.add_parser("pipeline", help="the Kubeflow pipeline: compile, run, schedule")
    psub = pipeline.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")

    def padd(name: str, func: Command, help: str) -> argparse.ArgumentParser:
        q = psub.add_parser(name, help=help, description=help)
        q.set_defaults(func=func)
        q.add_argument("--params", default="params.yaml", help="pipeline parameter defaults")
        q.add_argument("--profile", help="apply a profile (profiles/<name>.yaml), e.g. full")
        return q

    q = padd("compile", cmd_pipeline_compile, "write the pipeline YAML (IMGPIPE_IMAGE: image)")
    q.add_argument("--out", default="outputs/pipeline/imgpipe.yaml")
    q = padd("run-local", cmd_pipeline_run_local, "run every stage for real with kfp.local")
    q.add_argument("--source", help="'sample' (default) or a folder of class folders")
    q.add_argument("--data-version", help="the data's version, part of the cache key")
    q.add_argument("--pipeline-root", default=LOCAL_PIPELINE_ROOT)
    q.add_argument(
        "--shared-volume",
        default=LOCAL_SHARED,
        help="folder standing in for the shared claim: serving versions (models/), feature "
        "cache, checkpoints, kept across runs",
    )
    q.add_argument("--mlflow-tracking-uri", help="default: as the DVC pipeline (mlflow.db)")
    q = padd("schedule", cmd_pipeline_schedule, "create a recurring run on a Kubeflow host")
    q.add_argument(
        "--host", required=True, help="Kubeflow Pipelines API, e.g. http://ml-pipeline-ui"
    )
    q.add_argument("--cron", default="0 0 2 * * *", help="6 fields, seconds first")
    q.add_argument("--experiment", default="imgpipe")
    q.add_argument("--name", default="imgpipe-nightly")
    q.add_argument(
        "--source",
        help="data folder the pods can read (default: sample); caching is then off, since the "
        "folder's content changes between runs while the parameters do not",
    )
    q.add_argument("--data-version", help="the data's version, part of the cache key")
    q.add_argument("--mlflow-tracking-uri", default="http://mlflow.imgpipe.svc.cluster.local:5000")
    q.add_argument(
        "--shared-volume",
        help="PersistentVolumeClaim for serving versions, feature cache and checkpoints "
        "(default: the pipeline's, the claim infra/k8s creates)",
    )
    for name, func, text in (
        ("schedules", cmd_pipeline_schedules, "list recurring runs"),
        ("disable-schedule", cmd_pipeline_disable, "disable a recurring run"),
        ("delete-schedule", cmd_pipeline_delete, "delete a recurring run"),
    ):
        q = padd(name, func, text)
        q.add_argument("--host", required=True)
        if name != "schedules":
            q.add_argument("id", help="recurring run id")
