"""A retraining that ``imgpipe monitor`` starts, through the orchestrator it names, after the
labelled feedback is appended to the data (``imgpipe.data.feedback``):

- ``none`` appends nothing and returns the commands to run;
- ``dvc`` runs ``dvc add`` and ``dvc repro`` here;
- ``kfp-local`` runs the Kubeflow pipeline with kfp.local on that data version;
- ``kfp`` creates a run of the compiled pipeline on a cluster; it stays open until the run
  ends (``close_if_done``).

What a retraining registered is read back from the MLflow registry: the version, its run and
whether the blessing gate made it the champion.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from pipelines.stages import LOCAL_PIPELINE_ROOT, LOCAL_SHARED

KFP_DONE = {"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED", "CANCELLED"}
HOW = ("none", "dvc", "kfp-local", "kfp")


@dataclasses.dataclass(frozen=True)
class Retraining:
    """How a retraining starts, and where (the options of ``imgpipe monitor --retrain``)."""

    how: str = "none"
    pipeline_root: Path = Path(LOCAL_PIPELINE_ROOT)
    """kfp-local: its artifacts, one folder per retraining."""
    shared_volume: str | None = None
    """kfp-local: the folder standing in for the claim; kfp: the PersistentVolumeClaim (None:
    the pipeline's)."""
    mlflow_tracking_uri: str | None = None
    """For the pipeline run (None: this process's)."""
    kfp_host: str | None = None
    kfp_experiment: str = "imgpipe"

    def __post_init__(self) -> None:
        if self.how not in HOW:
            raise ValueError(f"retraining {self.how!r}: one of {', '.join(HOW)}")

    def start(self, params: dict[str, Any], planned: Any, stamp: str) -> dict[str, Any]:
        """Append ``planned`` feedback (a ``FeedbackPlan``, or None) and start the retraining;
        what started (and, when it ran here, how it ended)."""
        from imgpipe.core.params import DataParams, ServingParams, section
        from imgpipe.data import feedback

        source = Path(section(DataParams, "data", params).source)
        name = section(ServingParams, "serving", params).model_name
        commands = [["dvc", "add", str(source)], ["dvc", "repro"]]
        if self.how == "none":
            steps = [" ".join(c) for c in commands]
            if planned is not None and planned.copies:
                steps.insert(
                    0,
                    f"imgpipe monitor --feedback ... --retrain dvc appends {len(planned.copies)} "
                    f"images into {source}/<label>/feedback-{stamp}/",
                )
            return {"how": "commands", "commands": steps}
        copied = len(feedback.append(planned, source, stamp)) if planned is not None else 0
        started: dict[str, Any] = {"how": self.how, "feedback_images": copied}
        if self.how == "dvc":
            for command in commands:
                if command[1] == "add" and not Path(f"{source}.dvc").is_file():
                    continue
                done = subprocess.run(command, check=False)
                if done.returncode:
                    return {**started, "finished": True, "failed": " ".join(command)}
            pushed = json.loads(Path("metrics/push.json").read_text())
            return {**started, "finished": True, **registered(name, pushed["version"], pushed)}
        from imgpipe.tracking import registry
        from imgpipe.tracking.runs import tracking_uri
        from pipelines.kubeflow import compile_to, run_local

        arguments: dict[str, str] = {
            "source": str(source.resolve()),
            "data_version": f"feedback-{stamp}",
            "mlflow_tracking_uri": self.mlflow_tracking_uri or tracking_uri(),
        }
        if self.how == "kfp-local":
            run_local(
                params,
                self.pipeline_root.resolve() / stamp,
                shared_volume=str(Path(self.shared_volume or LOCAL_SHARED).resolve()),
                reused_from=None,
                **arguments,
            )
            versions = registry.client().search_model_versions(f"name = '{name}'")
            latest = max(int(v.version) for v in versions)
            return {**started, "finished": True, **registered(name, latest, None)}
        import kfp

        if self.shared_volume:
            arguments["shared_volume"] = self.shared_volume
        client = kfp.Client(host=self.kfp_host)
        with tempfile.TemporaryDirectory() as tmp:
            run = client.create_run_from_pipeline_package(
                str(compile_to(params, Path(tmp) / "pipeline.yaml")),
                arguments=arguments,
                run_name=f"retrain-{stamp}",
                experiment_name=self.kfp_experiment,
                enable_caching=False,
            )
        return {**started, "run": run.run_id}

    def close_if_done(self, retraining: dict[str, Any] | None) -> None:
        """Close a cluster retraining whose run has ended."""
        if not retraining or retraining.get("finished") or retraining.get("how") != "kfp":
            return
        import kfp

        state = kfp.Client(host=self.kfp_host).get_run(retraining["run"]).state
        if str(state).upper() in KFP_DONE:
            retraining.update(finished=True, state=str(state))


def registered(name: str, version: int, pushed: dict[str, Any] | None) -> dict[str, Any]:
    """A retraining's registered version: its run, and whether it was blessed (push's summary
    says so when it ran here; otherwise the champion alias does)."""
    from imgpipe.tracking import registry

    model = registry.client().get_model_version(name, str(version))
    result: dict[str, Any] = {"run": model.run_id, "registered_version": int(version)}
    if pushed is not None:
        result["blessed"] = bool(pushed.get("blessed"))
    else:
        result["blessed"] = "champion" in (model.aliases or [])
    return result
