"""End to end: ``dvc repro`` runs ingest and validate on a tiny data set in a throwaway git repo.

The repo gets the project's dvc.yaml, an edited params.yaml and a copy of components/ (the stage
deps); the ``imgpipe`` commands come from the project's venv. MLflow logs into a SQLite file in
tmp_path, never into the project's mlflow.db. Three ``dvc repro`` runs in all (each one starts
TensorFlow), so the checks share one module-scoped repo and run in order.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

PROJECT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CLASSES = ("circle", "square", "triangle")
IMAGES_PER_CLASS = 16  # ingest's 75/10/15 rounding gives 10 train, 2 val, 4 test per class
EXPERIMENT = "imgpipe-e2e"


def write_tiny_dataset(root: Path) -> None:
    """``root/<class>/<class>_NN.png``: 48x48 grayscale PNGs, every one distinct."""
    for class_index, label in enumerate(CLASSES):
        (root / label).mkdir(parents=True)
        for i in range(IMAGES_PER_CLASS):
            rng = np.random.default_rng([class_index, i])
            pixels = rng.integers(0, 256, size=(48, 48), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(root / label / f"{label}_{i:02d}.png")


def edit_params(path: Path, **validate: object) -> None:
    params = yaml.safe_load(path.read_text())
    params["validate"].update(validate)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


class Repo:
    """A temporary git + DVC repo and the environment its commands run in."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            list(args), cwd=self.root, env=self.env, capture_output=True, text=True, timeout=600
        )
        if check:
            assert result.returncode == 0, (
                f"{' '.join(args)} exited {result.returncode}\n"
                f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
            )
        return result

    def mlflow_runs(self) -> list:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.env["MLFLOW_TRACKING_URI"])
        experiment = client.get_experiment_by_name(EXPERIMENT)
        assert experiment is not None, "no stage created the MLflow experiment"
        return client.search_runs(
            [experiment.experiment_id], order_by=["attributes.start_time ASC"]
        )


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    """The repo with the tiny data set committed and tracked by DVC, not yet reproduced."""
    base = tmp_path_factory.mktemp("dvc_e2e")
    root = base / "repo"
    root.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "GIT_"))}
    env.update(
        {
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            "DVC_NO_ANALYTICS": "1",
            "DVC_SITE_CACHE_DIR": str(base / "dvc-site-cache"),
            "DVC_GLOBAL_CONFIG_DIR": str(base / "dvc-global-config"),
            "DVC_SYSTEM_CONFIG_DIR": str(base / "dvc-system-config"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{base / 'mlflow.db'}",
            "MLFLOW_EXPERIMENT_NAME": EXPERIMENT,
            "GX_ANALYTICS_ENABLED": "false",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "GIT_AUTHOR_NAME": "imgpipe tests",
            "GIT_AUTHOR_EMAIL": "tests@example.invalid",
            "GIT_COMMITTER_NAME": "imgpipe tests",
            "GIT_COMMITTER_EMAIL": "tests@example.invalid",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
        }
    )
    repo = Repo(root, env)

    shutil.copy(PROJECT / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(PROJECT / "params.yaml", root / "params.yaml")
    shutil.copy(PROJECT / ".dvcignore", root / ".dvcignore")
    shutil.copytree(
        PROJECT / "components", root / "components", ignore=shutil.ignore_patterns("__pycache__")
    )
    (root / ".gitignore").write_text("/mlartifacts/\n__pycache__/\n")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(source="data", metadata_csv=None)
    params["validate"].update(labels=list(CLASSES), min_images_per_class=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_tiny_dataset(root / "data")

    repo.run("git", "init", "-q")
    repo.run("dvc", "init", "-q")
    repo.run("dvc", "add", "-q", "data")
    repo.run("git", "add", "-A")
    repo.run("git", "commit", "-q", "-m", "tiny data set")
    return repo


@pytest.fixture(scope="module")
def first_repro(repo: Repo) -> subprocess.CompletedProcess[str]:
    """The first ``dvc repro``: runs both stages."""
    return repo.run("dvc", "repro")


def test_repro_runs_ingest_and_validate_and_writes_outputs(repo, first_repro):
    """Guards the DAG wiring: dvc repro runs both stage commands from dvc.yaml with the
    params sections they read and leaves every declared output and metric behind."""
    out = first_repro.stdout + first_repro.stderr
    assert "Running stage 'ingest'" in out and "Running stage 'validate'" in out, out
    root = repo.root
    manifest = (root / "outputs/ingest/manifest.csv").read_text().splitlines()
    assert len(manifest) == 1 + len(CLASSES) * IMAGES_PER_CLASS
    shards = sorted(p.name for p in (root / "outputs/ingest/shards").glob("*.tfrecord"))
    assert {name.split("-")[0] for name in shards} == {"train", "val", "test"}, shards
    assert (root / "outputs/validate/data_docs/index.html").is_file()
    assert (root / "outputs/validate/validation_results.json").is_file()
    ingest_metrics = json.loads((root / "metrics/ingest.json").read_text())
    assert ingest_metrics["images"] == len(CLASSES) * IMAGES_PER_CLASS
    assert ingest_metrics["quarantined"] == 0
    assert json.loads((root / "metrics/validate.json").read_text())["success"] is True
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"ingest", "validate"}
    validate_params = lock["stages"]["validate"]["params"]["params.yaml"]["validate"]
    assert validate_params["min_images_per_class"] == 2
    assert validate_params["labels"] == list(CLASSES)


def test_pipeline_is_up_to_date_after_repro(repo, first_repro):
    """Guards reproducibility bookkeeping: right after dvc repro, dvc status sees nothing
    changed (no stage writes into its own deps, no output left untracked)."""
    status = repo.run("dvc", "status", "--json")
    assert json.loads(status.stdout or "{}") == {}, status.stdout


def test_second_repro_runs_no_stage(repo, first_repro):
    """Guards caching: a second dvc repro with nothing changed skips both stages."""
    second = repo.run("dvc", "repro")
    out = second.stdout + second.stderr
    assert "Running stage" not in out, out
    assert "didn't change, skipping" in out or "up to date" in out, out


def test_both_stages_log_into_one_mlflow_run(repo, first_repro):
    """Guards the shared MLflow run: every stage of one dvc repro logs into the same run,
    with each stage's params, its done tag and its artifacts."""
    from mlflow.tracking import MlflowClient

    runs = repo.mlflow_runs()
    assert len(runs) == 1, [r.data.tags for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["stage.ingest"] == "done"
    assert run.data.tags["stage.validate"] == "done"
    assert run.data.tags["imgpipe.execution"].count(":") == 2  # host:pid:start of dvc repro
    params = run.data.params
    assert any(k.startswith("ingest.") for k in params), params
    assert any(k.startswith("validate.") for k in params), params
    assert params["validate.labels"] == ",".join(CLASSES)
    assert run.data.metrics["ingest.images"] == len(CLASSES) * IMAGES_PER_CLASS
    assert run.data.metrics["validate.success"] == 1.0
    client = MlflowClient(tracking_uri=repo.env["MLFLOW_TRACKING_URI"])
    ingest_artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "ingest")}
    assert {
        "ingest/manifest.csv",
        "ingest/quarantine_report.csv",
        "ingest/labels.txt",
    } <= ingest_artifacts
    docs = {a.path for a in client.list_artifacts(run.info.run_id, "validate/data_docs")}
    assert "validate/data_docs/index.html" in docs


def test_failed_expectation_stops_repro_naming_expectation_and_row(repo, first_repro):
    """Guards the pipeline gate: with a class below min_images_per_class, dvc repro exits
    non-zero and its output names the failing expectation and a class/split row; the
    MLflow run of that repro is marked failed. Runs last: it edits params.yaml."""
    # The other tests of this module must have seen the good state first.
    assert len(repo.mlflow_runs()) == 1
    edit_params(repo.root / "params.yaml", min_images_per_class=1000)

    failed = repo.run("dvc", "repro", check=False)

    out = failed.stdout + failed.stderr
    assert failed.returncode != 0, out
    assert "data validation failed" in out, out
    assert "expect_column_values_to_be_between on column 'images'" in out, out
    assert f"{CLASSES[0]}/train" in out and f"{CLASSES[-1]}/test" in out, out
    assert "Running stage 'ingest'" not in out  # only the validate params changed
    runs = repo.mlflow_runs()
    assert len(runs) == 2
    run = runs[-1]
    assert run.info.status == "FAILED"
    assert run.data.tags["stage.validate"] == "failed"
    assert "stage.ingest" not in run.data.tags
