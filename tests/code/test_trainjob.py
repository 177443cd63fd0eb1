"""Multi-worker fine-tuning on Kubeflow Trainer: TF_CONFIG from a pod's JobSet environment
(imgpipe.model.trainjob), and the finetune step's launcher (pipelines.kubeflow_trainer) against a
local HTTP stub of the Kubernetes API that records what the real ``kubernetes`` client sends."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from imgpipe.core.params import ParamsError, load_params
from imgpipe.model.trainjob import TrainJobEnvError, set_tf_config, tf_config_from_jobset

PROJECT = Path(__file__).resolve().parents[2]
TRAINJOBS = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/ml/trainjobs"
POD_ENV = {
    "JOBSET_NAME": "imgpipe-finetune-1a2b",
    "REPLICATED_JOB_NAME": "node",
    "JOB_INDEX": "0",
    "JOB_COMPLETION_INDEX": "2",
    "IMGPIPE_NUM_NODES": "3",
}


def test_tf_config_lists_every_node_by_its_jobset_hostname():
    """Guards the derivation: one worker per node at JobSet's stable hostname
    (<jobset>-<replicatedJob>-<jobIndex>-<podIndex>.<subdomain>, subdomain the JobSet's name
    unless given), this pod's task index its completion index."""
    assert tf_config_from_jobset(POD_ENV) == {
        "cluster": {
            "worker": [
                f"imgpipe-finetune-1a2b-node-0-{i}.imgpipe-finetune-1a2b:2222" for i in range(3)
            ]
        },
        "task": {"type": "worker", "index": 2},
    }
    other = tf_config_from_jobset({**POD_ENV, "JOB_INDEX": "1", "JOBSET_SUBDOMAIN": "net"})
    assert other["cluster"]["worker"][0] == "imgpipe-finetune-1a2b-node-1-0.net:2222"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"JOBSET_NAME": ""}, r"\['JOBSET_NAME'\] unset"),
        ({"JOB_COMPLETION_INDEX": "3"}, "outside the 3 nodes"),
        ({"IMGPIPE_NUM_NODES": "two"}, "IMGPIPE_NUM_NODES must be a non-negative integer"),
    ],
)
def test_tf_config_refuses_an_incomplete_or_inconsistent_environment(change, message):
    with pytest.raises(TrainJobEnvError, match=message):
        tf_config_from_jobset({**POD_ENV, **change})


def test_set_tf_config_only_in_a_trainjob_pod_and_never_over_an_explicit_one():
    env = dict(POD_ENV)
    assert set_tf_config(env) is True
    assert json.loads(env["TF_CONFIG"])["task"] == {"type": "worker", "index": 2}
    explicit = {**POD_ENV, "TF_CONFIG": '{"task": {"type": "chief", "index": 0}}'}
    assert set_tf_config(explicit) is False
    assert json.loads(explicit["TF_CONFIG"])["task"]["type"] == "chief"
    plain = {"HOME": "/tmp"}
    assert set_tf_config(plain) is False and "TF_CONFIG" not in plain


def test_finetune_workers_defaults_to_one_pod_and_must_be_positive():
    from imgpipe.core.params import FinetuneParams, section

    params = load_params(PROJECT / "params.yaml")
    assert section(FinetuneParams, "finetune", params).workers == 1
    params["finetune"]["workers"] = 0
    with pytest.raises(ParamsError, match=r"finetune\.workers must be at least 1"):
        section(FinetuneParams, "finetune", params)


class _KubeStub(BaseHTTPRequestHandler):
    """Answers the custom-object calls for TrainJobs; records each one. ``conditions`` is what
    successive GETs report; ``pods`` is called with the created TrainJob (a stand-in for the
    pods' work); a ``refuse`` status answers the create."""

    calls: ClassVar[list[tuple[str, str, Any]]] = []
    conditions: ClassVar[list[list[dict[str, str]]]] = []
    hooks: ClassVar[dict[str, Any]] = {}
    refuse: ClassVar[int] = 0

    def _reply(self, status: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.calls.append(("POST", self.path, body))
        if self.refuse:
            self._reply(self.refuse, {"kind": "Status", "message": "the server could not find"})
            return
        if "pods" in self.hooks:
            self.hooks["pods"](body)
        self._reply(201, body)

    def do_GET(self) -> None:
        self.calls.append(("GET", self.path, None))
        now = self.conditions.pop(0) if len(self.conditions) > 1 else self.conditions[0]
        name = self.path.rsplit("/", 1)[-1]
        self._reply(200, {"metadata": {"name": name}, "status": {"conditions": now}})

    def do_DELETE(self) -> None:
        self.calls.append(("DELETE", self.path, None))
        self._reply(200, {"kind": "Status", "status": "Success"})

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def kube_stub() -> Iterator[Any]:
    from kubernetes import client

    _KubeStub.calls, _KubeStub.hooks, _KubeStub.refuse = [], {}, 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _KubeStub)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{server.server_port}"
    with client.ApiClient(configuration) as api_client:
        yield api_client
    server.shutdown()
    server.server_close()


RUNNING = [{"type": "Created", "status": "True", "reason": "JobsCreationSucceeded"}]
COMPLETE = [*RUNNING, {"type": "Complete", "status": "True", "reason": "JobsCompleted"}]
FAILED = {"type": "Failed", "status": "True", "reason": "JobsFailed", "message": "node-1 lost"}


def test_submit_then_wait_until_complete(kube_stub):
    """Guards the launch: the rendered TrainJob is POSTed to trainer.kubeflow.org/v1alpha1 in
    the namespace, then polled until its Complete condition is true."""
    from pipelines.kubeflow_trainer import SHARED, render, submit, wait

    _KubeStub.conditions = [[], RUNNING, COMPLETE]
    trainjob = render("ft-1", workers=2, claim="shared", job_dir=SHARED / "trainjobs" / "ft-1")
    submit(kube_stub, "ml", trainjob)
    done = wait(kube_stub, "ml", "ft-1", poll_seconds=0.01)
    assert done["metadata"]["name"] == "ft-1"
    assert _KubeStub.calls[0] == ("POST", TRAINJOBS, trainjob)
    assert [c[:2] for c in _KubeStub.calls[1:]] == [("GET", f"{TRAINJOBS}/ft-1")] * 3


def test_a_failed_or_refused_trainjob_is_an_error_naming_it(kube_stub):
    from pipelines.kubeflow_trainer import SHARED, TrainJobError, render, submit, wait

    _KubeStub.conditions = [
        [*RUNNING, {"type": "Failed", "status": "True", "reason": "JobsFailed", "message": "x"}]
    ]
    _KubeStub.conditions[0][-1]["message"] = "jobset failed: node-0 exited with 137"
    with pytest.raises(TrainJobError, match="TrainJob ml/ft-2 failed: JobsFailed: jobset failed"):
        wait(kube_stub, "ml", "ft-2", poll_seconds=0.01)

    _KubeStub.refuse = 404
    trainjob = render("ft-3", workers=2, claim="shared", job_dir=SHARED / "trainjobs" / "ft-3")
    with pytest.raises(TrainJobError, match=r"TrainJob ml/ft-3 could not be created \(404"):
        submit(kube_stub, "ml", trainjob)


def test_run_finetune_stages_inputs_and_brings_back_outputs(kube_stub, tmp_path):
    """Guards the step's side of the data exchange: the inputs land on the shared volume at
    the paths the TrainJob's command names, params.yaml beside them; what the pods write there
    (outputs, the stage's MLflow log) comes back to the step's paths; the checkpoints stay."""
    from pipelines.kubeflow_trainer import SHARED, TrainJobError, run_finetune

    shared = tmp_path / "shared"
    step = tmp_path / "step"
    inputs = {
        "trained": step / "train" / "model.keras",
        "dataset": step / "ingest",
        "frozen_history": step / "train_history.csv",
    }
    for name, path in inputs.items():
        if path.suffix:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(name)
        else:
            (path / "part").mkdir(parents=True)
            (path / "part" / "file").write_text(name)
    outputs = {n: step / "out" / n for n in ("out", "summary", "history", "checkpoints")}
    seen: dict[str, Any] = {}

    def pods(trainjob: dict[str, Any]) -> None:  # what the pods read and write
        command = trainjob["spec"]["trainer"]["command"]
        assert command[:3] == ["imgpipe", "finetune", "--stage-log"]
        flags = dict(zip(command[3::2], command[4::2], strict=True))
        local = {k: shared / Path(v).relative_to(SHARED) for k, v in flags.items()}
        seen["params"] = local["--params"].read_text()
        seen["trained"] = local["--trained"].read_text()
        seen["shards"] = (local["--dataset"] / "part" / "file").read_text()
        (local["--out"]).mkdir(parents=True)
        (local["--out"] / "model.keras").write_text("tuned")
        local["--summary"].write_text('{"val_accuracy": 0.9}')
        local["--history"].write_text("epoch\n")
        local["--checkpoints"].mkdir(parents=True)
        uri = next(e["value"] for e in trainjob["spec"]["trainer"]["env"] if "MLFLOW" in e["name"])
        (shared / Path(uri.removeprefix("sqlite:///")).relative_to(SHARED)).write_text("db")

    _KubeStub.hooks["pods"] = pods
    _KubeStub.conditions = [COMPLETE]
    params = load_params(PROJECT / "params.yaml")
    params["finetune"]["workers"] = 3
    launch = functools.partial(
        run_finetune,
        {**inputs, **outputs},
        params,
        claim="imgpipe-shared",
        mlflow_log=step / "mlflow_log",
        shared=shared,
        api_client=kube_stub,
        namespace="ml",
        poll_seconds=0.01,
    )
    name = launch()
    (_, _, trainjob), *_ = _KubeStub.calls
    assert trainjob["metadata"]["name"] == name and trainjob["spec"]["trainer"]["numNodes"] == 3
    assert "workers: 3" in seen["params"]
    assert (seen["trained"], seen["shards"]) == ("trained", "dataset")
    assert (outputs["out"] / "model.keras").read_text() == "tuned"
    assert json.loads(outputs["summary"].read_text()) == {"val_accuracy": 0.9}
    assert outputs["history"].read_text() == "epoch\n"
    assert not outputs["checkpoints"].exists()
    assert (step / "mlflow_log" / "mlflow.db").read_text() == "db"
    assert not (shared / "trainjobs" / name).exists()  # the inputs' copies are gone
    assert "DELETE" not in {method for method, *_ in _KubeStub.calls}

    # A failed TrainJob is deleted (no pod goes on writing the checkpoints a retry resumes).
    _KubeStub.calls, _KubeStub.conditions = [], [[*RUNNING, FAILED]]
    with pytest.raises(TrainJobError, match="failed"):
        launch()
    (_, _, failed), *_, (method, path, _) = _KubeStub.calls
    assert (method, path.rsplit("/", 1)[-1]) == ("DELETE", failed["metadata"]["name"])


def test_more_workers_without_a_shared_claim_say_what_is_missing(tmp_path):
    from pipelines.kubeflow_trainer import TrainJobError, run_finetune

    params = load_params(PROJECT / "params.yaml")
    params["finetune"]["workers"] = 2
    for claim in ("", str(tmp_path)):  # none, or kfp.local's host folder
        with pytest.raises(TrainJobError, match=r"finetune\.workers = 2 needs a volume claim"):
            run_finetune({}, params, claim=claim, mlflow_log=tmp_path)
