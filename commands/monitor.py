"""``imgpipe monitor``: one check of the served champion (``imgpipe.monitoring.check``), a
retraining through the orchestrator ``--retrain`` names (``pipelines.retrain``) when a
threshold is crossed; the verdict and what needs a look printed."""

from __future__ import annotations

import argparse
from pathlib import Path

from commands.common import Subcommands, add_command, params_of
from pipelines.retrain import HOW
from pipelines.stages import LOCAL_PIPELINE_ROOT, LOCAL_SHARED


def cmd_monitor(args: argparse.Namespace) -> None:
    from imgpipe.core.params import MonitorParams, section
    from imgpipe.monitoring.check import one_check_at_a_time, run_check
    from pipelines.retrain import Retraining

    params = params_of(args)
    retraining = Retraining(
        args.retrain,
        pipeline_root=Path(args.pipeline_root),
        shared_volume=args.shared_volume,
        mlflow_tracking_uri=args.mlflow_tracking_uri,
        kfp_host=args.kfp_host,
        kfp_experiment=args.kfp_experiment,
    )
    with one_check_at_a_time(Path(section(MonitorParams, "monitor", params).directory)):
        outcome = run_check(
            params,
            retraining,
            log_dir=args.log_dir,
            saved_model=args.saved_model,
            feedback_source=Path(args.feedback) if args.feedback else None,
            new_classes=args.new_class or [],
        )
    print(f"monitor: {outcome.verdict}")
    for line in outcome.notices:
        print(f"monitor: {line}")


def register(sub: Subcommands) -> None:
    p = add_command(
        sub,
        "monitor",
        cmd_monitor,
        "check the served champion's logged traffic for drift (and labelled feedback for an "
        "accuracy drop); past params.yaml's monitor thresholds, start a retraining",
    )
    p.add_argument("--log-dir", type=Path, help="default: request_log.directory")
    p.add_argument(
        "--feedback", metavar="FOLDER|CSV", help="served images with true labels (class folders)"
    )
    p.add_argument(
        "--new-class",
        action="append",
        metavar="NAME",
        help="a feedback label that is not one of the champion's classes, added on purpose "
        "(repeatable); any other unknown label is refused",
    )
    p.add_argument(
        "--retrain",
        choices=HOW,
        default="none",
        help="how a retraining starts (none: print the commands)",
    )
    p.add_argument(
        "--saved-model",
        type=Path,
        metavar="DIR",
        help="a <model>/<version>/ folder, not the champion",
    )
    p.add_argument("--pipeline-root", default=LOCAL_PIPELINE_ROOT, help="kfp-local: its artifacts")
    p.add_argument(
        "--shared-volume",
        help=f"kfp-local: the folder standing in for the claim (default {LOCAL_SHARED}); kfp: "
        "the PersistentVolumeClaim (default: the pipeline's)",
    )
    p.add_argument("--mlflow-tracking-uri", help="for the pipeline run (default: this one's)")
    p.add_argument("--kfp-host", help="kfp: the Kubeflow Pipelines API")
    p.add_argument("--kfp-experiment", default="imgpipe", help="kfp: the run's experiment")
