"""``imgpipe monitor``: the served champion's logged traffic since the last check, against its
reference profile; labelled feedback against its test accuracy; and, when a threshold is
crossed, a retraining run that the blessing gate judges as always.

Each check reads the closed request-log files it has not read before (``monitor.directory``
keeps which), writes an HTML report and logs its figures into the MLflow experiment
``monitoring``, one run per served version, one step per check: drift over time is one chart
there. Below ``monitor.min_requests`` logged images nothing is decided and the files stay
unread. A retraining starts at most once while one is open:

- ``--retrain none`` (the default) prints the commands;
- ``--retrain dvc`` appends the labelled feedback to the data folder as a new version
  (imgpipe.data.feedback: labels checked against the champion's classes, nothing written outside the
  data folder, duplicates skipped or held for review, all or nothing) and runs ``dvc add`` and
  ``dvc repro``;
- ``--retrain kfp-local`` runs the Kubeflow pipeline with kfp.local on that data version;
- ``--retrain kfp`` creates a run of the Kubeflow pipeline on a cluster (``--kfp-host``); the
  retraining stays open until that run ends (the monitoring CronJob in infra/k8s runs this).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imgpipe.core.errors import InputError
from imgpipe.core.fileio import atomic_path, write_json_atomic
from pipelines.cli_common import LOCAL_SHARED
from pipelines.cli_common import params_of as _params

EXPERIMENT = "monitoring"
STATE = "state.json"
KFP_DONE = {"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED", "CANCELLED"}


def read_state(directory: Path) -> dict[str, Any]:
    path = directory / STATE
    state = json.loads(path.read_text()) if path.is_file() else {}
    return {"read": [], "checks": 0, "runs": {}, "retraining": None, **state}


def write_state(directory: Path, state: dict[str, Any]) -> None:
    from imgpipe.core.fileio import write_json_atomic

    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / STATE, state)


def decide(
    state: dict[str, Any], enough: bool, reasons: list[str], version: int, minimum: int
) -> tuple[str, bool]:
    """What this check does, in words, and whether it starts a retraining: never below the
    minimum of requests, never without a reason, never while one started against this champion
    version is still open."""
    if not enough:
        return f"no verdict: fewer than {minimum} logged requests since the last check", False
    if not reasons:
        return "no drift, no accuracy drop: nothing to do", False
    open_ = state.get("retraining")
    if open_ and open_.get("against_version") == version and not open_.get("finished"):
        return (
            f"retraining already open since {open_['started']} ({open_['how']} "
            f"{open_.get('run', '')}): not starting another",
            False,
        )
    return "retraining: " + "; ".join(reasons), True


def _champion(args: argparse.Namespace, params: dict[str, Any]) -> tuple[Path, int, float | None]:
    """The served champion's SavedModel, its serving version and its test accuracy."""
    from imgpipe.core.params import ServingParams, section
    from imgpipe.tracking import registry

    if args.saved_model:
        if not args.saved_model.name.isdigit():
            raise InputError(f"--saved-model {args.saved_model}: give a <model>/<version>/ folder")
        return args.saved_model, int(args.saved_model.name), None
    serving = section(ServingParams, "serving", params)
    holder = registry.champion(serving.model_name)
    if holder is None:
        raise InputError(f"no champion of {serving.model_name!r} in the registry: run the pipeline")
    saved_model = registry.fetch(serving.model_name, "champion", Path(serving.model_base_path))
    accuracy = None
    if holder.run_id:
        accuracy = registry.client().get_run(holder.run_id).data.metrics.get("test.accuracy")
    return saved_model, int(saved_model.name), accuracy


def _feedback(
    source: Path, served: Any, classes: list[str], new_classes: list[str], max_pixels: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The labelled feedback scored by ``served`` (the loaded SavedModel), and its summary:
    labels checked against the champion's ``classes`` (and ``new_classes``) before anything is
    scored; images of a new class are not counted in the accuracy."""
    from imgpipe.data import feedback
    from imgpipe.monitoring import scoring

    items = scoring.discover(source, labels_from_folders=source.is_dir())
    if not any(item.label for item in items):
        raise InputError(f"--feedback {source}: no labels (class folders, or a label column)")
    feedback.check_labels((item.label for item in items), classes, new_classes)
    rows = scoring.score(
        items, scoring.saved_model_predictor(served, 32), max_pixels=max_pixels, batch_size=32
    )
    for row, item in zip(rows, items, strict=True):
        row["path"] = item.path
    known = [r for r in rows if r.get("label") is None or r["label"] in classes]
    summary = scoring.summarise(known)
    summary["new_class_images"] = len(rows) - len(known)
    return rows, summary


def _feedback_plan(rows: list[dict[str, Any]], source: Path) -> dict[str, Any]:
    """What appending ``rows`` to ``source`` would do, counted and named for the report."""
    from imgpipe.data import feedback

    if not source.is_dir():
        raise InputError(f"data.source {source} is no folder of class folders: add feedback there")
    planned = feedback.plan(rows, feedback.data_images(source))
    return {
        "plan": planned,
        **{f"feedback_{k}": v for k, v in planned.counts().items()},
        "feedback_skipped_files": [f"{name}: {why}" for name, why in planned.skipped],
        "feedback_for_review": [
            f"{name} (labelled {label}) is {there} (labelled {was}) in the data"
            for name, label, there, was in planned.review
        ],
    }


def _retrain(
    args: argparse.Namespace, params: dict[str, Any], planned: Any, stamp: str
) -> dict[str, Any]:
    """Start the retraining ``args.retrain`` names, after appending ``planned`` feedback
    (imgpipe.data.feedback.FeedbackPlan, or None); what started (and, when it ran here, how it
    ended)."""
    from imgpipe.core.params import DataParams, ServingParams, section
    from imgpipe.data import feedback

    source = Path(section(DataParams, "data", params).source)
    name = section(ServingParams, "serving", params).model_name
    commands = [["dvc", "add", str(source)], ["dvc", "repro"]]
    if args.retrain == "none":
        steps = [" ".join(c) for c in commands]
        if planned is not None and planned.copies:
            steps.insert(
                0,
                f"imgpipe monitor --feedback ... --retrain dvc appends {len(planned.copies)} "
                f"images into {source}/<label>/feedback-{stamp}/",
            )
        return {"how": "commands", "commands": steps}
    copied = len(feedback.append(planned, source, stamp)) if planned is not None else 0
    started: dict[str, Any] = {"how": args.retrain, "feedback_images": copied}
    if args.retrain == "dvc":
        for command in commands:
            if command[1] == "add" and not Path(f"{source}.dvc").is_file():
                continue
            done = subprocess.run(command, check=False)
            if done.returncode:
                return {**started, "finished": True, "failed": " ".join(command)}
        pushed = json.loads(Path("metrics/push.json").read_text())
        return {**started, "finished": True, **_registered(name, pushed["version"], pushed)}
    from imgpipe.tracking.runs import tracking_uri
    from pipelines.kubeflow import compile_to, run_local

    arguments: dict[str, str] = {
        "source": str(source.resolve()),
        "data_version": f"feedback-{stamp}",
        "mlflow_tracking_uri": args.mlflow_tracking_uri or tracking_uri(),
    }
    if args.retrain == "kfp-local":
        run_local(
            params,
            Path(args.pipeline_root).resolve() / stamp,
            shared_volume=str(Path(args.shared_volume or LOCAL_SHARED).resolve()),
            reused_from=None,
            **arguments,
        )
        latest = max(int(v.version) for v in _client().search_model_versions(f"name = '{name}'"))
        return {**started, "finished": True, **_registered(name, latest, None)}
    import tempfile

    import kfp

    if args.shared_volume:
        arguments["shared_volume"] = args.shared_volume
    client = kfp.Client(host=args.kfp_host)
    with tempfile.TemporaryDirectory() as tmp:
        run = client.create_run_from_pipeline_package(
            str(compile_to(params, Path(tmp) / "pipeline.yaml")),
            arguments=arguments,
            run_name=f"retrain-{stamp}",
            experiment_name=args.kfp_experiment,
            enable_caching=False,
        )
    return {**started, "run": run.run_id}


def _client() -> Any:
    from imgpipe.tracking import registry

    return registry.client()


def _registered(name: str, version: int, pushed: dict[str, Any] | None) -> dict[str, Any]:
    model = _client().get_model_version(name, str(version))
    result = {"run": model.run_id, "registered_version": int(version)}
    if pushed is not None:
        result["blessed"] = bool(pushed.get("blessed"))
    else:
        result["blessed"] = "champion" in (model.aliases or [])
    return result


def _still_open(args: argparse.Namespace, retraining: dict[str, Any] | None) -> None:
    """Close a cluster retraining whose run has ended."""
    if not retraining or retraining.get("finished") or retraining.get("how") != "kfp":
        return
    import kfp

    state = kfp.Client(host=args.kfp_host).get_run(retraining["run"]).state
    if str(state).upper() in KFP_DONE:
        retraining.update(finished=True, state=str(state))


def _history(checks: Path, key: str) -> list[dict[str, Any]]:
    """The earlier checks of model version ``key``, oldest first (their summary.json)."""
    found = []
    for path in sorted(checks.glob("*/summary.json")):
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a check that was cut short: no point on the trend
        if summary.get("model") == key and "step" in summary:
            found.append(summary)
    return found


def _training_note(retraining: dict[str, Any] | None) -> str | None:
    """The monitoring run's description (markdown, shown by MLflow's UI): a link to the
    training run each retraining registered, where MLflow knows it."""
    if not retraining or not retraining.get("registered_version") or not retraining.get("run"):
        return None
    try:
        run = _client().get_run(str(retraining["run"]))
    except Exception:  # a Kubeflow run id, or a run this server does not hold
        return None
    link = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    return (
        f"Check {retraining['check']} started a retraining ({retraining['how']}): "
        f"[its training run]({link}), registered as version {retraining['registered_version']}."
    )


def _log_check(
    state: dict[str, Any],
    key: str,
    step: int,
    figures: dict[str, float],
    report: Path,
    tags: dict[str, str],
    retraining: dict[str, Any] | None = None,
) -> str:
    """This check's figures at ``step`` of the version's monitoring run (made on first use),
    in the experiment ``monitoring`` (a model experiment, like the training one); a
    retraining's training run is linked from the run's description."""
    import mlflow

    from imgpipe.tracking.runs import EXPERIMENT_KIND, tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.set_experiment(EXPERIMENT)
    if experiment.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    note = _training_note(retraining)
    if note:
        previous = state.setdefault("notes", {}).get(key, "")
        tags["mlflow.note.content"] = f"{previous}\n\n{note}".strip()
        state["notes"][key] = tags["mlflow.note.content"]
    run_id = state["runs"].get(key)
    with mlflow.start_run(
        run_id=run_id,
        run_name=None if run_id else f"monitor {key}",
        experiment_id=None if run_id else experiment.experiment_id,
    ) as run:
        mlflow.log_metrics(figures, step=step)
        mlflow.set_tags(tags)
        mlflow.log_artifact(str(report), f"checks/{step}")
        return str(run.info.run_id)


LOCK = ".lock"
"""In ``monitor.directory``: held by the one check running at a time."""


@contextlib.contextmanager
def one_check_at_a_time(directory: Path) -> Iterator[None]:
    """Hold ``directory``'s lock for the whole check; a second check started meanwhile (two
    crons, a cron and a person) is refused at once, before it reads or writes anything."""
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InputError(
                f"another imgpipe monitor is checking (it holds {directory / LOCK}): its "
                "verdict, files read and any retraining are its own; run this one later"
            ) from None
        yield
    finally:
        os.close(fd)


def cmd_monitor(args: argparse.Namespace) -> None:
    from imgpipe.core.params import MonitorParams, section

    directory = Path(section(MonitorParams, "monitor", _params(args)).directory)
    with one_check_at_a_time(directory):
        _check(args)


def _check(args: argparse.Namespace) -> None:
    import numpy as np

    from imgpipe.core.params import (
        MonitorParams,
        RequestLogParams,
        ServingParams,
        ValidateParams,
        section,
    )
    from imgpipe.export.savedmodel import SavedModelClassifier
    from imgpipe.monitoring import report as report_page
    from imgpipe.monitoring.reference import read_reference
    from imgpipe.monitoring.traffic import (
        check_traffic,
        feedback_check,
        read_traffic,
        reasons_to_retrain,
    )

    params = _params(args)
    monitor = section(MonitorParams, "monitor", params)
    name = section(ServingParams, "serving", params).model_name
    log_dir = Path(args.log_dir or section(RequestLogParams, "request_log", params).directory)
    directory = Path(monitor.directory)
    state = read_state(directory)
    saved_model, version, champion_accuracy = _champion(args, params)
    served = SavedModelClassifier(saved_model)
    reference = read_reference(saved_model)
    step = state["checks"] + 1
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    out = directory / "checks" / f"{step:04d}"

    traffic = read_traffic(
        log_dir, name, version, state["read"], max_requests=monitor.max_requests, seed=step
    )
    check = check_traffic(
        traffic,
        reference,
        served.embed_bytes,
        monitor,
        section(ValidateParams, "validate", params),
        out / "data_docs",
        seed=step,
    )
    feedback: dict[str, Any] = {}
    planned = None
    if args.feedback:
        from imgpipe.core.params import DataParams, IngestParams

        rows, summary = _feedback(
            Path(args.feedback),
            served,
            [str(c) for c in reference.class_names],
            args.new_class or [],
            section(IngestParams, "ingest", params).max_pixels,
        )
        feedback = feedback_check(summary, champion_accuracy, monitor)
        feedback["new_class_images"] = summary["new_class_images"]
        source = Path(section(DataParams, "data", params).source)
        if rows and source.is_dir():
            feedback.update(_feedback_plan(rows, source))
            planned = feedback.pop("plan")
    reasons = reasons_to_retrain(check, feedback)
    _still_open(args, state["retraining"])
    decision, start = decide(
        state,
        check["enough"] or bool(feedback.get("accuracy_drop")),
        reasons,
        version,
        monitor.min_requests,
    )
    retraining = None
    if start:
        retraining = {
            "started": stamp,
            "against_version": version,
            "check": step,
            "reasons": reasons,
            "how": args.retrain,
        }
        if args.retrain != "none":
            state["retraining"] = retraining
            write_state(directory, state)  # open before it runs: a crash leaves it open
        retraining.update(_retrain(args, params, planned, stamp))
        if args.retrain != "none":
            state["retraining"] = retraining
        decision += f" -> started: {report_page.started_text(retraining)}"

    key = f"{name}/{version}"
    summary = {
        "step": step,
        "checked_at": time.time(),
        "model": key,
        "check": {k: v for k, v in check.items() if k != "embeddings"},
        "feedback": feedback,
        "decision": decision,
        "retraining": retraining,
    }
    history = [*_history(directory / "checks", key), summary]
    page = report_page.render(
        f"{name} v{version}: check {step}",
        reference,
        check,
        feedback,
        reasons,
        retraining,
        history,
        traffic.encoded,
        np.stack(traffic.probabilities) if traffic.probabilities else np.zeros((0, 0)),
    )
    report = out / "report.html"
    with atomic_path(report) as staged:
        staged.write_text(page, encoding="utf-8")
    figures = {
        k: float(v)
        for k, v in {**check, **feedback}.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "files"
    }
    figures.update(
        embedding_drift=float(bool(check.get("embedding_drift"))),
        prediction_drift=float(bool(check.get("prediction_drift"))),
        input_failures=float(len(check.get("input_failures", []))),
        retraining_started=float(start and args.retrain != "none"),
    )
    tags = {"model": name, "version": str(version), f"decision.{step}": decision[:5000]}
    if retraining and retraining.get("run"):
        tags[f"retraining.{step}"] = str(retraining["run"])
    state["runs"][key] = _log_check(state, key, step, figures, report, tags, retraining)
    done = set(traffic.files) if check["enough"] else set(traffic.quarantined)
    state["read"] = sorted(set(state["read"]) | done)  # a corrupt file is never read again
    state.setdefault("quarantined", {}).update(traffic.quarantined)
    state["checks"] = step
    write_state(directory, state)
    write_json_atomic(out / "summary.json", summary)
    print(f"monitor: {name} v{version}, {check['requests']} logged images; {decision}")
    for command in (retraining or {}).get("commands", []):
        print(f"monitor: to retrain: {command}")
    for reason in check.get("input_failures", []):
        print(f"monitor: input check failed: {reason}")
    for path, why in traffic.quarantined.items():
        print(
            f"monitor: log file quarantined (read up to its bad record, never again): {path}: {why}"
        )
    for line in feedback.get("feedback_skipped_files", []):
        print(f"monitor: feedback not appended: {line}")
    for line in feedback.get("feedback_for_review", []):
        print(f"monitor: feedback held for review: {line}")
    print(f"monitor: report {report}; MLflow experiment {EXPERIMENT!r}, run {state['runs'][key]}")
