"""The ``imgpipe`` command: every declared stage (``pipelines.stages``), and more.

Besides the stages: the sample data, profiles and seeds here; serving (predict, fetch-model) in
``pipelines.serving_commands``, the Kubeflow pipeline in ``pipelines.kubeflow_commands``, MLflow
(accounts, UI, runs, summary) in ``pipelines.mlflow_commands``.

Stage paths default to ``dvc.yaml``'s, so ``imgpipe ingest`` alone does what ``dvc repro ingest``
does. Expected failures (bad params, bad data, a failed expectation) print one clear message
and exit with status 1; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from imgpipe.core.logs import quiet_for_logs
from pipelines.cli_common import LOCAL_PIPELINE_ROOT, LOCAL_SHARED
from pipelines.cli_common import params_of as _params
from pipelines.kubeflow_commands import (
    cmd_pipeline_compile,
    cmd_pipeline_delete,
    cmd_pipeline_disable,
    cmd_pipeline_run_local,
    cmd_pipeline_schedule,
    cmd_pipeline_schedules,
)
from pipelines.mlflow_commands import cmd_mlflow_access, cmd_runs, cmd_summary, cmd_ui
from pipelines.monitor_command import cmd_monitor
from pipelines.serving_commands import cmd_fetch_model, cmd_predict, cmd_score, cmd_sidecar

log = logging.getLogger("imgpipe")


def cmd_profile(args: argparse.Namespace) -> None:
    """The profile as ``dvc exp run`` flags: ``dvc exp run -n full $(imgpipe profile full)``."""
    from imgpipe.core.params import load_params, set_flags, with_profile

    with_profile(load_params(args.params), args.name)  # every override checked first
    print(" ".join(set_flags(args.name)))


def cmd_sample_data(args: argparse.Namespace) -> None:
    from imgpipe.data import sample_data

    sample_data.run(Path(args.target), force=args.force)


def cmd_fashion_mnist_data(args: argparse.Namespace) -> None:
    from imgpipe.data import fashion_mnist_data

    given: dict[str, Any] = {}  # options left out keep fashion_mnist_data.run's defaults
    if args.source is not None:
        given["source"] = Path(args.source)
    if args.sets is not None:
        given["sets"] = args.sets.split(",")
    fashion_mnist_data.run(Path(args.target), per_class=args.per_class, force=args.force, **given)


def cmd_stage(args: argparse.Namespace) -> None:
    """``imgpipe <stage>``: the declared stage on the paths given, DVC's paths by default."""
    from imgpipe.model.distribute import is_chief
    from pipelines import runner
    from pipelines.stages import STAGES

    stage = STAGES[args.command]
    if stage.name == "finetune":  # a TrainJob pod: TensorFlow's cluster from JobSet's env
        from imgpipe.model.trainjob import set_tf_config

        set_tf_config()
    params = _params(args)
    paths = runner.default_paths(stage, params)
    paths.update({n: Path(v) for n in paths if (v := getattr(args, n, None)) is not None})
    # A non-chief worker of a multi-worker job trains beside the chief, which alone writes.
    if not is_chief():
        summary = runner.execute_as_worker(stage, paths, params)
    else:
        summary = runner.execute(stage, paths, params, whole_run=not args.stage_log)
    print(runner.describe(stage, summary))


def cmd_seeds(args: argparse.Namespace) -> None:
    """Run the recipe over several training seeds (DVC experiments), record the parent MLflow
    run with each figure's mean, sd, min and max, and print them."""
    from pipelines import seeds

    summary = seeds.run_recipe(
        args.seeds,
        through=args.through,
        overrides=args.set or [],
        name=args.name,
        out=args.out,
        seed_keys=args.seed_keys or seeds.SEED_KEYS,
    )
    print(seeds.describe(summary))
    if args.out:
        print(f"summary: {args.out}; MLflow parent run {summary['parent_run']}")


def cmd_crossval(args: argparse.Namespace) -> None:
    """Cross-validate the recipe over the non-test images (DVC experiments through finetune),
    record the parent MLflow run and the out-of-fold predictions, and print the figures."""
    from pipelines import crossval, seeds

    summary = crossval.run_crossval(
        args.folds,
        args.seeds,
        overrides=args.set or [],
        name=args.name,
        out=args.out,
        seed_keys=args.seed_keys or seeds.SEED_KEYS,
        apply=args.apply,
    )
    print(crossval.describe(summary))
    print(f"out-of-fold predictions: {summary['predictions']}")
    if args.out:
        print(f"summary: {args.out}; MLflow parent run {summary['parent_run']}")
    if args.apply:
        print(
            "params.yaml: finetune.decision set; `dvc repro` now trains the served model on "
            "every non-test image with it (finetune.train_on)"
        )


def cmd_growing_data(args: argparse.Namespace) -> None:
    """The growing-data scenario through DVC or kfp.local; print its claims."""
    from imgpipe.core.params import with_sets
    from pipelines import growing

    report = growing.run(
        Path(args.source),
        Path(args.work),
        orchestrator=args.orchestrator,
        params=with_sets(_params(args), args.set or []),
        new_fraction=args.new_fraction,
        corrupt_fraction=args.corrupt_fraction,
        seed=args.seed,
        out=args.out,
    )
    for version, record in report["versions"].items():
        print(f"{version}: {record['images']} images {record['splits']} in {record['seconds']} s")
    for claim in report["claims"]:
        print(f"- {claim}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgpipe", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, func: Callable[[argparse.Namespace], None], help: str, *, params: bool = True
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        if params:
            p.add_argument("--params", default="params.yaml", help="the pipeline's parameters")
        return p

    p = add(
        "sample-data",
        cmd_sample_data,
        "write the offline ELPV sample data as class folders",
        params=False,
    )
    p.add_argument("target", nargs="?", default="data")
    p.add_argument("--force", action="store_true", help="replace a folder that holds other data")

    p = add(
        "fashion-mnist-data",
        cmd_fashion_mnist_data,
        "write Fashion-MNIST (Debian dataset-fashion-mnist) as class folders of PNG files",
        params=False,
    )
    p.add_argument("target", nargs="?", default="data")
    p.add_argument(
        "--source",
        help="folder of the four idx files (default: where the Debian package puts them)",
    )
    p.add_argument(
        "--sets",
        help="t10k (10,000 images, the default), train (60,000) or train,t10k (kept as "
        "train/ and test/)",
    )
    p.add_argument(
        "--per-class", type=int, help="the first N images of each class of each set (default: all)"
    )
    p.add_argument("--force", action="store_true", help="replace an existing folder")

    from pipelines.stages import STAGES

    for stage in STAGES.values():
        p = add(stage.name, cmd_stage, stage.help)
        for name in stage.inputs:
            p.add_argument(
                f"--{name.replace('_', '-')}",
                metavar="PATH",
                help=f"input (default: {stage.input_path(name)})",
            )
        for name, output in stage.outputs.items():
            p.add_argument(
                f"--{name.replace('_', '-')}",
                metavar="PATH",
                help=f"output (default: {output.path})",
            )
        p.add_argument(
            "--stage-log",
            action="store_true",
            help="log only this stage's params and figures, as a pipeline step into a store of "
            "its own (a Kubeflow Trainer pod); by default the run speaks for the whole pipeline",
        )

    p = add(
        "runs", cmd_runs, "the MLflow runs as an ablation table (validation figures)", params=False
    )
    p.add_argument("--experiment", help="MLflow experiment (default: the pipeline's)")

    p = add(
        "seeds",
        cmd_seeds,
        "run a recipe over several training seeds: mean ± sd of its figures, in MLflow",
        params=False,
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2], metavar="N")
    p.add_argument(
        "--through",
        default="finetune",
        help="last stage each seed runs: finetune (validation only, for choosing a recipe) or "
        "evaluate (test figures too, for the final one)",
    )
    p.add_argument("-S", "--set", action="append", metavar="KEY=VALUE", help="as dvc exp run -S")
    p.add_argument("--name", help="the recipe's name (default: recipe-<time>)")
    p.add_argument("--out", type=Path, help="write the summary as JSON (e.g. metrics/seeds.json)")
    p.add_argument(
        "--seed-keys",
        nargs="+",
        metavar="SECTION.KEY",
        help="the params each seed sets (default: train.seed finetune.seed); finetune.seed "
        "alone keeps the frozen phase and varies only fine-tuning",
    )

    p = add(
        "crossval",
        cmd_crossval,
        "compare a recipe by k-fold cross-validation over the non-test images: mean ± sd over "
        "folds and seeds, out-of-fold predictions, the decision fitted on them",
        params=False,
    )
    p.add_argument("--folds", type=int, default=5, metavar="K")
    p.add_argument("--seeds", type=int, nargs="+", default=[42], metavar="N")
    p.add_argument("-S", "--set", action="append", metavar="KEY=VALUE", help="as dvc exp run -S")
    p.add_argument("--name", default="crossval", help="the recipe's name (default: crossval)")
    p.add_argument(
        "--out", type=Path, help="write the summary as JSON (e.g. metrics/crossval.json)"
    )
    p.add_argument(
        "--seed-keys",
        nargs="+",
        metavar="SECTION.KEY",
        help="the params each seed sets (default: train.seed finetune.seed)",
    )
    p.add_argument(
        "--apply",
        action="store_true",
        help="set params.yaml's finetune.decision to the decision fitted out-of-fold, for the "
        "production run on every non-test image",
    )

    p = add(
        "growing-data",
        cmd_growing_data,
        "run the pipeline on three versions of a data set (v1; v2 = v1 + new images; v3 = v2 "
        "with a class partly relabelled) and check what the split and the gate do",
    )
    p.add_argument("source", help="a folder of class folders (e.g. data)")
    p.add_argument("work", help="a new folder for the versions, the runs and their registry")
    p.add_argument("--orchestrator", choices=["dvc", "kfp"], default="dvc")
    p.add_argument("--profile", help="profiles/<name>.yaml overrides, e.g. quick")
    p.add_argument("-S", "--set", action="append", metavar="KEY=VALUE", help="as dvc exp run -S")
    p.add_argument("--new-fraction", type=float, default=0.1, help="v2's new images, of v1's")
    p.add_argument(
        "--corrupt-fraction", type=float, default=0.25, help="of the largest class, in v3"
    )
    p.add_argument("--seed", type=int, default=0, help="draws the new and relabelled images")
    p.add_argument("--out", type=Path, help="write the report as JSON")

    p = add("profile", cmd_profile, "print a profile's overrides as `dvc exp run -S` flags")
    p.add_argument("name", help="profiles/<name>.yaml, e.g. full, or a path")

    p = add("ui", cmd_ui, "MLflow's UI on 127.0.0.1, opened on the headline view", params=False)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)

    p = add("predict", cmd_predict, "classify image files on a TF Serving (or local) server")
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

    p = add(
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

    p = add(
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

    p = add(
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
        choices=("none", "dvc", "kfp-local", "kfp"),
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

    pipeline = sub.add_parser("pipeline", help="the Kubeflow pipeline: compile, run, schedule")
    psub = pipeline.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")

    def padd(
        name: str, func: Callable[[argparse.Namespace], None], help: str
    ) -> argparse.ArgumentParser:
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

    p = add("fetch-model", cmd_fetch_model, "copy a registry alias's SavedModel to a base path")
    p.add_argument("--model", required=True, help="registered model = served model name")
    p.add_argument("--alias", default="champion")
    p.add_argument("--base", default="models", help="TF Serving base path root")

    p = add(
        "mlflow-access",
        cmd_mlflow_access,
        "as MLflow's admin (MLFLOW_TRACKING_USERNAME/PASSWORD): create or update the pipeline's "
        "account and the read-only users, give the pipeline EDIT on its experiment and model",
    )
    p.add_argument(
        "--pipeline-account",
        required=True,
        metavar="DIR",
        help="folder with the files username and password (the mounted Secret mlflow-pipeline)",
    )
    p.add_argument(
        "--readers",
        metavar="DIR",
        help="folder with a file per read-only user (its password)",
    )
    p.add_argument("--model", help="registered model (default: serving.model_name)")
    p.add_argument("--experiment", help="MLflow experiment (default: the pipeline's)")

    add("summary", cmd_summary, "print the pipeline's metrics and where MLflow is")
    return parser


OWN_PACKAGES = ("imgpipe", "components", "pipelines", "serving")


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
