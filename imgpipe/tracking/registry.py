"""The MLflow model registry as the pipeline uses it: the ``champion`` and ``challenger``
aliases of the registered model (named like the served model, ``serving.model_name``), the
champion evaluate compares with, and ``fetch``, which copies a version into a serving base path
(seeding an empty serving volume). Writing to the registry is push's job
(``components/push.py``)."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from imgpipe.data.lineage import TRAINED_ON, read_trained_on
from imgpipe.tracking.access import needs

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
ARTIFACT_PATH = "registered_model"
"""Run artifact folder a model version points to: saved_model/, tflite/, model_card.md."""
SAVED_MODEL = "saved_model"
DESCRIPTION = "Image classifier from the imgpipe pipeline; see model_card.md."


class PushError(RuntimeError):
    """The push cannot go ahead safely (the champion moved since the candidate was evaluated)."""


@dataclasses.dataclass(frozen=True)
class Champion:
    name: str
    version: int
    run_id: str | None
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    """The version's tags (its gate decision, lineage and weights digest)."""

    def download_saved_model(self, directory: Path) -> Path:
        """The champion's SavedModel, copied from the registry into ``directory``."""
        import mlflow

        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{self.name}/{self.version}/{SAVED_MODEL}",
            dst_path=str(directory),
        )
        return Path(local)

    def trained_on(self) -> dict[str, str | None] | None:
        """The images this version trained and was tuned on (sha256 -> label, the label None
        in lists written before labels were kept), from its ``trained_on.txt``; None for a
        version registered without one."""
        import mlflow
        from mlflow.exceptions import MlflowException

        with tempfile.TemporaryDirectory(prefix="imgpipe-lineage-") as tmp:
            try:
                local = mlflow.artifacts.download_artifacts(
                    artifact_uri=f"models:/{self.name}/{self.version}/{TRAINED_ON}", dst_path=tmp
                )
            except (MlflowException, OSError):
                return None
            return read_trained_on(Path(local))


def client() -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def ensure_model(registry: Any, name: str) -> None:
    """Register the model ``name`` unless it exists (push's first run, or the admin's
    ``imgpipe mlflow-access`` ahead of it)."""
    with needs("permission to create registered models", f"create registered model {name!r}"):
        if not registry.search_registered_models(filter_string=f"name = '{name}'"):
            registry.create_registered_model(name, description=DESCRIPTION)


def alias_holder(name: str, alias: str, registry: Any = None) -> Champion | None:
    """The version of ``name`` that holds ``alias``, or None (no such model, or no holder)."""
    from mlflow.exceptions import MlflowException

    try:
        with needs(f"READ on registered model {name!r}", f"read alias {alias!r} of {name!r}"):
            version = (registry or client()).get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    return Champion(name, int(version.version), version.run_id, dict(version.tags or {}))


def champion(name: str) -> Champion | None:
    """The version of ``name`` that holds the ``champion`` alias, or None."""
    return alias_holder(name, CHAMPION)


def fetch(name: str, alias: str, base: Path) -> Path:
    """The SavedModel of ``name@alias`` from the registry, as ``<base>/<name>/<N>/`` (N: the
    serving version it was pushed as), written in one rename (``imgpipe fetch-model``)."""
    import mlflow

    reading = (f"READ on registered model {name!r}", f"fetch {name}@{alias}")
    with needs(*reading):
        version = client().get_model_version_by_alias(name, alias)
    number = version.tags.get("serving_version") or str(version.version)
    target = Path(base) / name / number
    if (target / "saved_model.pb").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
    try:
        with needs(*reading):
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{version.version}/{SAVED_MODEL}",
                dst_path=str(staging),
            )
        os.rename(local, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
