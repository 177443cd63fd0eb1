"""push: register the export in the MLflow model registry (alias ``challenger``) and, when
evaluate blessed it, make it ``champion`` and copy it to the serving base path as the next
version, the way TF Serving expects to find it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from imgpipe.core.errors import InputError
from imgpipe.core.fileio import write_json_atomic
from imgpipe.core.params import ServingParams
from imgpipe.data.lineage import TRAINED_ON, lineage_digest, read_trained_on
from imgpipe.export.savedmodel import CARD, TFLITE, read_weights_digest, saved_model_dir
from imgpipe.tracking.access import USER_ENV, needs, on_model, on_run
from imgpipe.tracking.registry import (
    ARTIFACT_PATH,
    CHALLENGER,
    CHAMPION,
    SAVED_MODEL,
    PushError,
    alias_holder,
    champion,
    client,
    ensure_model,
)

log = logging.getLogger(__name__)


def run(*, exported: Path, blessing: Path, summary: Path, serving: ServingParams) -> dict[str, Any]:
    """Register ``exported``; promote and push it when ``blessing`` says it is blessed."""
    return register(
        exported,
        saved_model_dir(exported, serving.model_name),
        read_blessing(blessing),
        serving,
        summary,
    )


def metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The registered and the serving version, for MLflow."""
    return {
        f"push.{key}": summary[key]
        for key in ("version", "serving_version", "test_set_decisions")
        if isinstance(summary.get(key), int)
    }


def log_to_mlflow(summary: Path) -> None:
    import mlflow

    mlflow.log_artifact(str(summary), "push")


def describe(summary: dict[str, Any]) -> str:
    name, version = summary["registered_model"], summary["version"]
    if summary.get("same_as_champion"):
        return f"{name} v{version}, the {CHAMPION}, has these weights: nothing registered again"
    reuse = f"; gating decision {summary['test_set_decisions']} on this test set"
    if summary["blessed"]:
        return (
            f"{name} v{version} is {CHAMPION} (aliases {', '.join(summary['aliases'])}); "
            f"serving version {summary['serving_version']} at {summary['pushed_to']}" + reuse
        )
    return (
        f"{name} v{version} registered as {CHALLENGER} only: not blessed, not pushed; "
        f"{CHAMPION} stays v{summary['previous_champion']}" + reuse
    )


def serving_versions(base: Path, model_name: str) -> list[int]:
    """The numeric version folders TF Serving would see under ``<base>/<model_name>``."""
    folder = Path(base) / model_name
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def push_to_serving(saved_model: Path, base: Path, model_name: str) -> Path:
    """Copy ``saved_model`` to ``<base>/<model_name>/<next version>/`` in one rename, so a
    server watching the folder never sees half a model."""
    folder = Path(base) / model_name
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".push-", dir=folder))  # not numeric: servers skip it
    try:
        shutil.copytree(saved_model, staging / "model")
        while True:
            target = folder / str(max(serving_versions(base, model_name), default=0) + 1)
            try:
                os.rename(staging / "model", target)  # fails if a concurrent push took it
                return target
            except OSError:
                if not target.exists():
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def register(
    export_dir: Path,
    saved_model: Path,
    blessing: dict[str, Any],
    serving: ServingParams,
    summary: Path,
) -> dict[str, Any]:
    """Register the candidate (alias ``challenger``); if blessed, push it and make it
    ``champion``. Must run inside an MLflow run (the pipeline's)."""
    import mlflow

    name = serving.model_name
    evaluated_against = (blessing.get("champion") or {}).get("version")
    current = champion(name)
    if blessing["blessed"] and (current.version if current else None) != evaluated_against:
        raise PushError(
            f"the {CHAMPION} of '{name}' is now version {current.version if current else None}, "
            f"but the candidate was compared with version {evaluated_against}: rerun evaluate "
            "(`dvc repro -f evaluate`) so the gate compares with the current champion"
        )
    # export replayed the warmup requests against this SavedModel and digested its weights: push
    # needs no TensorFlow.
    weights = read_weights_digest(export_dir)
    if current is not None and current.tags.get(WEIGHTS_TAG) == weights:
        # the champion itself, exported again (a forced rerun): nothing new to register, and
        # no decision to count on the test set
        log.warning(
            "push: the candidate has the weights of %s version %s: not registered again",
            CHAMPION,
            current.version,
        )
        same: dict[str, Any] = {
            "registered_model": name,
            "version": current.version,
            "same_as_champion": True,
            "blessed": bool(blessing["blessed"]),
            "aliases": [CHAMPION],
            "previous_champion": current.version,
            "pushed_to": None,
            "serving_version": None,
            "test_set_decisions": None,
        }
        write_json_atomic(summary, same)
        return same

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("register() needs an active MLflow run")
    with needs(on_run(run.info.run_id), f"log the model into run {run.info.run_id}"):
        mlflow.log_artifacts(str(saved_model), f"{ARTIFACT_PATH}/{SAVED_MODEL}")
        mlflow.log_artifacts(str(export_dir / TFLITE), f"{ARTIFACT_PATH}/{TFLITE}")
        mlflow.log_artifact(str(export_dir / CARD), ARTIFACT_PATH)
        mlflow.log_artifact(str(export_dir / TRAINED_ON), ARTIFACT_PATH)
    trained_on = read_trained_on(export_dir / TRAINED_ON)

    registry = client()
    ensure_model(registry, name)
    test = blessing["candidate"]
    with needs(on_model(name), f"register a new version of {name!r}"):
        version = registry.create_model_version(
            name,
            source=f"{run.info.artifact_uri}/{ARTIFACT_PATH}",
            run_id=run.info.run_id,
            description=(export_dir / CARD).read_text(encoding="utf-8"),
            tags={
                "blessed": str(blessing["blessed"]).lower(),
                "blessing": "; ".join(c["reason"] for c in blessing["checks"]),
                "test_accuracy": f"{test['accuracy']:.4f}",
                "test_balanced_accuracy": f"{test['balanced_accuracy']:.4f}",
                "trained_on.images": str(len(trained_on)),
                "trained_on.sha256": lineage_digest(trained_on),
                WEIGHTS_TAG: weights,
            },
        )
    number = int(version.version)
    decisions = count_decision(registry, name, number, blessing["test_set"]["sha256"])
    worn = blessing["thresholds"]["max_test_decisions"]
    if decisions > worn:
        log.warning(
            "push: this test set has now made %d gating decisions (evaluate.max_test_decisions "
            "%d): its figures flatter the models chosen on it; grow the data so that new "
            "images join the test split, or hold out a fresh test set",
            decisions,
            worn,
        )
    move_alias(registry, name, CHALLENGER, number, run.info.run_id)
    result: dict[str, Any] = {
        "registered_model": name,
        "version": number,
        "blessed": bool(blessing["blessed"]),
        "aliases": [CHALLENGER],
        "previous_champion": current.version if current else None,
        "pushed_to": None,
        "serving_version": None,
        "test_set_decisions": decisions,
    }
    if blessing["blessed"]:
        target = push_to_serving(saved_model, Path(serving.model_base_path), name)
        with needs(on_model(name), f"tag version {number} of {name!r}"):
            registry.set_model_version_tag(name, str(number), "serving_version", target.name)
        result["champion_move"] = move_alias(registry, name, CHAMPION, number, run.info.run_id)
        result.update(
            aliases=[CHALLENGER, CHAMPION], pushed_to=str(target), serving_version=int(target.name)
        )
        log.info("push: %s version %d is champion, served as %s", name, number, target)
    else:
        log.warning(
            "push: %s version %d is not blessed: not champion, not pushed (%s)",
            name,
            number,
            "; ".join(c["reason"] for c in blessing["checks"] if not c["passed"]),
        )
    mlflow.set_tags(
        {
            "registered_model": f"{name}/{number}",
            "pushed": str(bool(blessing["blessed"])).lower(),
        }
    )
    write_json_atomic(summary, result)
    return result


WEIGHTS_TAG = "weights.sha256"
"""Version tag: the export's ``weights_digest`` of its SavedModel, to know the same model
again."""


DECISIONS_TAG = "gate.decisions."
"""Registered-model tag prefix, then a test set's sha256 (16 hex digits): how many gating
decisions that test set has made."""


def count_decision(registry: Any, name: str, version: int, test_set: str) -> int:
    """Count one more gating decision on ``test_set`` (its ``lineage_digest``) on the
    registered model, and on the version; return the count. Each decision tells the pipeline a
    little about the test images, so a count far above evaluate.max_test_decisions means the
    test figures flatter (docs/evaluation.md: test-set reuse)."""
    key = DECISIONS_TAG + test_set[:16]
    with needs(on_model(name), f"count a gating decision on {name!r}"):
        tags = registry.get_registered_model(name).tags
        count = int(tags.get(key, "0")) + 1
        registry.set_registered_model_tag(name, key, str(count))
        registry.set_model_version_tag(name, str(version), "gate.test_set", test_set[:16])
        registry.set_model_version_tag(name, str(version), "gate.test_set_decisions", str(count))
    return count


def move_alias(registry: Any, name: str, alias: str, version: int, run_id: str) -> dict[str, Any]:
    """Point ``alias`` of model ``name`` at ``version`` and record the move as tags on the
    versions, so the registry's UI answers "why is this version serving": on ``version``,
    ``<alias>.since``, ``<alias>.set_by`` (the MLflow user), ``<alias>.run_id`` (the pushing
    run) and ``<alias>.previous_version``; on the version it replaces, ``<alias>.until`` and
    ``<alias>.replaced_by``. Returns the move, which push also logs."""
    import datetime
    import getpass

    holder = alias_holder(name, alias, registry)
    previous = holder.version if holder else None
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    who = os.environ.get(USER_ENV) or getpass.getuser()
    move = {
        "since": now,
        "set_by": who,
        "run_id": run_id,
        "previous_version": "none" if previous is None else str(previous),
    }
    with needs(on_model(name), f"move alias {alias!r} of {name!r} to version {version}"):
        registry.set_registered_model_alias(name, alias, version)
        for key, value in move.items():
            registry.set_model_version_tag(name, str(version), f"{alias}.{key}", value)
        if previous is not None and previous != version:
            registry.set_model_version_tag(name, str(previous), f"{alias}.until", now)
            registry.set_model_version_tag(
                name, str(previous), f"{alias}.replaced_by", str(version)
            )
    log.info(
        "push: %s alias %s: version %s -> %d, by %s (run %s)",
        name, alias, move["previous_version"], version, who, run_id,
    )  # fmt: skip
    return {"alias": alias, "version": version, **move}


def read_blessing(path: Path) -> dict[str, Any]:
    blessing = json.loads(Path(path).read_text())
    for key in ("blessed", "checks", "candidate", "test_set", "thresholds"):
        if key not in blessing:
            raise InputError(f"{path}: not a blessing file (no '{key}')")
    return blessing
