"""One ``imgpipe monitor`` check: the served champion's logged traffic since the last check,
against its reference profile; labelled feedback against its test accuracy; and, when a
threshold is crossed, a retraining through the orchestrator the caller hands in (a
``Retrainer``: ``pipelines.retrain.Retraining`` for DVC and Kubeflow), which the blessing gate
judges as always.

Each check reads the closed request-log files it has not read before (``monitor.directory``
keeps which), writes an HTML report (``report``) and logs its figures into the MLflow
experiment ``monitoring``, one run per served version, one step per check: drift over time is
one chart there. Below ``monitor.min_requests`` logged images nothing is decided and the files
stay unread. A retraining starts at most once while one is open. Feedback is appended to the
data by ``imgpipe.data.feedback``: labels checked against the champion's classes, nothing
written outside the data folder, duplicates skipped or held for review, all or nothing.

    with one_check_at_a_time(directory):
        outcome = run_check(params, Retraining("dvc"), feedback_source=Path("labelled/"))
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from imgpipe.core.errors import InputError
from imgpipe.core.fileio import atomic_path, write_json_atomic

EXPERIMENT = "monitoring"
STATE = "state.json"


class Retrainer(Protocol):
    """How a retraining starts: ``how`` names it (``none`` only says what to run)."""

    @property
    def how(self) -> str: ...

    def start(self, params: dict[str, Any], planned: Any, stamp: str) -> dict[str, Any]: ...

    def close_if_done(self, retraining: dict[str, Any] | None) -> None: ...


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a check found, for the person who ran it: the verdict line, the report, the
    check's summary (as written to ``summary.json``) and the lines that need a look."""

    verdict: str
    report: Path
    summary: dict[str, Any]
    notices: list[str]


def read_state(directory: Path) -> dict[str, Any]:
    path = directory / STATE
    state = json.loads(path.read_text()) if path.is_file() else {}
    return {"read": [], "checks": 0, "runs": {}, "retraining": None, **state}


def write_state(directory: Path, state: dict[str, Any]) -> None:
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


def champion(
    params: dict[str, Any], saved_model: Path | None = None
) -> tuple[Path, int, float | None]:
    """The served champion's SavedModel, its serving version and its test accuracy; or
    ``saved_model`` (a ``<model>/<version>/`` folder) and its version, without an accuracy."""
    from imgpipe.core.params import ServingParams, section
    from imgpipe.tracking import registry

    if saved_model:
        if not saved_model.name.isdigit():
            raise InputError(f"{saved_model}: give a <model>/<version>/ folder as the served model")
        return saved_model, int(saved_model.name), None
    serving = section(ServingParams, "serving", params)
    holder = registry.champion(serving.model_name)
    if holder is None:
        raise InputError(f"no champion of {serving.model_name!r} in the registry: run the pipeline")
    saved_model = registry.fetch(serving.model_name, "champion", Path(serving.model_base_path))
    accuracy = None
    if holder.run_id:
        accuracy = registry.client().get_run(holder.run_id).data.metrics.get("test.accuracy")
    return saved_model, int(saved_model.name), accuracy


def score_feedback(
    source: Path, served: Any, classes: list[str], new_classes: list[str], max_pixels: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The labelled feedback scored by ``served`` (the loaded SavedModel), and its summary:
    labels checked against the champion's ``classes`` (and ``new_classes``) before anything is
    scored; images of a new class are not counted in the accuracy."""
    from imgpipe.data import feedback
    from imgpipe.monitoring import scoring

    items = scoring.discover(source, labels_from_folders=source.is_dir())
    if not any(item.label for item in items):
        raise InputError(f"feedback {source}: no labels (class folders, or a label column)")
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


def feedback_plan(rows: list[dict[str, Any]], source: Path) -> dict[str, Any]:
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


def history(checks: Path, key: str) -> list[dict[str, Any]]:
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


def training_note(retraining: dict[str, Any] | None) -> str | None:
    """The monitoring run's description (markdown, shown by MLflow's UI): a link to the
    training run each retraining registered, where MLflow knows it."""
    from imgpipe.tracking import registry

    if not retraining or not retraining.get("registered_version") or not retraining.get("run"):
        return None
    try:
        run = registry.client().get_run(str(retraining["run"]))
    except Exception:  # a Kubeflow run id, or a run this server does not hold
        return None
    link = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    return (
        f"Check {retraining['check']} started a retraining ({retraining['how']}): "
        f"[its training run]({link}), registered as version {retraining['registered_version']}."
    )


def log_check(
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
    note = training_note(retraining)
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


def run_check(
    params: dict[str, Any],
    retraining: Retrainer,
    *,
    log_dir: Path | None = None,
    saved_model: Path | None = None,
    feedback_source: Path | None = None,
    new_classes: Sequence[str] = (),
) -> Outcome:
    """One check (hold ``one_check_at_a_time`` around it): read the traffic logged since the
    last check, check it and any labelled feedback, start a retraining through ``retraining``
    when a threshold is crossed, write the report and the state, log the figures to MLflow."""
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

    monitor = section(MonitorParams, "monitor", params)
    name = section(ServingParams, "serving", params).model_name
    log_dir = Path(log_dir or section(RequestLogParams, "request_log", params).directory)
    directory = Path(monitor.directory)
    state = read_state(directory)
    saved_model, version, champion_accuracy = champion(params, saved_model)
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
    if feedback_source is not None:
        from imgpipe.core.params import DataParams, IngestParams

        rows, summary = score_feedback(
            Path(feedback_source),
            served,
            [str(c) for c in reference.class_names],
            list(new_classes),
            section(IngestParams, "ingest", params).max_pixels,
        )
        feedback = feedback_check(summary, champion_accuracy, monitor)
        feedback["new_class_images"] = summary["new_class_images"]
        source = Path(section(DataParams, "data", params).source)
        if rows and source.is_dir():
            feedback.update(feedback_plan(rows, source))
            planned = feedback.pop("plan")
    reasons = reasons_to_retrain(check, feedback)
    retraining.close_if_done(state["retraining"])
    decision, start = decide(
        state,
        check["enough"] or bool(feedback.get("accuracy_drop")),
        reasons,
        version,
        monitor.min_requests,
    )
    started = None
    if start:
        started = {
            "started": stamp,
            "against_version": version,
            "check": step,
            "reasons": reasons,
            "how": retraining.how,
        }
        if retraining.how != "none":
            state["retraining"] = started
            write_state(directory, state)  # open before it runs: a crash leaves it open
        started.update(retraining.start(params, planned, stamp))
        if retraining.how != "none":
            state["retraining"] = started
        decision += f" -> started: {report_page.started_text(started)}"

    key = f"{name}/{version}"
    summary = {
        "step": step,
        "checked_at": time.time(),
        "model": key,
        "check": {k: v for k, v in check.items() if k != "embeddings"},
        "feedback": feedback,
        "decision": decision,
        "retraining": started,
    }
    checks = [*history(directory / "checks", key), summary]
    page = report_page.render(
        f"{name} v{version}: check {step}",
        reference,
        check,
        feedback,
        reasons,
        started,
        checks,
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
        retraining_started=float(start and retraining.how != "none"),
    )
    tags = {"model": name, "version": str(version), f"decision.{step}": decision[:5000]}
    if started and started.get("run"):
        tags[f"retraining.{step}"] = str(started["run"])
    state["runs"][key] = log_check(state, key, step, figures, report, tags, started)
    done = set(traffic.files) if check["enough"] else set(traffic.quarantined)
    state["read"] = sorted(set(state["read"]) | done)  # a corrupt file is never read again
    state.setdefault("quarantined", {}).update(traffic.quarantined)
    state["checks"] = step
    write_state(directory, state)
    write_json_atomic(out / "summary.json", summary)
    return Outcome(
        f"{name} v{version}, {check['requests']} logged images; {decision}",
        report,
        summary,
        [
            *(f"to retrain: {c}" for c in (started or {}).get("commands", [])),
            *(f"input check failed: {reason}" for reason in check.get("input_failures", [])),
            *(
                f"log file quarantined (read up to its bad record, never again): {path}: {why}"
                for path, why in traffic.quarantined.items()
            ),
            *(
                f"feedback not appended: {line}"
                for line in feedback.get("feedback_skipped_files", [])
            ),
            *(
                f"feedback held for review: {line}"
                for line in feedback.get("feedback_for_review", [])
            ),
        ],
    )
