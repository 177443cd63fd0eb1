"""The MLflow side of ``imgpipe``: the accounts (``mlflow-access``), the UI, the table of runs
and recipes (``runs``) and the pipeline's summary (``summary``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from commands.common import Subcommands, add_command
from commands.common import params_of as _params
from imgpipe.core.errors import InputError


def cmd_mlflow_access(args: argparse.Namespace) -> None:
    """As MLflow's admin: the pipeline's account, the read-only users and the pipeline's grants
    (``imgpipe.tracking.access``); what the deployment's Job runs after each change of the
    Secrets."""
    import mlflow

    from imgpipe.core.params import ServingParams, section
    from imgpipe.tracking import access, registry
    from imgpipe.tracking.runs import ensure_experiment, experiment_name, tracking_uri

    pipeline = access.read_accounts(Path(args.pipeline_account))
    if set(pipeline) != {"username", "password"}:
        raise InputError(
            f"{args.pipeline_account}: expected the files username and password (a basic-auth "
            f"Secret), found {sorted(pipeline)}"
        )
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    model = args.model or section(ServingParams, "serving", _params(args)).model_name
    experiment = args.experiment or experiment_name()
    # Made by the admin, so that no other account takes their names first.
    with access.needs("the admin's account", f"create {experiment!r} and {model!r} on {uri}"):
        experiment_id = ensure_experiment(mlflow, Path.cwd(), experiment)
        registry.ensure_model(registry.client(), model)
    summary = access.provision(
        uri,
        experiment_id=experiment_id,
        model=model,
        pipeline=(pipeline["username"], pipeline["password"]),
        readers=access.read_accounts(Path(args.readers)) if args.readers else {},
    )
    print(json.dumps(summary, indent=2))


def cmd_ui(args: argparse.Namespace) -> None:
    """MLflow's UI on this project's store, opened on the experiment's headline view."""

    import mlflow

    from imgpipe.tracking.runs import ensure_experiment, headline_url, tracking_uri

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    experiment_id = ensure_experiment(mlflow, Path.cwd())  # its view tags, also when older
    url = headline_url(f"http://{args.host}:{args.port}", experiment_id)
    print(f"ui: the runs with their headline columns: {url}", flush=True)
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow_bin), "ui", "--backend-store-uri", uri]
    os.execv(command[0], [*command, "--host", args.host, "--port", str(args.port)])


def cmd_runs(args: argparse.Namespace) -> None:
    """The experiment's runs as a markdown table of validation figures and training time:
    the ablation table of a set of ``dvc exp run`` experiments (test figures stay out of it:
    recipes are chosen on validation)."""
    from mlflow.tracking import MlflowClient

    from imgpipe.evaluation.metrics import correction_text
    from imgpipe.tracking.runs import experiment_name, tracking_uri
    from pipelines import seeds

    client = MlflowClient(tracking_uri())
    name = args.experiment or experiment_name()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise SystemExit(f"no MLflow experiment '{name}' at {tracking_uri()}")
    runs = client.search_runs(
        [experiment.experiment_id], max_results=1000, order_by=["attributes.start_time ASC"]
    )
    print(
        "| run | changed from the baseline | frozen val acc | fine-tuned val acc (argmax) | gain | "
        "fitted decision's val acc | train + finetune time |"
    )
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        metrics, tags = run.data.metrics, run.data.tags
        if "finetune.val_accuracy" not in metrics or "frozen.val_accuracy" not in metrics:
            continue
        frozen, tuned = metrics["frozen.val_accuracy"], metrics["finetune.val_accuracy"]
        balanced = [
            f" ({metrics[f'{phase}.val_balanced_accuracy']:.4f})"
            if f"{phase}.val_balanced_accuracy" in metrics
            else ""
            for phase in ("frozen", "finetune")
        ]
        times = [
            f"{metrics[f'{s}.wall_seconds']:.0f} s" if f"{s}.wall_seconds" in metrics else "reused"
            for s in ("train", "finetune")
        ]
        tuned_metrics = {k.removeprefix("finetune."): v for k, v in metrics.items()}
        corrected = correction_text(tuned_metrics) or "none (objective accuracy: the argmax)"
        print(
            f"| {run.info.run_name} | {tags.get('params.changed', '')} | {frozen:.4f}"
            f"{balanced[0]} | {tuned:.4f}{balanced[1]} | {tuned - frozen:+.4f} | {corrected} | "
            f"{' + '.join(times)} |"
        )
    parents = [r for r in runs if seeds.PARENT_TAG in r.data.tags]
    recipes = [r for r in parents if seeds.FOLDS_TAG not in r.data.tags]
    folded = [r for r in parents if seeds.FOLDS_TAG in r.data.tags]
    if recipes:
        print(seeds.recipe_table(recipes))
    if folded:  # a spread over folds is not one over seeds: a table of its own
        print(seeds.recipe_table(folded, over="folds and seeds"))


def cmd_summary(args: argparse.Namespace) -> None:
    """What `make demo` prints at the end: data, accuracy per phase, artifacts, the MLflow run."""
    from imgpipe.evaluation.metrics import correction_text
    from imgpipe.export.savedmodel import TFLITE_FILES
    from imgpipe.tracking.runs import experiment_name, tracking_uri

    def load(name: str) -> dict:
        path = Path("metrics") / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    ingest, validate, train, finetune = (
        load(n) for n in ("ingest", "validate", "train", "finetune")
    )
    if ingest:
        splits = ", ".join(f"{s} {c['total']}" for s, c in ingest["splits"].items())
        print(
            f"data:      {ingest['images']} images ({splits}), {ingest['quarantined']} "
            "quarantined -> outputs/ingest/"
        )
    if validate:
        print(
            f"validate:  {'passed' if validate['success'] else 'FAILED'}, "
            f"{validate['failed_warnings']} warning(s) -> outputs/validate/data_docs/index.html"
        )
    for name, metrics in (("frozen", train.get("frozen")), ("finetune", finetune.get("finetune"))):
        if metrics:
            corrected = correction_text(metrics)
            corrected = f", fitted decision {corrected}" if corrected else ""
            if "val_accuracy" in metrics:
                seen = f"val accuracy {metrics['val_accuracy']:.4f}"
            else:  # the production run: nothing held out (its recipe was cross-validated)
                seen = (
                    f"trained on {metrics['trained_on']} ({metrics['training_images']} images, "
                    "none held out; cross-validated in metrics/crossval.json)"
                )
            print(
                f"{name + ':':<10} {seen} ({metrics['epochs']} epochs){corrected} -> "
                f"outputs/{'train' if name == 'frozen' else name}/model.keras"
            )

    evaluation, exported, pushed = (load(n) for n in ("evaluate", "export", "push"))
    if evaluation:
        from imgpipe.evaluation.metrics import decision_text

        test = evaluation["test"]
        print(
            f"test:      {decision_text(evaluation)}; macro-F1 {test['macro_f1']:.4f}, ECE "
            f"{test['ece']:.3f} ({test['images']} images) -> outputs/evaluate/"
        )
        print(f"gate:      {'blessed' if evaluation['blessed'] else 'NOT blessed'}: ", end="")
        print(";\n           ".join(evaluation.get("checks", [])))
    if exported:
        sizes, parity = exported["sizes_mb"], exported["parity"]
        tflite = ", ".join(
            f"{kind} {sizes[f'tflite_{kind}']:.1f} MB (top-1 agreement "
            f"{parity[f'tflite_{kind}']['top1_agreement']:.3f})"
            for kind in TFLITE_FILES
            if f"tflite_{kind}" in parity
        )
        print(
            f"export:    SavedModel {sizes['saved_model']:.1f} MB; TFLite {tflite}; "
            "-> outputs/export/ (model_card.md)"
        )
    if pushed:
        name, version = pushed["registered_model"], pushed["version"]
        if pushed.get("same_as_champion"):
            print(
                f"registry:  {name} v{version} is champion and has these very weights: not "
                "registered again, no decision counted on the test set"
            )
        elif pushed["blessed"]:
            print(
                f"registry:  {name} v{version} is champion; TF Serving version "
                f"{pushed['serving_version']} at {pushed['pushed_to']}"
            )
        else:
            print(
                f"registry:  {name} v{version} NOT blessed (challenger only, not pushed); "
                f"champion stays v{pushed['previous_champion']}: see "
                "outputs/evaluate/blessing.json"
            )

    experiment = experiment_name()
    print(f"MLflow:    experiment '{experiment}' at {tracking_uri()}; `make ui` to browse")
    print("compare:   dvc metrics show; dvc plots show; dvc exp run -S train.learning_rate=3e-4")


def register(sub: Subcommands) -> None:
    p = add_command(
        sub,
        "runs",
        cmd_runs,
        "the MLflow runs as an ablation table (validation figures)",
        params=False,
    )
    p.add_argument("--experiment", help="MLflow experiment (default: the pipeline's)")

    p = add_command(
        sub, "ui", cmd_ui, "MLflow's UI on 127.0.0.1, opened on the headline view", params=False
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)

    p = add_command(
        sub,
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

    add_command(sub, "summary", cmd_summary, "print the pipeline's metrics and where MLflow is")
