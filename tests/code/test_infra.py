"""infra/: the kustomize overlays build (kubectl from PyPI, offline) into manifests that validate
strictly against Kubernetes 1.33 schemas, with TF Serving on GPU nodes in the gpu overlay; the
Dockerfiles pass checks that can fail."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[2]
KUBECTL = Path(sys.executable).parent / "kubectl"
KUBERNETES = "1.33"
DOCKERFILES = sorted((PROJECT / "infra" / "docker").glob("*.Dockerfile"))


def kustomize(folder: Path) -> list[dict]:
    """The objects ``kubectl kustomize`` builds from ``folder``."""
    result = subprocess.run(
        [str(KUBECTL), "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(folder)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def build(overlay: str) -> list[dict]:
    return kustomize(PROJECT / "infra" / "k8s" / "overlays" / overlay)


def _by_kind(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


@pytest.mark.parametrize("overlay", ["local", "gpu"])
def test_overlays_build_and_validate_strictly(overlay):
    """Guards the manifests: every object the overlay builds validates with
    kubernetes-validate --strict (unknown fields are errors) for Kubernetes 1.33; the set of
    objects is the one the README describes; no Secret is committed, only referenced."""
    import kubernetes_validate

    docs = build(overlay)
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
    config_map = [k for k in kinds if k.startswith("ConfigMap/tf-serving-config-")]
    assert len(config_map) == 1, kinds
    assert [k for k in kinds if k not in config_map] == sorted(
        [
            "CronJob/imgpipe-monitor",
            "Deployment/mlflow",
            "Deployment/tf-serving",
            "HorizontalPodAutoscaler/tf-serving",
            "Job/mlflow-access",
            "Namespace/imgpipe",
            "NetworkPolicy/mlflow",
            "NetworkPolicy/tf-serving",
            "PersistentVolumeClaim/imgpipe-shared",
            "PodDisruptionBudget/tf-serving",
            "Service/mlflow",
            "Service/tf-serving",
            "ServiceAccount/mlflow",
            "ServiceAccount/tf-serving",
        ]
    )
    mlflow = _by_kind(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    assert {s["secretRef"]["name"] for s in mlflow["envFrom"]} == {"mlflow-db", "mlflow-artifacts"}
    assert "--allowed-hosts" in mlflow["args"][0] and "localhost" in mlflow["args"][0]


def _container(pod: dict, name: str) -> dict:
    (container,) = [c for c in pod["containers"] if c["name"] == name]
    return container


def _secret_refs(env: list[dict]) -> dict[str, tuple[str, str]]:
    return {
        e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in env
        if "secretKeyRef" in e.get("valueFrom", {})
    }


def test_mlflow_authenticates_and_the_job_provisions_the_pipeline_account(tmp_path, monkeypatch):
    """Guards who may promote a model in the cluster: MLflow runs its basic-auth app with READ
    as everyone's default, the admin and the CSRF key from the Secret mlflow-auth, its auth
    config written at start into a memory volume (never the image, never a ConfigMap); the
    mlflow-access Job runs `imgpipe mlflow-access` as that admin with the pipeline's account
    and the readers mounted from their Secrets. Every credential is a reference."""
    docs = build("gpu")
    deployment = _by_kind(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]
    (server,) = deployment["containers"]
    script = server["args"][0]
    assert "exec mlflow server --app-name basic-auth" in script
    assert "default_permission = READ" in script and "database_uri = %s" in script
    # The script, run here up to the server's start, writes a config MLflow reads back with
    # the database URI as given (a percent-encoded password included), for its user alone.
    prelude, _, server_command = script.partition(" && exec ")
    assert server_command.startswith("mlflow server --app-name basic-auth"), script
    # The database password never reaches a command line (ps, /proc/<pid>/cmdline): the
    # server reads its store from the environment.
    assert "--backend-store-uri" not in server_command and "PASSWORD" not in server_command
    config = tmp_path / "basic_auth.ini"
    password = f"p%40{secrets.token_hex(4)}%2F"  # percent-encoded @ and /, as a URI needs
    database = {"POSTGRES_USER": "mlflow", "POSTGRES_PASSWORD": password, "POSTGRES_HOST": "db"}
    database["POSTGRES_DB"] = "mlflow"
    store = subprocess.run(
        ["sh", "-c", f'{prelude} && printf %s "$MLFLOW_BACKEND_STORE_URI"'],
        env={**database, "MLFLOW_AUTH_CONFIG_PATH": str(config), "PATH": "/usr/bin:/bin"},
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert store == f"postgresql://mlflow:{password}@db:5432/mlflow"
    assert config.stat().st_mode & 0o777 == 0o600
    from mlflow.server.auth.config import read_auth_config

    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(config))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", secrets.token_hex(8))  # read, unused
    auth = read_auth_config()
    assert auth.database_uri == f"postgresql://mlflow:{password}@db:5432/mlflow"
    assert auth.default_permission == "READ"
    env = {e["name"]: e.get("value") for e in server["env"]}
    folder = str(Path(env["MLFLOW_AUTH_CONFIG_PATH"]).parent)
    (mount,) = [m for m in server["volumeMounts"] if m["mountPath"] == folder]
    (volume,) = [v for v in deployment["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    assert _secret_refs(server["env"]) == {
        "MLFLOW_AUTH_ADMIN_USERNAME": ("mlflow-auth", "admin-username"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": ("mlflow-auth", "admin-password"),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": ("mlflow-auth", "flask-secret-key"),
    }
    job = _by_kind(docs, "Job", "mlflow-access")["spec"]["template"]["spec"]
    (access,) = job["containers"]
    assert access["command"][:2] == ["imgpipe", "mlflow-access"]
    assert access["image"].startswith("ghcr.io/imgpipe/components:")
    assert _secret_refs(access["env"]) == {
        "MLFLOW_TRACKING_USERNAME": ("mlflow-auth", "admin-username"),
        "MLFLOW_TRACKING_PASSWORD": ("mlflow-auth", "admin-password"),
    }
    flags = dict(a.removeprefix("--").split("=", 1) for a in access["command"][2:])
    volumes = {v["name"]: v["secret"] for v in job["volumes"] if "secret" in v}
    mounted = {
        m["mountPath"]: volumes[m["name"]] for m in access["volumeMounts"] if m["name"] in volumes
    }
    assert mounted[flags["pipeline-account"]]["secretName"] == "mlflow-pipeline"
    assert mounted[flags["readers"]] == {
        "secretName": "mlflow-readers",
        "defaultMode": 0o440,
        "optional": True,
    }


def test_gpu_serving_deployment():
    """Guards TF Serving on GPU nodes: GPU limits, node selector and toleration, the -gpu image,
    the configs from serving/ in a ConfigMap, readiness on the model's status, ports 8500 and
    8501, non-root with a read-only root filesystem, the models read from the shared volume."""
    docs = build("gpu")
    deployment = _by_kind(docs, "Deployment", "tf-serving")
    pod = deployment["spec"]["template"]["spec"]
    server = _container(pod, "tf-serving")
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert server["image"] == "tensorflow/serving:2.21.0-gpu"
    assert server["readinessProbe"]["httpGet"]["path"] == "/v1/models/elpv_defects"
    assert {p["containerPort"] for p in server["ports"]} == {8490, 8501}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    assert "--model_config_file=/config/models.config" in server["args"]
    assert "initContainers" not in pod  # the push writes the volume; nothing fetches at start

    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    for name in ("models.config", "batching.config", "monitoring.config"):
        assert config_map["data"][name] == (PROJECT / "serving" / name).read_text(), name
    assert config_map["data"]["params.yaml"] == (PROJECT / "params.yaml").read_text()
    service = _by_kind(docs, "Service", "tf-serving")
    assert {p["port"] for p in service["spec"]["ports"]} == {8500, 8501}

    local = _by_kind(build("local"), "Deployment", "tf-serving")["spec"]["template"]["spec"]
    local_server = _container(local, "tf-serving")
    assert "nvidia.com/gpu" not in local_server["resources"].get("limits", {})
    assert local_server["image"] == "tensorflow/serving:2.21.0"


@pytest.mark.parametrize("overlay", ["local", "gpu"])
def test_serving_reads_the_volume_the_kubeflow_push_writes(overlay):
    """Guards the shared place: TF Serving mounts, read-only at /models (the base path of
    serving/models.config), the folder params.yaml's serving.model_base_path names inside the
    claim that the Kubeflow pipeline mounts by default (pipelines.kubeflow.SHARED_VOLUME), a
    ReadWriteMany claim since the pipeline's steps and every replica share it (ReadWriteOnce
    on a one-node laptop cluster)."""
    from imgpipe.core.params import load_params
    from pipelines.kubeflow import SHARED_VOLUME

    docs = build(overlay)
    claim = _by_kind(docs, "PersistentVolumeClaim", SHARED_VOLUME)
    modes = {"local": ["ReadWriteOnce"], "gpu": ["ReadWriteMany"]}
    assert claim["spec"]["accessModes"] == modes[overlay]
    pod = _by_kind(docs, "Deployment", "tf-serving")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert volume["persistentVolumeClaim"]["claimName"] == SHARED_VOLUME
    server = _container(pod, "tf-serving")
    (mount,) = [m for m in server["volumeMounts"] if m["name"] == volume["name"]]
    base = load_params(PROJECT / "params.yaml")["serving"]["model_base_path"]
    assert (mount["mountPath"], mount["subPath"], mount["readOnly"]) == ("/models", base, True)


@pytest.mark.parametrize("overlay", ["local", "gpu"])
def test_serving_grpc_is_tls_from_a_referenced_secret(overlay):
    """Guards TLS on the gRPC port clients reach, the logging sidecar's: --ssl-config-file names
    the key ssl.config of the Secret tf-serving-tls (referenced, not committed, not optional),
    mounted read-only with a mode only root and the pod's fsGroup can read, a group the
    non-root sidecar is in; it passes calls to TF Serving's port inside the pod, which the
    Service does not expose; the probes stay on plaintext REST and TCP connects."""
    docs = build(overlay)
    assert not [d for d in docs if d["kind"] == "Secret"]
    pod = _by_kind(docs, "Deployment", "tf-serving")["spec"]["template"]["spec"]
    server, sidecar = _container(pod, "tf-serving"), _container(pod, "request-log")
    (flag,) = [a for a in sidecar["args"] if a.startswith("--ssl-config-file=")]
    folder, _, name = flag.removeprefix("--ssl-config-file=").rpartition("/")
    (mount,) = [m for m in sidecar["volumeMounts"] if m["mountPath"] == folder]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    secret = volume["secret"]
    assert secret["secretName"] == "tf-serving-tls" and not secret.get("optional", False)
    assert secret["items"] == [{"key": "ssl.config", "path": name}]
    # a Secret's files belong to root and, with fsGroup, to that group, which the sidecar is in
    assert secret["defaultMode"] == 0o440, oct(secret["defaultMode"])
    assert pod["securityContext"]["fsGroup"] and pod["securityContext"]["runAsNonRoot"]
    assert not [a for a in server["args"] if a.startswith("--ssl_config_file")]
    (port,) = [a for a in server["args"] if a.startswith("--port=")]
    assert f"--upstream=127.0.0.1:{port.removeprefix('--port=')}" in sidecar["args"]
    service = _by_kind(docs, "Service", "tf-serving")
    (grpc_port,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc_port["targetPort"] == "grpc" and sidecar["ports"][0]["name"] == "grpc"
    for probe in ("readinessProbe", "startupProbe"):
        assert server[probe]["httpGet"]["port"] == "http", probe
    assert server["livenessProbe"]["tcpSocket"]["port"] == "grpc-upstream"
    assert sidecar["livenessProbe"]["tcpSocket"]["port"] == "grpc"


@pytest.mark.parametrize("overlay", ["local", "gpu"])
def test_the_sidecar_logs_into_the_shared_volume_the_monitor_reads(overlay):
    """Guards the closed loop's wiring: each serving pod's sidecar writes request_logs/<pod>
    on the shared claim; the hourly monitor CronJob reads request_logs/ there, with the
    champion's models/ beside it, and may create one Kubeflow run at a time."""
    docs = build(overlay)
    pod = _by_kind(docs, "Deployment", "tf-serving")["spec"]["template"]["spec"]
    sidecar = _container(pod, "request-log")
    (mount,) = [m for m in sidecar["volumeMounts"] if m["mountPath"] == "/request_logs"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == "imgpipe-shared"
    assert {"--log-dir=/request_logs", "--log-folder=$(POD_NAME)"} <= set(sidecar["args"])
    assert sidecar["command"] == ["imgpipe", "sidecar"]
    cron = _by_kind(docs, "CronJob", "imgpipe-monitor")["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    job = cron["jobTemplate"]["spec"]["template"]["spec"]
    (monitor,) = job["containers"]
    (shared,) = [m for m in monitor["volumeMounts"] if m["name"] == "shared"]
    assert f"--log-dir={shared['mountPath']}/{mount['subPath']}" in monitor["args"]
    assert monitor["workingDir"] == shared["mountPath"]  # models/ and outputs/monitor there
    assert "--retrain=kfp" in monitor["args"]
    # data.source (data/, relative) holds the feedback it appends: the path it gives the
    # pipeline is the claim's, mounted where the pipeline's steps mount it
    from pipelines.kubeflow_step import SHARED_MOUNT

    assert shared["mountPath"] == SHARED_MOUNT


def test_manifests_serve_the_params_model_name():
    """Guards the model name in the manifests against params.yaml's serving.model_name (its
    home): the readiness and startup probes ask for its status, and every model path in every
    object (the ConfigMap's models.config included) names it. When the name changes, change
    serving/models.config and infra/k8s/base/serving.yaml (infra/README.md)."""
    from serving.config import served_model_name

    name = served_model_name(PROJECT / "params.yaml")
    for overlay in ("local", "gpu"):
        docs = build(overlay)
        pod = _by_kind(docs, "Deployment", "tf-serving")["spec"]["template"]["spec"]
        server = _container(pod, "tf-serving")
        for probe in ("readinessProbe", "startupProbe"):
            assert server[probe]["httpGet"]["path"] == f"/v1/models/{name}", (overlay, probe)
        mentioned = set(re.findall(r"/models/([\w.-]+)", json.dumps(docs)))
        assert mentioned == {name}, f"{overlay}: model paths name {sorted(mentioned)}, not {name!r}"


def _dockerfile(path: Path) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """ARG defaults and (instruction, argument) pairs, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    args, steps = {}, []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        steps.append((instruction.upper(), rest.strip()))
        if instruction.upper() == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key.strip()] = value.strip()
    return args, steps


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_checks(path):
    """Guards the images: the base is pinned by a version tag (never latest), the last USER
    is a non-root uid, the components image installs the project from its pins, and nothing
    that looks like a secret is baked in."""
    args, steps = _dockerfile(path)
    bases = [
        re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest) for i, rest in steps if i == "FROM"
    ]
    assert bases, path
    for base in bases:
        name, _, tag = base.split()[0].rpartition(":")
        assert name and re.fullmatch(r"\d+\.\d+\.\d+(-gpu|-slim)?", tag), base
    users = [rest for i, rest in steps if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert [i for i, _ in steps].index("USER") > max(
        n for n, (i, _) in enumerate(steps) if i in ("RUN", "COPY")
    ) - 2  # the user switch comes after the installs
    if path.name == "components.Dockerfile":
        assert any(
            i == "RUN" and "pip install" in r and "-c requirements.lock ." in r for i, r in steps
        )
        assert any(i == "COPY" and "requirements.lock" in r for i, r in steps)
    if path.name == "mlflow.Dockerfile":  # every package from the lock, none resolved at build
        assert any(i == "RUN" and "pip install --no-deps -r" in r for i, r in steps)
        assert any(i == "COPY" and "mlflow-server.lock" in r for i, r in steps)
    secrets = re.compile(
        r"(AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY|(password|secret|token)\s*=\s*\S+)",
        re.IGNORECASE,
    )
    for instruction, rest in steps:
        assert not secrets.search(rest), (instruction, rest)
        if instruction == "ENV":
            assert not re.search(r"(PASSWORD|SECRET|TOKEN|KEY)\w*=", rest, re.I), rest


def test_dockerignore_keeps_data_models_and_secrets_out():
    ignored = set((PROJECT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "data", "outputs", "models", "mlflow.db", ".env"} <= ignored


TRAINER = PROJECT / "infra" / "k8s" / "trainer"
TRAINJOB_EXAMPLE = TRAINER / "trainjob-example.yaml"


def build_trainer() -> list[dict]:
    return kustomize(TRAINER)


def _lost(given: object, back: object, path: str = "") -> str | None:
    """The first path where ``given`` has something that ``back`` lacks or changed (``back``
    may add defaults, such as a port's protocol)."""
    if isinstance(given, dict):
        if not isinstance(back, dict):
            return f"{path}: {back!r} is no mapping"
        for key, value in given.items():
            if key not in back:
                return f"{path}.{key}: unknown field"
            lost = _lost(value, back[key], f"{path}.{key}")
            if lost:
                return lost
        return None
    if isinstance(given, list):
        if not isinstance(back, list) or len(back) != len(given):
            return f"{path}: list changed"
        for i, (item, item_back) in enumerate(zip(given, back, strict=True)):
            lost = _lost(item, item_back, f"{path}[{i}]")
            if lost:
                return lost
        return None
    return None if given == back else f"{path}: {given!r} became {back!r}"


def validate_trainer(doc: dict) -> None:
    """Strict schema check of a Kubeflow Trainer object: the pydantic models of Trainer's
    OpenAPI spec (kubeflow-trainer-api, core v1 types included) check every type, and a round
    trip through them must keep every field (their from_dict drops unknown ones silently)."""
    from kubeflow_trainer_api import models

    group, version = doc["apiVersion"].split("/")
    assert group == "trainer.kubeflow.org", doc["apiVersion"]
    model = getattr(models, f"Trainer{version.capitalize()}{doc['kind']}")
    lost = _lost(doc, model.from_dict(doc).to_dict())
    assert lost is None, f"{doc['kind']}/{doc['metadata']['name']}{lost}"


def test_trainer_manifests_validate_strictly():
    """Guards infra/k8s/trainer: the ClusterTrainingRuntime and the example TrainJob validate
    strictly against Trainer's API (v1alpha1), the runtime's Job template as a batch/v1 Job and
    the RBAC with kubernetes-validate --strict (1.33); the runtime runs the components image on
    one GPU per node with the port and the JobSet env that imgpipe.model.trainjob reads, under the
    name and replicated job that pipelines.kubeflow_trainer refers to."""
    import kubernetes_validate

    from imgpipe.model.trainjob import JOBSET_ENV, TF_PORT
    from pipelines.kubeflow_trainer import NODE, RUNTIME

    docs = build_trainer()
    assert sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs) == [
        f"ClusterTrainingRuntime/{RUNTIME}",
        "Role/imgpipe-trainjob-launcher",
        "RoleBinding/imgpipe-trainjob-launcher",
    ]
    for doc in docs:
        if doc["apiVersion"].startswith("trainer."):
            validate_trainer(doc)
        else:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    validate_trainer(yaml.safe_load(TRAINJOB_EXAMPLE.read_text()))

    runtime = _by_kind(docs, "ClusterTrainingRuntime", RUNTIME)
    (job,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert job["name"] == NODE
    assert job["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"]
    kubernetes_validate.validate(
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": NODE}, **job["template"]},
        KUBERNETES,
        strict=True,
    )
    pod = job["template"]["spec"]["template"]["spec"]
    (node,) = pod["containers"]
    assert node["name"] == NODE
    images = yaml.safe_load(
        (PROJECT / "infra" / "k8s" / "images" / "kustomization.yaml").read_text()
    )
    (components,) = [i for i in images["images"] if i["name"] == "imgpipe-components"]
    assert node["image"] == f"{components['newName']}:{components['newTag']}"
    assert node["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert [p["containerPort"] for p in node["ports"]] == [TF_PORT]
    from_downward_api = {e["name"] for e in node["env"] if "valueFrom" in e}
    # the Job controller sets JOB_COMPLETION_INDEX, the TrainJob IMGPIPE_NUM_NODES
    assert from_downward_api == set(JOBSET_ENV) - {"JOB_COMPLETION_INDEX", "IMGPIPE_NUM_NODES"}


def test_trainer_strict_check_catches_a_misspelt_field():
    """Guards the strict check itself: a misspelt field anywhere (the pod template included)
    and a value of the wrong type are errors naming the path."""
    import pydantic

    runtime = next(d for d in build_trainer() if d["kind"] == "ClusterTrainingRuntime")
    pod = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]
    pod["template"]["spec"]["containers"][0]["volumeMount"] = []  # for volumeMounts
    with pytest.raises(AssertionError, match=r"containers\[0\]\.volumeMount: unknown field"):
        validate_trainer(runtime)

    trainjob = yaml.safe_load(TRAINJOB_EXAMPLE.read_text())
    trainjob["spec"]["trainer"]["numNode"] = trainjob["spec"]["trainer"].pop("numNodes")
    with pytest.raises(AssertionError, match=r"\.spec\.trainer\.numNode: unknown field"):
        validate_trainer(trainjob)
    trainjob["spec"]["trainer"]["numNodes"] = "2"
    with pytest.raises(pydantic.ValidationError, match=r"numNodes|num_nodes"):
        validate_trainer(trainjob)


def test_trainjob_example_is_what_the_finetune_step_renders():
    """Guards the example against the launcher: infra/k8s/trainer/trainjob-example.yaml is
    pipelines.kubeflow_trainer.render's TrainJob for its name, 2 workers and the claim it names."""
    from pipelines.kubeflow_trainer import SHARED, render

    example = yaml.safe_load(TRAINJOB_EXAMPLE.read_text())
    name = example["metadata"]["name"]
    (patch,) = example["spec"]["runtimePatches"]
    pod = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]
    claim = pod["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert example == render(name, workers=2, claim=claim, job_dir=SHARED / "trainjobs" / name)


PLACEHOLDER = r"(?![$<{]|\.\.\.|(?-i:[A-Z][A-Z0-9_]*\b))"
"""Not a value: ``$VAR``, ``${...}``, ``$(...)``, ``<...>``, ``...`` or another variable's NAME."""
SECRET_KEY = (
    r"\w*(password|passwd|secret[_-]?key|client[_-]?secret|token|api[_-]?key|access[_-]?key)\w*"
)
"""A key whose value is a secret (not one that names a Secret, like ``secretName``)."""
CREDENTIALS = {
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "AWS access key": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "password in a URL": re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s/:@$'\"]+:[^\s/@$'\"{}]+@"),
    # KEY = "value", KEY: value, KEY=value, {name: KEY, value: value}; an unquoted value is
    # taken for a secret when it holds a digit and no code (brackets, calls, attributes)
    "secret assigned a literal": re.compile(
        rf"{SECRET_KEY}[\"']?\s*(,\s*value)?\s*[:=]\s*"
        rf"([\"']{PLACEHOLDER}[^\s\"']{{8,}}[\"']"
        rf"|{PLACEHOLDER}(?=[^\s\"',}}]*\d)[^\s\"',}}()\[\].]{{8,}}(?=[\s,}}]|$))",
        re.IGNORECASE | re.MULTILINE,
    ),
    "Kubernetes Secret with values": re.compile(
        r"^kind:\s*Secret\b(?s:.*?)^(data|stringData):", re.MULTILINE
    ),
}
"""What a committed credential looks like; placeholders and values made at run time do not
match."""


def credentials(text: str) -> list[str]:
    return [name for name, pattern in CREDENTIALS.items() if pattern.search(text)]


def test_the_credential_scan_finds_what_it_looks_for():
    """Guards the scan below: each kind of committed credential is found, and the placeholders
    the README and the manifests use are not."""
    # Written in pieces, so that this file does not hold what the scan looks for.
    planted = {
        "private key": "-----BEGIN EC PRIVATE " + "KEY-----\nMHcCAQEE...",
        "AWS access key": "AWS_ACCESS_KEY_ID=AKIA" + "ABCDEFGHIJKLMNOP",
        "password in a URL": "postgresql://mlflow:hunter2hunter2" + "@db:5432/mlflow",
        "secret assigned a literal": 'MLFLOW_TRACKING_PASSWORD: "s3cr3t-' + 'pipeline-pass"',
        "Kubernetes Secret with values": "apiVersion: v1\nkind: Secret\nmetadata: {}\ndata:\n",
    }
    unquoted = (  # the forms of env files, shells, ini files and manifests
        "MLFLOW_TRACKING_PASSWORD=hunter2" + "hunter2",
        "password: hunter2" + "hunter2",
        "admin_password = hunter2" + "hunter2",
        "- {name: MLFLOW_TRACKING_PASSWORD, value: hunter2" + "hunter2}",
        "export AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG" + "/bPxRfiCYEXAMPLEKEY",
    )
    for kind, text in [*planted.items(), *(("secret assigned a literal", t) for t in unquoted)]:
        assert credentials(text) == [kind], (kind, text, credentials(text))
    placeholders = (
        "postgresql://${POSTGRES_USER}:${POSTGRES_PASSWORD}@${POSTGRES_HOST}:5432/${POSTGRES_DB}",
        '--from-literal=password="$(openssl rand -base64 24)"',
        "password: <the pipeline's password>",
        "--from-literal=POSTGRES_PASSWORD=...",
        'passwords = {user: secrets.token_urlsafe(16) for user in ("admin", "pipeline")}',
        '{"username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD"}',
        'monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", passwords["pipeline"])',
        'password = f"p%40{secrets.token_hex(4)}"',
        '--from-literal=password="$PIPELINE_PASSWORD"',
        "- name: MLFLOW_TRACKING_PASSWORD\n  valueFrom: {secretKeyRef: {name: mlflow-auth}}",
        "auth.update_user_password(name, password)",
        'PIPELINE_SECRET = "mlflow-pipeline"',
        '"secretName": "mlflow-readers"',
    )
    for text in placeholders:
        assert credentials(text) == [], (text, credentials(text))


def test_no_credential_is_in_the_tree():
    """Guards the rule that Secrets are referenced, never committed: no file git would take
    (tracked, or new and not ignored) holds a private key, a cloud key, a password in a URL, a
    secret assigned a literal, or a Kubernetes Secret with values."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=PROJECT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    found = {}
    for name in filter(None, listed):
        path = PROJECT / name
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary: images in tests, none of them a credential
        if kinds := credentials(text):
            found[name] = kinds
    assert not found, found
