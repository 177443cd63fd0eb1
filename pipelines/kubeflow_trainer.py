"""finetune on many machines: the Kubeflow step launches a Kubeflow Trainer ``TrainJob``.

With ``finetune.workers`` > 1 the Kubeflow finetune step does not train in its own pod. It
copies its inputs onto a volume claim shared with the TrainJob's pods (mounted at ``SHARED`` in
both), renders a TrainJob on the ``imgpipe-tensorflow`` runtime (``infra/k8s/trainer``) whose
pods run ``imgpipe finetune`` on those paths (the DVC layout under one folder per TrainJob),
creates it through the Kubernetes API, waits for its ``Complete`` or ``Failed`` condition, and
copies the outputs and the stage's MLflow log back into the step's artifacts. Each pod builds
TF_CONFIG from its JobSet identity (``imgpipe.model.trainjob``).
"""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from imgpipe.model.trainjob import NUM_NODES

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
RUNTIME = "imgpipe-tensorflow"
"""The ClusterTrainingRuntime in ``infra/k8s/trainer/runtime.yaml``."""
NODE = "node"
"""The runtime's replicated job and container that train (Trainer's name for them)."""
SHARED = PurePosixPath("/mnt/imgpipe-shared")
"""Where the shared place's claim is mounted: in the pipeline's steps that keep files across
runs (``pipelines.kubeflow_step.SHARED_MOUNT``) and in a TrainJob's pods, the same path, so a
path on it means the same file in both."""
PATCH_MANAGER = "imgpipe.io/finetune"
POLL_SECONDS = 15.0
MLFLOW_FOLDER = "mlflow"


class TrainJobError(RuntimeError):
    """A TrainJob could not be created, or it failed (the message names it and says why)."""


def job_paths(job_dir: PurePosixPath) -> dict[str, PurePosixPath]:
    """finetune's inputs and outputs inside a TrainJob's folder: the DVC layout."""
    from pipelines.runner import default_paths
    from pipelines.stages import STAGES

    return {name: job_dir / path for name, path in default_paths(STAGES["finetune"], {}).items()}


def render(
    name: str,
    *,
    workers: int,
    claim: str,
    job_dir: PurePosixPath,
    checkpoints: PurePosixPath | None = None,
) -> dict[str, Any]:
    """The TrainJob ``name``: ``workers`` nodes of the imgpipe runtime, each running
    ``imgpipe finetune`` on the paths of ``job_paths(job_dir)`` (the checkpoints at
    ``checkpoints`` when given), the volume claim ``claim`` mounted at ``SHARED`` (``job_dir``
    lies under it)."""
    from imgpipe.tracking.runs import SQLITE, STAGE_LOG_DB

    # --stage-log: the step imports this store into the execution's run, which start-run has
    # given every param already (as with every other step's own store).
    command = ["imgpipe", "finetune", "--stage-log", "--params", str(job_dir / "params.yaml")]
    paths = job_paths(job_dir)
    if checkpoints is not None:
        paths["checkpoints"] = checkpoints
    for key, path in paths.items():
        command += [f"--{key.replace('_', '-')}", str(path)]
    tracking_uri = f"{SQLITE}{job_dir / MLFLOW_FOLDER / STAGE_LOG_DB}"
    pod_patch = {
        "volumes": [{"name": "shared", "persistentVolumeClaim": {"claimName": claim}}],
        "containers": [
            {"name": NODE, "volumeMounts": [{"name": "shared", "mountPath": str(SHARED)}]}
        ],
    }
    replicated_job = {"name": NODE, "template": {"spec": {"template": {"spec": pod_patch}}}}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "imgpipe"}},
        "spec": {
            "runtimeRef": {"name": RUNTIME},
            "trainer": {
                "numNodes": workers,
                "command": command,
                "env": [
                    {"name": NUM_NODES, "value": str(workers)},
                    {"name": "MLFLOW_TRACKING_URI", "value": tracking_uri},
                ],
            },
            "runtimePatches": [
                {
                    "manager": PATCH_MANAGER,
                    "trainingRuntimeSpec": {
                        "template": {"spec": {"replicatedJobs": [replicated_job]}}
                    },
                }
            ],
        },
    }


def _api(api_client: Any) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(api_client)


def submit(api_client: Any, namespace: str, trainjob: dict[str, Any]) -> None:
    """Create ``trainjob`` in ``namespace``."""
    from kubernetes.client.exceptions import ApiException

    name = trainjob["metadata"]["name"]
    try:
        _api(api_client).create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, trainjob
        )
    except ApiException as exc:
        raise TrainJobError(
            f"TrainJob {namespace}/{name} could not be created ({exc.status} {exc.reason}: "
            f"{exc.body}); are Kubeflow Trainer and the {RUNTIME} runtime installed "
            "(infra/k8s/trainer), and may this service account create trainjobs?"
        ) from None


def wait(
    api_client: Any, namespace: str, name: str, *, poll_seconds: float = POLL_SECONDS
) -> dict[str, Any]:
    """The TrainJob once its ``Complete`` condition is true; a ``Failed`` one raises
    ``TrainJobError`` with the condition's reason and message."""
    from kubernetes.client.exceptions import ApiException

    api = _api(api_client)
    while True:
        try:
            trainjob = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status and exc.status < 500:
                raise TrainJobError(
                    f"TrainJob {namespace}/{name} could not be read ({exc.status} {exc.reason})"
                ) from None
            time.sleep(poll_seconds)  # the API server restarting: ask again
            continue
        conditions = (trainjob.get("status") or {}).get("conditions") or []
        true = {c["type"]: c for c in conditions if c.get("status") == "True"}
        if "Failed" in true:
            failed = true["Failed"]
            raise TrainJobError(
                f"TrainJob {namespace}/{name} failed: {failed.get('reason', '')}: "
                f"{failed.get('message', '')}"
            )
        if "Complete" in true:
            return dict(trainjob)
        time.sleep(poll_seconds)


def delete(api_client: Any, namespace: str, name: str) -> None:
    """Delete TrainJob ``name`` (its pods stop), best effort: the reason to delete it is
    already failing the step."""
    import logging

    from kubernetes.client.exceptions import ApiException

    try:
        _api(api_client).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as exc:
        logging.getLogger(__name__).warning(
            "TrainJob %s/%s could not be deleted (%s %s): delete it by hand",
            namespace, name, exc.status, exc.reason,
        )  # fmt: skip


def in_cluster() -> tuple[Any, str]:
    """An API client with this pod's service account, and the pod's namespace."""
    from kubernetes import client, config

    config.load_incluster_config()
    namespace = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read_text()
    return client.ApiClient(), namespace.strip()


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target, dirs_exist_ok=True)
    else:
        shutil.copyfile(source, target)


def run_finetune(
    paths: Mapping[str, Path],
    params: dict[str, Any],
    *,
    claim: str,
    mlflow_log: Path,
    shared: Path = Path(SHARED),
    api_client: Any = None,
    namespace: str = "",
    poll_seconds: float = POLL_SECONDS,
) -> str:
    """Run finetune as a TrainJob of ``params['finetune']['workers']`` nodes on ``paths`` (the
    Kubeflow step's): inputs go to a new folder on the shared volume (``shared`` here, the
    claim ``claim`` in the TrainJob's pods), outputs and the MLflow log (into ``mlflow_log``)
    come back. Returns the TrainJob's name. Without ``api_client``, this pod's own."""
    import yaml

    from pipelines.stages import STAGES

    if not claim or claim.startswith("/"):
        raise TrainJobError(
            f"finetune.workers = {params['finetune']['workers']} needs a volume claim shared "
            f"with the TrainJob's pods (the pipeline parameter shared_volume, mounted at {SHARED} "
            f"in this step), got {claim!r}: a host folder (kfp.local) cannot reach a cluster"
        )
    if api_client is None:
        api_client, namespace = in_cluster()
    stage = STAGES["finetune"]
    name = f"imgpipe-finetune-{secrets.token_hex(4)}"
    job_dir = PurePosixPath("trainjobs") / name
    local = {key: shared / path for key, path in job_paths(job_dir).items()}
    for key in stage.inputs:
        _copy(paths[key], local[key])
    (shared / job_dir / MLFLOW_FOLDER).mkdir(parents=True)
    (shared / job_dir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # The step's checkpoint folder is on the shared volume already (kubeflow_step.kept_folder,
    # one per params and inputs): the TrainJob resumes from it when the step is retried.
    checkpoints = None
    if paths["checkpoints"].is_relative_to(shared):
        checkpoints = SHARED / paths["checkpoints"].relative_to(shared).as_posix()
    trainjob = render(
        name,
        workers=params["finetune"]["workers"],
        claim=claim,
        job_dir=SHARED / job_dir,
        checkpoints=checkpoints,
    )
    submit(api_client, namespace, trainjob)
    try:
        wait(api_client, namespace, name, poll_seconds=poll_seconds)
    except BaseException:
        # A failed job, or a step stopped while it runs: no TrainJob may go on writing into
        # the checkpoints the step's retry resumes from.
        delete(api_client, namespace, name)
        raise
    for key, out in stage.outputs.items():
        if out.dvc != "persist":  # the checkpoints stay on the shared volume
            _copy(local[key], paths[key])
    _copy(shared / job_dir / MLFLOW_FOLDER, mlflow_log)
    shutil.rmtree(shared / job_dir)  # the copies of the inputs, and what came back
    return name
