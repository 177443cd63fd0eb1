"""The Kubeflow pipeline: its compiled YAML, a real kfp.local run of every stage on a tiny data
set, and scheduling against a local HTTP stub that records what ``kfp.Client`` sends."""

from __future__ import annotations

import copy
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import yaml
from conftest import encode_image, make_class_folders
from PIL import Image

PROJECT = Path(__file__).resolve().parents[2]
CLASSES = {"a": 16, "b": 16, "c": 16}
STAGES = ("ingest", "validate", "augment", "train", "finetune", "evaluate", "export", "push")
ORDER = (  # dependency order, ties by name: the cached steps wait for start-run
    "start-run",
    "ingest",
    "validate",
    "augment",
    "train",
    "finetune",
    "evaluate",
    "export",
    "import-logs",
    "push",
)
CACHED = {"ingest", "validate", "augment", "train", "finetune"}


def _params() -> dict[str, Any]:
    from imgpipe.core.params import load_params

    return load_params(PROJECT / "params.yaml")


def _topological(tasks: dict[str, Any]) -> list[str]:
    """Task names in dependency order (ties by name), as a scheduler could run them."""
    done: list[str] = []
    while len(done) < len(tasks):
        ready = sorted(
            name
            for name, task in tasks.items()
            if name not in done and set(task.get("dependentTasks", [])) <= set(done)
        )
        assert ready, f"cycle among {set(tasks) - set(done)}"
        done.append(ready[0])
    return done


def test_compiled_with_several_workers_the_finetune_step_takes_no_gpu(tmp_path):
    """With finetune.workers > 1 compiled in, the finetune step only launches its TrainJob and
    waits (pipelines.kubeflow_trainer): it requests no GPU, while train still does."""
    from pipelines.kubeflow import compile_to

    params = _params()
    params["finetune"]["workers"] = 2
    spec, _ = yaml.safe_load_all(compile_to(params, tmp_path / "imgpipe.yaml").read_text())
    executors = spec["deploymentSpec"]["executors"]
    resources = {n: executors[n]["container"]["resources"] for n in ("exec-train", "exec-finetune")}
    assert "accelerator" not in resources["exec-finetune"]
    assert resources["exec-train"]["accelerator"]["resourceCount"] == "1"


def test_compiled_pipeline_loads_back_in_order_with_gpus_requests_and_retries(tmp_path):
    """Guards the cluster contract of the YAML: kfp loads it back; the stages run in the
    pipeline's order; train and finetune request one nvidia.com/gpu with a GPU node selector
    and toleration; every step requests CPU and memory; steps with side effects are not
    cached (push is not retried either); the parameters mirror params.yaml."""
    from kfp import components

    from pipelines.kubeflow import SHARED_MOUNT, SHARED_VOLUME, compile_to

    path = compile_to(_params(), tmp_path / "imgpipe.yaml")
    loaded = components.load_component_from_file(str(path))
    assert loaded.name == "imgpipe"

    spec, platform = yaml.safe_load_all(path.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert _topological(tasks) == list(ORDER)
    executors = spec["deploymentSpec"]["executors"]
    for name, task in tasks.items():
        resources = executors[task["componentRef"]["name"].replace("comp-", "exec-")]["container"][
            "resources"
        ]
        assert resources["resourceCpuRequest"] and resources["resourceMemoryRequest"], name
        gpu = resources.get("accelerator", {})
        if name in ("train", "finetune"):
            assert gpu["resourceType"] == "nvidia.com/gpu" and gpu["resourceCount"] == "1"
        else:
            assert not gpu, name
        cached = task.get("cachingOptions", {}).get("enableCache", False)
        assert cached == (name in CACHED), name
        if cached:  # a cache hit needs inputs that repeat: none may come from a non-cached step
            inputs = task.get("inputs", {})
            producers = {
                source["producerTask"]
                for kind in ("parameters", "artifacts")
                for value in inputs.get(kind, {}).values()
                for source in (value.get("taskOutputParameter"), value.get("taskOutputArtifact"))
                if source
            }
            assert producers <= CACHED, (name, producers)
        assert ("retryPolicy" in task) == (name != "push"), name
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in ("exec-train", "exec-finetune"):
        assert k8s[name]["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
        assert k8s[name]["tolerations"][0]["key"] == "nvidia.com/gpu"
    # the shared place: the claim named by the shared_volume parameter, in the steps that keep
    # files across runs (feature cache, checkpoints, serving versions), in ingest (a data folder
    # there, as imgpipe monitor's feedback under Kubeflow, is readable) and no other
    mounted = {name for name, executor in k8s.items() if executor.get("pvcMount")}
    assert mounted == {"exec-ingest", "exec-train", "exec-finetune", "exec-push"}
    for name in mounted:
        (mount,) = k8s[name]["pvcMount"]
        assert mount["pvcNameParameter"] == {"componentInputParameter": "shared_volume"}
        assert mount["mountPath"] == SHARED_MOUNT
    # the MLflow account, from the Secret the mlflow_credentials parameter names, in exactly
    # the steps that talk to the server (the cached ones log into artifacts of their own)
    talking = {name for name, executor in k8s.items() if executor.get("secretAsEnv")}
    assert talking == {
        f"exec-{n}" for n in ("start-run", "evaluate", "export", "push", "import-logs")
    }
    for name in talking:
        (secret,) = k8s[name]["secretAsEnv"]
        assert secret["secretNameParameter"] == {"componentInputParameter": "mlflow_credentials"}
        assert secret["optional"] is True
        assert {m["secretKey"]: m["envVar"] for m in secret["keyToEnv"]} == {
            "username": "MLFLOW_TRACKING_USERNAME",
            "password": "MLFLOW_TRACKING_PASSWORD",
        }
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    defaults = {k: v["defaultValue"] for k, v in parameters.items() if "defaultValue" in v}
    assert defaults["mlflow_credentials"] == "mlflow-pipeline"  # infra/k8s, README
    # overlays on the params.yaml compiled into every stage, never a second set of defaults
    assert {k: v for k, v in defaults.items() if k.endswith("_params")} == {
        f"{section}_params": "{}" for section in _params()
    }
    assert defaults["source"] == "sample"
    assert defaults["shared_volume"] == SHARED_VOLUME  # the claim infra/k8s creates
    finetune = spec["root"]["dag"]["tasks"]["finetune"]["inputs"]["parameters"]
    assert json.loads(finetune["base_params"]["runtimeValue"]["constant"]) == _params()


def test_a_kubeflow_overlay_changes_only_the_keys_it_names():
    """A run given finetune_params={"learning_rate": 3e-4} fine-tunes with every other key
    of params.yaml; an unknown key is an error that names it."""
    from imgpipe.core.params import SECTIONS, ParamsError, section
    from pipelines.kubeflow_step import overlaid
    from pipelines.stages import STAGES

    arguments = {
        "base_params": json.dumps(_params()),
        "model": "{}",
        "augment": "{}",
        "train": "{}",
        "finetune": json.dumps({"learning_rate": 3e-4}),
    }
    params = overlaid(STAGES["finetune"].sections, arguments)
    assert params["finetune"] == {**_params()["finetune"], "learning_rate": 3e-4}
    assert params["model"] == _params()["model"]
    arguments["finetune"] = json.dumps({"learning_rte": 3e-4})
    with pytest.raises(ParamsError, match=r"unknown key finetune\.learning_rte"):
        section(SECTIONS["finetune"], "finetune", overlaid(STAGES["finetune"].sections, arguments))


def test_pipeline_compile_with_a_profile_compiles_its_params_in(tmp_path):
    """Guards the full profile under Kubeflow: ``imgpipe pipeline compile --profile full``
    compiles params.yaml with the profile's overrides in as every step's base params."""
    import subprocess
    import sys

    from imgpipe.core.params import load_params, with_profile

    out = tmp_path / "imgpipe.yaml"
    imgpipe = str(Path(sys.executable).with_name("imgpipe"))
    params_yaml = str(PROJECT / "params.yaml")
    subprocess.run(
        [
            imgpipe,
            "pipeline",
            "compile",
            "--profile",
            "full",
            "--params",
            params_yaml,
            "--out",
            str(out),
        ],
        cwd=PROJECT,
        check=True,
        capture_output=True,
    )
    spec, _ = yaml.safe_load_all(out.read_text())
    finetune = spec["root"]["dag"]["tasks"]["finetune"]["inputs"]["parameters"]
    compiled = json.loads(finetune["base_params"]["runtimeValue"]["constant"])
    assert compiled == with_profile(load_params(PROJECT / "params.yaml"), "full")
    assert compiled["finetune"]["unfreeze_layers"] != _params()["finetune"]["unfreeze_layers"]


def test_import_logs_marks_a_step_from_the_cache_as_reused(tmp_path):
    """Guards the reuse tags under Kubeflow's cache: a stage log written before the
    execution's run started (a cache hit: the cached steps run after start-run) is imported
    as ``reused``, one written after it as ``done``; both bring their params and metrics."""
    import time

    from mlflow.tracking import MlflowClient

    from pipelines.kubeflow_step import import_stage_logs, stage_log

    def write_log(folder: Path, stage: str) -> None:
        client = MlflowClient(stage_log(str(folder)))
        run = client.create_run(client.create_experiment("log"))
        client.log_metric(run.info.run_id, f"{stage}.images", 48)
        client.log_param(run.info.run_id, f"{stage}.seed", "1")
        client.set_tag(run.info.run_id, f"stage.{stage}", "done")
        client.set_terminated(run.info.run_id)
        time.sleep(0.01)  # start times are in milliseconds

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    write_log(tmp_path / "cached", "ingest")
    target = MlflowClient(uri)
    run_id = target.create_run(target.create_experiment("imgpipe")).info.run_id
    time.sleep(0.01)
    write_log(tmp_path / "fresh", "train")

    imported = import_stage_logs([str(tmp_path / "cached"), str(tmp_path / "fresh")], uri, run_id)

    run = target.get_run(run_id)
    assert imported == ["ingest", "train"]
    assert run.data.tags["stage.ingest"] == "reused"
    assert run.data.tags["stage.train"] == "done"
    assert run.data.metrics == {"ingest.images": 48, "train.images": 48}
    assert run.data.params == {"ingest.seed": "1", "train.seed": "1"}


def test_the_shared_place_is_a_mounted_claim_or_an_absolute_folder(tmp_path):
    """Guards how a step finds the shared place: an absolute folder is taken as it is
    (kfp.local), a claim name means the claim's mount, which must be there; anything else, and
    kfp.local given a claim, is an error naming the parameter. A relative
    serving.model_base_path lies inside the place, an absolute one stays."""
    from pipelines.kubeflow import run_local
    from pipelines.kubeflow_step import SHARED_MOUNT, served_from, shared_place

    assert shared_place(str(tmp_path)) == tmp_path
    with pytest.raises(FileNotFoundError, match=f"imgpipe-shared.*not mounted at {SHARED_MOUNT}"):
        shared_place("imgpipe-shared")
    with pytest.raises(ValueError, match="shared_volume 'Models/' is neither"):
        shared_place("Models/")
    with pytest.raises(ValueError, match=r"kfp\.local mounts no PersistentVolumeClaim"):
        run_local(_params(), tmp_path / "root", shared_volume="imgpipe-shared")
    serving = {"model_name": "tiny", "model_base_path": "models"}
    assert served_from(tmp_path, serving)["model_base_path"] == str(tmp_path / "models")
    absolute = {**serving, "model_base_path": "/srv/models"}
    assert served_from(tmp_path, absolute) == absolute


def test_a_kfp_local_rerun_imports_the_cached_steps_of_an_earlier_execution(tmp_path):
    """kfp.local has no cache; ``run_local(reused_from=...)`` stands in for KFP's: the pipeline
    it builds has no task for a cached step, an importer of each of that step's outputs (and
    its MLflow log) from the earlier execution's folder instead, and the first step after them
    reads the imported artifacts."""
    from kfp import compiler

    from pipelines.kubeflow import build, imported_from

    imported = imported_from(tmp_path / "earlier")
    compiler.Compiler().compile(build(_params(), imported), str(tmp_path / "p.yaml"))
    spec, _ = yaml.safe_load_all((tmp_path / "p.yaml").read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert not set(tasks) & CACHED
    importers = {
        task["inputs"]["parameters"]["uri"]["runtimeValue"]["constant"]
        for name, task in tasks.items()
        if name.startswith("importer")
    }
    assert importers == {uri for uris in imported.values() for uri in uris.values()}
    evaluate = tasks["evaluate"]["inputs"]["artifacts"]
    producers = {v["taskOutputArtifact"]["producerTask"] for v in evaluate.values()}
    assert producers and all(p.startswith("importer") for p in producers), producers


@pytest.mark.slow
def test_kfp_local_runs_every_stage_then_the_monitor_retrains_and_serves_the_next_version(
    tmp_path, monkeypatch
):
    """Guards the pipeline for real: kfp.local (SubprocessRunner, this venv) runs all ten
    steps on a tiny data set; each leaves its artifacts; every stage's MLflow log ends in the
    one run that start-run made (the cached steps' through import-logs: params, metric
    histories, artifacts); the blessed model is registered as champion and pushed into the
    shared place, where the feature cache and the checkpoints stay too. Then the closed loop
    (``_closed_loop``): served traffic drifts, ``imgpipe monitor`` starts the pipeline again on
    the data plus the labelled feedback, and the served model moves to version 2."""
    from mlflow.tracking import MlflowClient

    from components.push import serving_versions
    from imgpipe.tracking.runs import flatten
    from pipelines.kubeflow import run_local

    monkeypatch.chdir(tmp_path)
    make_class_folders(tmp_path / "data", CLASSES, size=48, seed=1)
    params = _params()
    params["data"].update(source="data", metadata_csv=None)
    params["validate"].update(labels=sorted(CLASSES), min_images_per_class=2)
    params["model"].update(image_size=32)
    params["augment"].update(views_per_image=1, preview_images=2)
    params["train"].update(epochs=2, batch_size=32)
    params["finetune"].update(epochs=1, batch_size=32, unfreeze_layers=20)
    params["evaluate"].update(
        slice_by=[],
        class_groups={},
        min_accuracy=0.0,
        min_balanced_accuracy=0.0,
        non_inferiority_margin=1.0,
        min_compared_images=1,
    )
    # The int8-weights model is test_export_registry's: skip it here.
    params["export"].update(warmup_images=2, representative_images=8, int8_weights=False)
    params["serving"].update(model_name="tiny")  # model_base_path: params.yaml's, relative
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    shared = tmp_path / "shared"  # the claim on a cluster
    arguments = {
        "source": str(tmp_path / "data"),
        "data_version": "v-test",
        "mlflow_tracking_uri": uri,
        "shared_volume": str(shared),
    }

    run_local(params, tmp_path / "root", **arguments)

    (run_dir,) = (tmp_path / "root").iterdir()
    ran = {p.name for p in run_dir.iterdir() if (p / "executor_output.json").is_file()}
    assert ran == set(ORDER), ran
    expected = {
        "ingest/out/manifest.csv",
        "ingest/out/labels.txt",
        "validate/data_docs",
        "augment/out/shards",
        "train/out/model.keras",
        "train/history",
        "finetune/out/model.keras",
        "evaluate/summary",
        "evaluate/out/blessing.json",
        "export/out/serving/tiny/1/saved_model.pb",
        "export/out/tflite/model_int8.tflite",
        "export/model_card",
    }
    for relative in expected:
        assert (run_dir / relative).exists(), relative
    metrics = json.loads((run_dir / "evaluate" / "executor_output.json").read_text())
    assert "artifacts" in metrics

    client = MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "imgpipe"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["orchestrator"] == "kubeflow"
    for stage in STAGES:
        assert run.data.tags[f"stage.{stage}"] == "done", stage
        assert f"{stage}.wall_seconds" in run.data.metrics, stage
        assert run.data.metrics[f"{stage}.peak_rss_mb"] > 100, stage  # MiB: TF alone is more
    assert run.data.params["finetune.unfreeze_layers"] == "20"
    assert set(flatten(params)) <= set(run.data.params)  # every param, not only the stages'
    assert run.data.tags["data.version"] == "v-test"
    assert run.info.run_name.startswith("kfp-")
    contexts = sorted(
        {t.key: t.value for t in i.tags}["mlflow.data.context"] for i in run.inputs.dataset_inputs
    )
    assert contexts == ["test", "train", "validation"], contexts
    assert run.data.tags["backbone"] == params["model"]["backbone"]
    for stage in ("ingest", "finetune"):  # imported from the step's own log, which is named
        assert run.data.tags[f"stage.{stage}.log_run"] != run.info.run_id, stage
    epochs = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in epochs] == [0, 1, 2, 3]  # 2 frozen, 1 fine-tuning, 1 quantized
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"ingest", "validate", "augment", "finetune", "evaluate", "export"} <= logged, logged
    champion = client.get_model_version_by_alias("tiny", "champion")
    assert champion.run_id == run.info.run_id
    models = shared / params["serving"]["model_base_path"]
    assert serving_versions(models, "tiny") == [1]
    assert not (tmp_path / "models").exists()  # nothing in the step's working folder
    features = sorted((shared / "outputs" / "cache" / "features").glob("*.npz"))
    assert len(features) == 2, features  # train and val, keyed by content
    assert len(list((shared / "outputs" / "finetune_checkpoints").glob("*/state.json"))) == 1

    _closed_loop(tmp_path, params, shared, client)


def _closed_loop(tmp_path: Path, params: dict[str, Any], shared: Path, client: Any) -> None:
    """The loop, after the first run made version 1 champion: the server serves the shared
    place's models/ (as TF Serving does on the claim) behind the logging sidecar. Traffic darker
    than anything the champion trained on arrives, with its true labels as feedback.
    ``imgpipe monitor --retrain kfp-local`` finds the drift and runs the pipeline on the data
    plus that feedback (a new data version); the gate blesses the candidate, push puts version 2
    beside version 1, and the server, called all along, answers with version 2 without a failed
    request. The monitor's MLflow run links the training run it started."""
    from commands import main
    from components.push import serving_versions
    from serving.client import ServingClient, ServingClientError
    from serving.config import MODEL_CONFIG, model_config_for, read_model_config, write_config
    from serving.process import SIDECAR, ServerProcess
    from serving.request_log import read_logs

    models = shared / params["serving"]["model_base_path"]
    params = copy.deepcopy(params)
    params["request_log"].update(directory=str(tmp_path / "logs"), rotate_seconds=1)
    params["monitor"].update(min_requests=24, permutations=200, directory="monitor")
    # The retraining is what the loop proves: a float model and its float32 file (the first run
    # had the quantization-aware epoch and the int8 file).
    params["finetune"].update(quantization_aware_epochs=0)
    params["export"].update(int8=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    darkened: list[bytes] = []  # each also written as labelled feedback
    for label, paths in make_class_folders(
        tmp_path / "new", {"a": 10, "b": 10, "c": 10}, 48, 7
    ).items():
        (tmp_path / "feedback" / label).mkdir(parents=True)
        for path in paths:
            darkened.append(encode_image(np.asarray(Image.open(path)) // 4, "PNG"))
            (tmp_path / "feedback" / label / path.name).write_bytes(darkened[-1])
    bright = (tmp_path / "data" / "a" / "a_000.png").read_bytes()

    # serving/models.config, as make serve renders it: the newest 2 versions are served
    template = read_model_config(MODEL_CONFIG)
    config = write_config(model_config_for("tiny", template), tmp_path / "models.config", "test")
    server_args = ["--model_config_file", str(config), "--mount", f"{models}:/models"]
    answered: list[int | str] = []  # the version that answered each steady call, or the error
    stop = threading.Event()
    with (
        ServerProcess(
            [*server_args, "--file_system_poll_wait_seconds", "0.5"], tmp_path / "srv"
        ) as server,
        ServerProcess(
            ["sidecar", "--upstream", server.address, "--params", str(tmp_path / "params.yaml")],
            tmp_path / "sidecar",
            module=SIDECAR,
            timeout=60,
        ) as sidecar,
        ServingClient(sidecar.address, timeout=30) as serving,
    ):
        for image in darkened:
            assert serving.predict_bytes([image], model="tiny")["model_version"] == 1

        def steady() -> None:
            with ServingClient(sidecar.address, timeout=30) as caller:
                while not stop.is_set():
                    try:
                        answered.append(
                            int(caller.predict_bytes([bright], model="tiny")["model_version"])
                        )
                    except ServingClientError as exc:
                        answered.append(str(exc))
                    stop.wait(0.1)

        deadline = time.monotonic() + 30
        while sum(1 for _ in read_logs(tmp_path / "logs")) < 30:  # the closed files
            assert time.monotonic() < deadline, "the sidecar closed no log file"
            time.sleep(0.2)
        caller = threading.Thread(target=steady)
        caller.start()
        try:
            code = main(
                [
                    "monitor",
                    "--params",
                    str(tmp_path / "params.yaml"),
                    "--feedback",
                    str(tmp_path / "feedback"),
                    "--retrain",
                    "kfp-local",
                    "--pipeline-root",
                    str(tmp_path / "root2"),
                    "--shared-volume",
                    str(shared),
                ]
            )
            deadline = time.monotonic() + 60
            while not answered or answered[-1] != 2:
                assert time.monotonic() < deadline, answered[-5:]
                time.sleep(0.2)
        finally:
            stop.set()
            caller.join()
        status = serving.status("tiny")
    assert code == 0
    assert [a for a in answered if not isinstance(a, int)] == []  # no failed call
    assert answered[0] == 1 and sorted(answered) == answered  # 1, then 2 once loaded
    assert sorted(status) == [(1, "AVAILABLE"), (2, "AVAILABLE")], status

    state = json.loads((tmp_path / "monitor" / "state.json").read_text())
    retraining = state["retraining"]
    assert any(r.startswith("input drift") for r in retraining["reasons"]), retraining
    assert (retraining["how"], retraining["finished"], retraining["blessed"]) == (
        "kfp-local",
        True,
        True,
    )
    assert (retraining["registered_version"], retraining["feedback_images"]) == (2, 30)
    champion = client.get_model_version_by_alias("tiny", "champion")
    assert (int(champion.version), champion.run_id) == (2, retraining["run"])
    assert champion.tags["serving_version"] == "2"
    trained = client.get_run(champion.run_id)
    assert trained.data.tags["data.version"] == f"feedback-{retraining['started']}"
    assert trained.data.tags["stage.ingest"] == "done"  # a new data version: nothing reused
    (monitoring,) = [e for e in client.search_experiments() if e.name == "monitoring"]
    (check,) = client.search_runs([monitoring.experiment_id])
    assert check.data.tags["retraining.1"] == champion.run_id
    assert check.data.metrics["retraining_started"] == 1.0
    assert serving_versions(models, "tiny") == [1, 2]
    feedback = sorted(p.name for p in (tmp_path / "data").glob("*/feedback-*/*.png"))
    assert feedback == sorted(p.name for p in (tmp_path / "feedback").glob("*/*.png"))


class _KfpStub(BaseHTTPRequestHandler):
    """Answers the KFP v2beta1 API calls the client makes; records each one."""

    calls: ClassVar[list[tuple[str, str, Any]]] = []
    run_state: ClassVar[str] = "RUNNING"

    def _reply(self, payload: Any) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.calls.append(("GET", self.path, None))
        if self.path.startswith("/apis/v2beta1/healthz"):
            self._reply({"commit_sha": "stub", "tag_name": "2.16.1", "multi_user": False})
        elif self.path.startswith("/apis/v2beta1/experiments"):
            self._reply({"experiments": [], "total_size": 0})
        elif self.path.startswith("/apis/v2beta1/runs/"):
            self._reply({"run_id": self.path.rsplit("/", 1)[-1], "state": self.run_state})
        elif self.path.startswith("/apis/v2beta1/recurringruns"):
            self._reply(
                {
                    "recurringRuns": [
                        {
                            "recurring_run_id": "rr-1",
                            "display_name": "imgpipe-nightly",
                            "status": "ENABLED",
                            "trigger": {"cron_schedule": {"cron": "0 0 2 * * *"}},
                        }
                    ],
                    "total_size": 1,
                }
            )
        else:
            self._reply({})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.calls.append(("POST", self.path, body))
        if self.path == "/apis/v2beta1/experiments":
            self._reply({"experiment_id": "exp-1", "display_name": body["display_name"]})
        elif self.path == "/apis/v2beta1/recurringruns":
            self._reply({**body, "recurring_run_id": "rr-1"})
        elif self.path == "/apis/v2beta1/runs":
            self._reply({**body, "run_id": "run-1", "state": "PENDING"})
        else:
            self._reply({})

    def do_DELETE(self) -> None:
        self.calls.append(("DELETE", self.path, None))
        self._reply({})

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def kfp_stub():
    _KfpStub.calls = []
    _KfpStub.run_state = "RUNNING"
    server = ThreadingHTTPServer(("127.0.0.1", 0), _KfpStub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", _KfpStub.calls
    server.shutdown()
    server.server_close()


def test_schedule_list_disable_delete_send_the_right_requests(kfp_stub, capsys):
    """Guards scheduling: the real kfp.Client requests, recorded by a local stub: the
    experiment is looked up then created; the recurring run carries the 6-field cron, the
    compiled pipeline spec with every stage (caching off, the source being a folder) and the
    parameters; list, disable and delete hit their endpoints."""
    from commands import main

    host, calls = kfp_stub
    assert (
        main(
            [
                "pipeline",
                "schedule",
                "--host",
                host,
                "--cron",
                "0 30 2 * * *",
                "--experiment",
                "nightly",
                "--source",
                "/data/elpv",
                "--data-version",
                "2026-11-21",
                "--params",
                str(PROJECT / "params.yaml"),
            ]
        )
        == 0
    )
    paths = [(m, p.split("?")[0]) for m, p, _ in calls]
    assert ("GET", "/apis/v2beta1/healthz") in paths
    assert ("GET", "/apis/v2beta1/experiments") in paths
    (created,) = [b for m, p, b in calls if (m, p) == ("POST", "/apis/v2beta1/experiments")]
    assert created["display_name"] == "nightly"
    (recurring,) = [b for m, p, b in calls if (m, p) == ("POST", "/apis/v2beta1/recurringruns")]
    assert recurring["display_name"] == "imgpipe-nightly"
    assert recurring["experiment_id"] == "exp-1"
    assert recurring["trigger"]["cron_schedule"]["cron"] == "0 30 2 * * *"
    assert recurring["mode"] == "ENABLE"
    assert int(recurring["max_concurrency"]) == 1
    spec = recurring["pipeline_spec"]["pipeline_spec"]
    assert set(spec["root"]["dag"]["tasks"]) == set(ORDER)
    parameters = recurring["runtime_config"]["parameters"]
    assert parameters["source"] == "/data/elpv"
    assert parameters["data_version"] == "2026-11-21"
    assert parameters["mlflow_tracking_uri"].startswith("http://mlflow.")
    # a nightly run over a folder must not reuse the first night's data: caching off
    tasks = spec["root"]["dag"]["tasks"].values()
    assert not any(t.get("cachingOptions", {}).get("enableCache") for t in tasks)
    assert "scheduled 'imgpipe-nightly' (rr-1)" in capsys.readouterr().out

    calls.clear()
    assert main(["pipeline", "schedules", "--host", host]) == 0
    assert "rr-1  ENABLED  0 0 2 * * *  imgpipe-nightly" in capsys.readouterr().out
    assert main(["pipeline", "disable-schedule", "--host", host, "rr-1"]) == 0
    assert main(["pipeline", "delete-schedule", "--host", host, "rr-1"]) == 0
    paths = [(m, p.split("?")[0]) for m, p, _ in calls]
    assert ("GET", "/apis/v2beta1/recurringruns") in paths
    assert ("POST", "/apis/v2beta1/recurringruns/rr-1:disable") in paths
    assert ("DELETE", "/apis/v2beta1/recurringruns/rr-1") in paths


def test_monitor_retrain_kfp_creates_a_cluster_run_that_stays_open_until_it_ends(
    kfp_stub, tmp_path, monkeypatch
):
    """``imgpipe monitor --retrain kfp`` (the CronJob's) creates one run of the compiled pipeline
    through the real kfp.Client: caching off, the data version named after the check, the
    pipeline's own claim unless ``--shared-volume`` names one. The retraining stays open while
    the run is RUNNING and closes when it has SUCCEEDED."""
    from pipelines.retrain import Retraining

    host, calls = kfp_stub
    monkeypatch.chdir(tmp_path)
    cluster = Retraining("kfp", kfp_host=host, mlflow_tracking_uri="http://mlflow:5000")
    retraining = cluster.start(_params(), None, "20261205T000000")
    assert retraining == {"how": "kfp", "feedback_images": 0, "run": "run-1"}
    (run,) = [b for m, p, b in calls if (m, p) == ("POST", "/apis/v2beta1/runs")]
    assert run["display_name"] == "retrain-20261205T000000"
    parameters = run["runtime_config"]["parameters"]
    assert parameters["data_version"] == "feedback-20261205T000000"
    assert parameters["mlflow_tracking_uri"] == "http://mlflow:5000"
    assert "shared_volume" not in parameters  # the compiled default: the claim infra/k8s makes
    spec = run["pipeline_spec"]
    tasks = spec.get("pipeline_spec", spec)["root"]["dag"]["tasks"]  # with a platform_spec
    assert not any(t.get("cachingOptions", {}).get("enableCache") for t in tasks.values())

    cluster.close_if_done(retraining)
    assert not retraining.get("finished")
    _KfpStub.run_state = "SUCCEEDED"
    cluster.close_if_done(retraining)
    assert (retraining["finished"], retraining["state"]) == (True, "SUCCEEDED")


def test_a_five_field_cron_is_refused_before_any_request(kfp_stub, capsys):
    from commands import main

    host, calls = kfp_stub
    code = main(["pipeline", "schedule", "--host", host, "--cron", "0 2 * * *"])
    assert code == 1
    assert "6 fields" in capsys.readouterr().err
    assert calls == []
