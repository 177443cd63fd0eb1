"""register and push: the MLflow model registry and the TF Serving model base path.

Every exported candidate becomes a version of the registered model (named like the served
model, ``serving.model_name``) carrying the SavedModel, the TFLite files and the model card,
with the alias ``challenger``. Only a blessed candidate moves the alias ``champion`` and is
copied to ``<model_base_path>/<model_name>/<N+1>/``, where TF Serving (or the local server)
picks it up. A candidate that is not blessed is registered, so it can be inspected, but never
becomes champion and is never pushed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from components.config import ServingParams
from components.fileio import write_json_atomic

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
ARTIFACT_PATH = "registered_model"
"""Run artifact folder a model version points to: saved_model/, tflite/, model_card.md."""
SAVED_MODEL = "saved_model"


class PushError(RuntimeError):
    """The push cannot go ahead safely (the champion moved since the candidate was evaluated)."""


@dataclasses.dataclass(frozen=True)
class Champion:
    name: str
    version: int
    run_id: str | None

    def download_saved_model(self, directory: Path) -> Path:
        """The champion's SavedModel, copied from the registry into ``directory``."""
        import mlflow

        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{self.name}/{self.version}/{SAVED_MODEL}",
            dst_path=str(directory),
        )
        return Path(local)


def _client() -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def champion(name: str) -> Champion | None:
    """The version of ``name`` that holds the ``champion`` alias, or None."""
    from mlflow.exceptions import MlflowException

    try:
        version = _client().get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    return Champion(name, int(version.version), version.run_id)


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

    from components import export

    name = serving.model_name
    evaluated_against = (blessing.get("champion") or {}).get("version")
    current = champion(name)
    if blessing["blessed"] and (current.version if current else None) != evaluated_against:
        raise PushError(
            f"the {CHAMPION} of '{name}' is now version {current.version if current else None}, "
            f"but the candidate was compared with version {evaluated_against}: rerun evaluate "
            "(`dvc repro -f evaluate`) so the gate compares with the current champion"
        )
    # A server would fail on what the warmup requests fail on: probe before anything is recorded.
    warmups = export.run_warmup(export.SavedModelClassifier(saved_model))

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("register() needs an active MLflow run")
    mlflow.log_artifacts(str(saved_model), f"{ARTIFACT_PATH}/{SAVED_MODEL}")
    mlflow.log_artifacts(str(export_dir / export.TFLITE), f"{ARTIFACT_PATH}/{export.TFLITE}")
    mlflow.log_artifact(str(export_dir / export.CARD), ARTIFACT_PATH)

    client = _client()
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(
            name, description="Image classifier from the imgpipe pipeline; see model_card.md."
        )
    test = blessing["candidate"]
    version = client.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/{ARTIFACT_PATH}",
        run_id=run.info.run_id,
        description=(export_dir / export.CARD).read_text(encoding="utf-8"),
        tags={
            "blessed": str(blessing["blessed"]).lower(),
            "blessing": "; ".join(c["reason"] for c in blessing["checks"]),
            "test_accuracy": f"{test['accuracy']:.4f}",
            "test_balanced_accuracy": f"{test['balanced_accuracy']:.4f}",
        },
    )
    number = int(version.version)
    client.set_registered_model_alias(name, CHALLENGER, number)
    result: dict[str, Any] = {
        "registered_model": name,
        "version": number,
        "blessed": bool(blessing["blessed"]),
        "aliases": [CHALLENGER],
        "previous_champion": current.version if current else None,
        "warmup_requests": warmups,
        "pushed_to": None,
        "serving_version": None,
    }
    if blessing["blessed"]:
        target = push_to_serving(saved_model, Path(serving.model_base_path), name)
        client.set_model_version_tag(name, str(number), "serving_version", target.name)
        client.set_registered_model_alias(name, CHAMPION, number)
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
    mlflow.log_artifact(str(summary), "push")
    return result


def fetch(name: str, alias: str, base: Path) -> Path:
    """The SavedModel of ``name@alias`` from the registry, as ``<base>/<name>/<N>/`` (N: the
    serving version it was pushed as), written in one rename: what the serving pod's init
    container runs before TF Serving starts."""
    import mlflow

    version = _client().get_model_version_by_alias(name, alias)
    number = version.tags.get("serving_version") or str(version.version)
    target = Path(base) / name / number
    if (target / "saved_model.pb").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{version.version}/{SAVED_MODEL}", dst_path=str(staging)
        )
        os.rename(local, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def read_blessing(path: Path) -> dict[str, Any]:
    blessing = json.loads(Path(path).read_text())
    for key in ("blessed", "checks", "candidate"):
        if key not in blessing:
            raise ValueError(f"{path}: not a blessing file (no '{key}')")
    return blessing
