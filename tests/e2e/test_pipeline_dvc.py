"""End to end: ``dvc repro`` runs the whole pipeline (ingest, validate, augment, train,
finetune, evaluate, export, push) on a tiny data set in a throwaway git repo.

The repo gets the project's dvc.yaml, an edited params.yaml (32 px Lite0 with its offline
weights, 2 frozen epochs, 1 fine-tuning epoch, no quantization-aware epoch: that default runs
in the Kubeflow end-to-end run and tests/model) and a copy of the stages' code deps; the
``imgpipe`` commands come from the project's venv. MLflow logs into a SQLite file in tmp_path,
never into the project's mlflow.db. Four ``dvc repro`` runs in all (each stage starts
TensorFlow), so the checks share one module-scoped repo; each leaves it up to date, so they
pass in any order.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import mlflow_server, read_csv_rows, rendered_dom
from PIL import Image

from pipelines.growing import dvc_env, dvc_project

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

PROJECT = Path(__file__).resolve().parents[2]
CLASSES = ("circle", "square", "triangle")
IMAGES_PER_CLASS = 16  # ingest's 75/10/15 rounding gives 10 train, 2 val, 4 test per class
EXPERIMENT = "imgpipe-e2e"
STAGES = ("ingest", "validate", "augment", "train", "finetune", "evaluate", "export", "push")
MODEL_NAME = "tiny"
EXPERIMENT_NAME = "lr-5e-4"
NEW_LR = 0.0005
TRAIN_EPOCHS, FINETUNE_EPOCHS = 2, 1


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

    def metrics(self) -> list[Path]:
        """The metrics and plots files git keeps (``cache: false``), which ``dvc checkout``
        cannot restore."""
        return sorted((self.root / "metrics").iterdir())

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
    env = dvc_env(base, EXPERIMENT)
    repo = Repo(root, env)
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["data"].update(source="data", metadata_csv=None)
    params["validate"].update(labels=list(CLASSES), min_images_per_class=2)
    # Small and quick: 32 px (Lite0's feature map is 1x1), 1 view per image, few epochs.
    params["model"].update(backbone="efficientnet_lite0", weights="imagenet", image_size=32)
    params["augment"].update(views_per_image=1, preview_images=2)
    params["train"].update(epochs=TRAIN_EPOCHS, batch_size=32)
    params["finetune"].update(
        epochs=FINETUNE_EPOCHS, batch_size=32, unfreeze_layers=20, quantization_aware_epochs=0
    )
    # Random-noise classes cannot be learnt: open the gate so every candidate is pushed.
    params["evaluate"].update(
        slice_by=[],
        class_groups={},
        min_accuracy=0.0,
        min_balanced_accuracy=0.0,
        non_inferiority_margin=1.0,
        min_compared_images=1,
    )
    # The int8-weights file is test_export_registry's: the calibrated int8 file is kept here.
    params["export"].update(warmup_images=2, representative_images=8, int8_weights=False)
    params["serving"].update(model_name=MODEL_NAME, model_base_path="models")
    dvc_project(root, params, env)  # the project's dvc.yaml and stage code, git and DVC
    write_tiny_dataset(root / "data")
    repo.run("dvc", "add", "-q", "data")
    repo.run("git", "add", "-A")
    repo.run("git", "commit", "-q", "-m", "tiny data set")
    return repo


@pytest.fixture(scope="module")
def first_repro(repo: Repo) -> subprocess.CompletedProcess[str]:
    """The first ``dvc repro``: runs every stage."""
    return repo.run("dvc", "repro")


def test_repro_runs_every_stage_and_writes_outputs(repo, first_repro):
    """Guards the DAG wiring: dvc repro runs every stage command from dvc.yaml with the
    params sections they read and leaves every declared output, metric and plot behind."""
    out = first_repro.stdout + first_repro.stderr
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out, out
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

    train_per_class = ingest_metrics["splits"]["train"]["classes"]
    augment_metrics = json.loads((root / "metrics/augment.json").read_text())
    assert augment_metrics["image_size"] == 32
    # params.yaml's default: no oversampling, each training image plus one augmented view
    assert augment_metrics["classes"] == {c: 2 * n for c, n in train_per_class.items()}
    assert list((root / "outputs/augment/shards").glob("train-*.tfrecord"))
    assert (root / "outputs/augment/preview.png").is_file()

    frozen = json.loads((root / "metrics/train.json").read_text())["frozen"]
    assert frozen["epochs"] == TRAIN_EPOCHS and frozen["image_size"] == 32
    assert frozen["train_images"] == sum(augment_metrics["classes"].values())
    tuned = json.loads((root / "metrics/finetune.json").read_text())["finetune"]
    assert tuned["epochs"] == FINETUNE_EPOCHS and tuned["resumed_from_epoch"] == 0
    assert tuned["trainable_base_layers"] > 0
    for path in ("outputs/train/model.keras", "outputs/finetune/model.keras"):
        assert (root / path).stat().st_size > 1_000_000, path  # Lite0: ~3.4M parameters
    assert (root / "outputs/finetune/curves.png").is_file()
    assert (root / "outputs/finetune_checkpoints/state.json").is_file()
    frozen_rows = read_csv_rows(root / "metrics/train_history.csv")
    tuned_rows = read_csv_rows(root / "metrics/finetune_history.csv")
    assert [int(r["step"]) for r in frozen_rows] == list(range(TRAIN_EPOCHS))
    assert [int(r["step"]) for r in tuned_rows] == [
        TRAIN_EPOCHS + epoch for epoch in range(FINETUNE_EPOCHS)
    ]
    assert [r["phase"] for r in tuned_rows] == ["finetune"] * FINETUNE_EPOCHS
    assert {r["phase"] for r in frozen_rows} == {"frozen"}

    evaluation = json.loads((root / "metrics/evaluate.json").read_text())
    assert evaluation["test"]["images"] == len(CLASSES) * 4 and evaluation["blessed"] is True
    assert len(read_csv_rows(root / "metrics/confusion.csv")) == len(CLASSES) * 4
    for figure in ("confusion.png", "calibration.png", "misclassified.png", "blessing.json"):
        assert (root / "outputs/evaluate" / figure).is_file(), figure
    report = json.loads((root / "metrics/export.json").read_text())
    assert report["parity"]["images"] == len(CLASSES) * 4
    # A float model: its float32 file computes the served probabilities, and the int8 file
    # calibrated on training images is reported beside it.
    parity = report["parity"]
    assert set(parity) == {"images", "saved_model", "tflite_float32", "tflite_int8"}, parity
    assert parity["tflite_float32"]["max_abs_probability_diff"] < 1e-4, parity
    assert (root / "outputs/export/tflite/model_int8.tflite").is_file()
    assert (root / f"outputs/export/serving/{MODEL_NAME}/1/saved_model.pb").is_file()
    pushed = json.loads((root / "metrics/push.json").read_text())
    assert pushed["version"] == 1 and pushed["serving_version"] == 1, pushed
    assert pushed["aliases"] == ["challenger", "champion"]
    assert (root / f"models/{MODEL_NAME}/1/saved_model.pb").is_file()

    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    validate_params = lock["stages"]["validate"]["params"]["params.yaml"]["validate"]
    assert validate_params["min_images_per_class"] == 2
    assert validate_params["labels"] == list(CLASSES)
    train_params = lock["stages"]["train"]["params"]["params.yaml"]
    assert train_params["model"]["image_size"] == 32
    assert train_params["train"]["epochs"] == TRAIN_EPOCHS


def test_pipeline_is_up_to_date_after_repro(repo, first_repro):
    """Guards reproducibility bookkeeping: right after dvc repro, dvc status sees nothing
    changed (no stage writes into its own deps, no output left untracked)."""
    status = repo.run("dvc", "status", "--json")
    assert json.loads(status.stdout or "{}") == {}, status.stdout


def test_bench_dry_run_names_finetune_and_after_and_restores_params(repo, first_repro, monkeypatch):
    """Guards the overhead benchmark's second figure: with finetune.learning_rate changed,
    DVC sees finetune alone invalidated and a repro would run finetune and every stage after
    it; nothing runs, and params.yaml is put back byte for byte."""
    from bench.dvc_overhead import stale_stages, would_run

    monkeypatch.chdir(repo.root)
    for key, value in repo.env.items():
        if key.startswith("DVC_"):
            monkeypatch.setenv(key, value)
    original = (repo.root / "params.yaml").read_bytes()
    params = yaml.safe_load(original)

    invalidated, rerun = would_run(
        repo.root / "params.yaml",
        "finetune",
        "learning_rate",
        params["finetune"]["learning_rate"] * 3,
    )

    assert invalidated == ["finetune"], invalidated
    assert rerun == list(STAGES[STAGES.index("finetune") :]), rerun
    assert (repo.root / "params.yaml").read_bytes() == original
    assert stale_stages() == {}


def test_second_repro_runs_no_stage(repo, first_repro):
    """Guards caching: a second dvc repro with nothing changed skips every stage (training
    included: no stage writes into another's deps, the feature cache is not a dep)."""
    second = repo.run("dvc", "repro")
    out = second.stdout + second.stderr
    assert "Running stage" not in out, out
    assert "didn't change, skipping" in out or "up to date" in out, out


def test_all_stages_log_into_one_mlflow_run(repo, first_repro):
    """Guards the shared MLflow run: every stage of one dvc repro logs into the same run,
    with each stage's params, its done tag and its artifacts, and finetune logs the model."""
    from mlflow.tracking import MlflowClient

    run = repo.mlflow_runs()[0]  # the first repro's; other tests may have added more
    assert run.info.status == "FINISHED"
    for stage in STAGES:
        assert run.data.tags[f"stage.{stage}"] == "done", stage
    assert run.data.tags["imgpipe.execution"].count(":") == 2  # host:pid:start of dvc repro
    assert run.data.tags["backbone"] == "efficientnet_lite0"
    params = run.data.params
    for prefix in (
        "ingest.",
        "validate.",
        "augment.",
        "model.",
        "train.",
        "finetune.",
        "evaluate.",
        "export.",
    ):
        assert any(k.startswith(prefix) for k in params), (prefix, params)
    assert params["validate.labels"] == ",".join(CLASSES)
    assert params["model.image_size"] == "32"
    assert params["train.epochs"] == str(TRAIN_EPOCHS)
    metrics = run.data.metrics
    assert metrics["ingest.images"] == len(CLASSES) * IMAGES_PER_CLASS
    assert metrics["validate.success"] == 1.0
    assert metrics["frozen.epochs"] == TRAIN_EPOCHS
    assert metrics["finetune.epochs"] == FINETUNE_EPOCHS
    assert "val_accuracy" in metrics  # per-epoch curves on the shared step axis
    client = MlflowClient(tracking_uri=repo.env["MLFLOW_TRACKING_URI"])
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert sorted(m.step for m in history) == list(range(TRAIN_EPOCHS + FINETUNE_EPOCHS))
    ingest_artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "ingest")}
    assert {
        "ingest/manifest.csv",
        "ingest/quarantine_report.csv",
        "ingest/labels.txt",
    } <= ingest_artifacts
    docs = {a.path for a in client.list_artifacts(run.info.run_id, "validate/data_docs")}
    assert "validate/data_docs/index.html" in docs
    for stage, artifact in (
        ("augment", "preview.png"),
        ("train", "curves.png"),
        ("train", "train_history.csv"),
        ("finetune", "curves.png"),
        ("finetune", "finetune_history.csv"),
    ):
        logged = {a.path for a in client.list_artifacts(run.info.run_id, stage)}
        assert f"{stage}/{artifact}" in logged, logged

    models = [
        m
        for m in client.search_logged_models(experiment_ids=[run.info.experiment_id])
        if m.source_run_id == run.info.run_id
    ]
    assert [m.name for m in models] == ["model"], models
    files = {a.path for a in client.list_logged_model_artifacts(models[0].model_id)}
    assert "MLmodel" in files, files
    assert run.data.tags["blessed"] == "true"
    assert "test.accuracy" in metrics and "parity.tflite_int8.top1_agreement" in metrics
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert champion.run_id == run.info.run_id


@pytest.fixture(scope="module")
def experiment(repo: Repo, first_repro) -> subprocess.CompletedProcess[str]:
    """``dvc exp run`` of a finetune.learning_rate change, named ``EXPERIMENT_NAME``: DVC
    reuses ingest, validate, augment and train."""
    return repo.run(
        "dvc", "exp", "run", "--name", EXPERIMENT_NAME, "-S", f"finetune.learning_rate={NEW_LR}"
    )


def test_finetune_param_change_reruns_only_finetune(repo, first_repro, experiment):
    """Guards the stage params scoping: changing only finetune.learning_rate reruns finetune
    and what follows it, nothing upstream; the new fine-tuning starts over (its checkpoints no
    longer match); the new candidate is pushed as the next serving version; and the pipeline
    is up to date again afterwards."""
    out = experiment.stdout + experiment.stderr
    rerun = STAGES[STAGES.index("finetune") :]
    for stage in STAGES:
        assert (f"Running stage '{stage}'" in out) == (stage in rerun), (stage, out)
    tuned = json.loads((repo.root / "metrics/finetune.json").read_text())["finetune"]
    assert tuned["resumed_from_epoch"] == 0
    lock = yaml.safe_load((repo.root / "dvc.lock").read_text())
    assert lock["stages"]["finetune"]["params"]["params.yaml"]["finetune"]["learning_rate"] == (
        NEW_LR
    )
    status = repo.run("dvc", "status", "--json")
    assert json.loads(status.stdout or "{}") == {}, status.stdout
    pushed = json.loads((repo.root / "metrics/push.json").read_text())
    assert pushed["version"] == 2 and pushed["serving_version"] == 2, pushed
    assert pushed["previous_champion"] == 1
    assert sorted(p.name for p in (repo.root / "models" / MODEL_NAME).iterdir()) == ["1", "2"]


def _contexts(run) -> list[str]:
    return sorted(
        {t.key: t.value for t in i.tags}["mlflow.data.context"] for i in run.inputs.dataset_inputs
    )


def test_a_run_that_reuses_stages_is_as_complete_as_the_first(repo, first_repro, experiment):
    """Guards comparable runs: the experiment's MLflow run, where DVC reused four stages, has
    the same param keys as the first run, the reused stages' summary metrics (from the
    outputs DVC restored) with a ``reused`` tag and the output hash dvc.lock records, the
    three splits as datasets, and it is named after its DVC experiment and tagged with its
    baseline and the params that differ from it."""
    runs = {r.info.run_name: r for r in repo.mlflow_runs()}
    first = repo.mlflow_runs()[0]
    second = runs[EXPERIMENT_NAME]
    head = repo.run("git", "rev-parse", "HEAD").stdout.strip()
    assert first.info.run_name.startswith(f"repro-{head[:7]}"), first.info.run_name
    assert set(second.data.params) == set(first.data.params)
    assert second.data.params["finetune.learning_rate"] == str(NEW_LR)
    lock = yaml.safe_load((repo.root / "dvc.lock").read_text())["stages"]
    for stage in STAGES:
        expected = "reused" if stage in ("ingest", "validate", "augment", "train") else "done"
        assert second.data.tags[f"stage.{stage}"] == expected, stage
        if expected == "reused":
            outs = {o["path"]: o["md5"] for o in lock[stage]["outs"]}
            assert second.data.tags[f"stage.{stage}.md5"] == outs[f"outputs/{stage}"], stage
    for key in ("ingest.images", "validate.success", "augment.materialised_images"):
        assert second.data.metrics[key] == first.data.metrics[key], key
    assert second.data.metrics["frozen.val_accuracy"] == first.data.metrics["frozen.val_accuracy"]
    reused_timings = {
        f"{stage}.{key}"
        for stage in ("ingest", "validate", "augment", "train")
        for key in ("wall_seconds", "peak_rss_mb")
    }
    assert set(first.data.metrics) - set(second.data.metrics) == reused_timings
    assert second.data.tags["dvc.experiment"] == EXPERIMENT_NAME
    assert second.data.tags["dvc.baseline"] == head
    committed = yaml.safe_load(repo.run("git", "show", "HEAD:params.yaml").stdout)
    old = committed["finetune"]["learning_rate"]
    changed = second.data.tags["params.changed"]
    assert changed == f"finetune.learning_rate: {old} -> {NEW_LR}", changed
    assert second.data.tags["mlflow.source.git.commit"] == head
    assert (
        second.data.tags["data.version"]
        == yaml.safe_load((repo.root / "data.dvc").read_text())["outs"][0]["md5"]
    )
    for run in (first, second):
        assert _contexts(run) == ["test", "train", "validation"], run.info.run_name
    table = repo.run("imgpipe", "runs").stdout  # the ablation table, from these runs
    row = next(line for line in table.splitlines() if line.startswith(f"| {EXPERIMENT_NAME} |"))
    assert f"finetune.learning_rate: {old} -> {NEW_LR}" in row and "| reused + " in row, row
    assert "none (objective accuracy" in row, row  # params.yaml's decision: the argmax
    first_test = [i.dataset for i in first.inputs.dataset_inputs if i.dataset.name == "test"]
    assert first_test[0].digest.startswith(second.data.tags["data.version"][:12])


def test_failed_expectation_stops_repro_naming_expectation_and_row(repo, first_repro):
    """Guards the pipeline gate: with a class below min_images_per_class, dvc repro exits
    non-zero and its output names the failing expectation and a class/split row; the
    MLflow run of that repro is marked failed. params.yaml and validate's outputs are put
    back afterwards."""
    earlier = len(repo.mlflow_runs())
    assert earlier >= 1
    kept = {
        path: path.read_bytes()
        for path in [repo.root / "params.yaml", repo.root / "dvc.lock", *repo.metrics()]
    }
    edit_params(repo.root / "params.yaml", min_images_per_class=1000)
    try:
        failed = repo.run("dvc", "repro", check=False)
        runs = repo.mlflow_runs()
    finally:
        # DVC removed validate's outputs before running it, its metrics file (kept in git, not
        # in DVC's cache) with them: put the files git keeps back, and DVC checks out the rest.
        for path, content in kept.items():
            path.write_bytes(content)
        repo.run("dvc", "checkout", "-q", "--force")
    status = repo.run("dvc", "status", "--json")
    assert json.loads(status.stdout or "{}") == {}, status.stdout

    out = failed.stdout + failed.stderr
    assert failed.returncode != 0, out
    assert "data validation failed" in out, out
    assert "expect_column_values_to_be_between on column 'images'" in out, out
    assert f"{CLASSES[0]}/train" in out and f"{CLASSES[-1]}/test" in out, out
    # ingest reads validate.min_images_per_class too (a grouped split that starves a class is
    # refused there): it may run again, but writes the same outputs, so nothing downstream runs
    for stage in ("augment", "train", "finetune"):
        assert f"Running stage '{stage}'" not in out, out  # nothing to redo downstream
    assert len(runs) == earlier + 1
    run = runs[-1]
    assert run.info.status == "FAILED"
    assert run.data.tags["stage.validate"] == "failed"


def test_mlflow_compare_page_shows_both_runs_with_upstream_params(
    repo, first_repro, experiment, tmp_path
):
    """Guards what a person sees: MLflow's own server (started here on 127.0.0.1, stopped by
    its PID) renders the compare page of the first run and the experiment in headless
    Chromium, and the page names both runs and shows an ``augment.*`` param with a value for
    each, although DVC reused augment in the second."""
    import html
    import re
    import urllib.parse

    first, second = (
        repo.mlflow_runs()[0],
        {r.info.run_name: r for r in repo.mlflow_runs()}[EXPERIMENT_NAME],
    )
    with mlflow_server(repo.env["MLFLOW_TRACKING_URI"], repo.env) as uri:
        ids = json.dumps([first.info.run_id, second.info.run_id])
        experiments = json.dumps([first.info.experiment_id])
        query = urllib.parse.urlencode({"runs": ids, "experiments": experiments})
        url = f"{uri}/#/compare-runs?{query}"
        dom = rendered_dom(url, tmp_path / "chromium")

    cells = [html.unescape(c).strip() for c in re.split(r"<[^>]+>", dom)]
    cells = [c for c in cells if c]
    assert first.info.run_name in cells and EXPERIMENT_NAME in cells, cells[:80]
    rows = [i for i, c in enumerate(cells) if c.startswith("augment.")]
    assert rows, "no augment.* param on the compare page"
    key = cells[rows[0]]
    assert cells[rows[0] + 1 : rows[0] + 3] == [first.data.params[key]] * 2, cells[
        rows[0] : rows[0] + 5
    ]


def test_seeds_runs_a_recipe_over_seeds_under_a_parent_mlflow_run(
    repo, first_repro, experiment, tmp_path
):
    """``imgpipe seeds --seeds 1 2 --through finetune --seed-keys finetune.seed -S
    finetune.learning_rate=...``: one DVC experiment per seed (DVC reuses the frozen phase: only
    finetune's params change), each its own MLflow run, nested under a parent
    run whose mean/sd/min/max are those of the seeds' validation figures; the JSON summary
    says the same and ``imgpipe runs`` shows the recipe as mean ± sd. The command puts the
    workspace back (params, lock and metrics as they were, outputs from DVC's cache, the
    persist checkpoints from a copy): dvc status is clean."""
    import statistics

    from mlflow.tracking import MlflowClient

    before = {path: path.read_bytes() for path in [repo.root / "params.yaml", *repo.metrics()]}
    out = tmp_path / "seeds.json"
    done = repo.run(
        "imgpipe", "seeds", "--seeds", "1", "2", "--through", "finetune",
        "--name", "tiny-recipe", "--out", str(out), "--seed-keys", "finetune.seed",
        "-S", f"finetune.learning_rate={NEW_LR}",  # the recipe: the experiment's rate
    )  # fmt: skip
    summary = json.loads(out.read_text())
    table = repo.run("imgpipe", "runs").stdout
    # another recipe than params.yaml's: the workspace is put back as it was
    assert {path: path.read_bytes() for path in before} == before
    assert "finetune.val_accuracy" in done.stdout, done.stdout
    assert summary["seeds"] == [1, 2] and set(summary["mlflow_runs"]) == {"1", "2"}, summary
    client = MlflowClient(tracking_uri=repo.env["MLFLOW_TRACKING_URI"])
    parent = client.get_run(summary["parent_run"])
    assert parent.data.params["seeds"] == "1 2"
    assert parent.data.params["overrides"] == f"finetune.learning_rate={NEW_LR}"
    values = []
    for seed, run_id in summary["mlflow_runs"].items():
        child = client.get_run(run_id)
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["dvc.experiment"] == f"tiny-recipe-seed{seed}"
        assert child.data.params["finetune.seed"] == seed
        assert child.data.tags["stage.train"] == "reused"
        values.append(child.data.metrics["finetune.val_accuracy"])
        assert summary["per_seed"][seed]["finetune.val_accuracy"] == pytest.approx(values[-1])
    stats = parent.data.metrics
    assert stats["finetune.val_accuracy.mean"] == pytest.approx(statistics.fmean(values), abs=1e-4)
    assert stats["finetune.val_accuracy.sd"] == pytest.approx(statistics.stdev(values), abs=1e-4)
    assert stats["finetune.val_accuracy.min"] == pytest.approx(min(values), abs=1e-4)
    assert not any(key.startswith("test.") for key in summary["summary"])  # test split sealed
    row = next(line for line in table.splitlines() if line.startswith("| tiny-recipe |"))
    assert f"{statistics.fmean(values):.4f} ± " in row, row
    status = repo.run("dvc", "status", "--json")
    assert json.loads(status.stdout or "{}") == {}, status.stdout


def test_grown_and_relabelled_data_moves_few_images_and_the_gate_refuses_it(repo, first_repro):
    """The growing-data scenario through DVC, in one data version: two new images per class
    and a quarter of one class moved into another class folder. DVC reruns ingest, then
    evaluate alone (``--single-item``: the candidate is the model already trained, whose
    training is not what this checks). At most ``2k + 3`` old images per class change split
    (``k`` images added to or removed from it, a relabelled one counting as both); the
    champion is scored without the test images it trained on (recounted here from its
    registered list); and the candidate is refused because the champion's training images
    changed label, although the open gate of this repo would pass any accuracy. Data, lock,
    metrics and outputs are put back."""
    from mlflow.tracking import MlflowClient

    from imgpipe.data.lineage import TRAINED_ON, read_trained_on
    from imgpipe.tracking.registry import ARTIFACT_PATH
    from pipelines.growing import split_moves

    root = repo.root
    kept = {name: (root / name).read_bytes() for name in ("data.dvc", "dvc.lock")}
    kept |= {f"metrics/{p.name}": p.read_bytes() for p in repo.metrics()}
    checkpoints = root / "outputs" / "finetune_checkpoints"  # persist, not in DVC's cache
    shutil.copytree(checkpoints, root.parent / "grown-checkpoints")
    before = {r["sha256"]: r for r in read_csv_rows(root / "outputs/ingest/manifest.csv")}
    for class_index, label in enumerate(CLASSES):
        for i in range(2):
            pixels = np.random.default_rng([class_index, 100 + i]).integers(0, 256, (48, 48))
            Image.fromarray(pixels.astype(np.uint8), mode="L").save(
                root / "data" / label / f"{label}_new{i}.png"
            )
    moved_labels = sorted((root / "data" / CLASSES[0]).glob("*.png"))[: IMAGES_PER_CLASS // 4]
    for path in moved_labels:
        path.rename(root / "data" / CLASSES[1] / f"from_{path.name}")
    client = MlflowClient(tracking_uri=repo.env["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    local = client.download_artifacts(
        champion.run_id, f"{ARTIFACT_PATH}/{TRAINED_ON}", str(root.parent)
    )
    trained_on = read_trained_on(Path(local))
    try:
        repo.run("dvc", "add", "-q", "data")
        ingest = repo.run("dvc", "repro", "--single-item", "ingest")
        evaluate = repo.run("dvc", "repro", "--single-item", "evaluate")
        after = {r["sha256"]: r for r in read_csv_rows(root / "outputs/ingest/manifest.csv")}
        blessing = json.loads((root / "outputs/evaluate/blessing.json").read_text())
    finally:
        shutil.rmtree(root / "data")
        for name, content in kept.items():
            (root / name).write_bytes(content)
        shutil.rmtree(checkpoints)
        shutil.copytree(root.parent / "grown-checkpoints", checkpoints)
        repo.run("dvc", "checkout", "-q", "--force")
    assert "Running stage 'ingest'" in ingest.stdout
    assert "Running stage 'evaluate'" in evaluate.stdout
    assert "Running stage 'finetune'" not in ingest.stdout + evaluate.stdout

    moves = split_moves(before, after)
    assert moves["added"] == 2 * len(CLASSES) + len(moved_labels), moves
    assert moves["images"] <= moves["bound"], moves
    test = {d for d, r in after.items() if r["split"] == "test"}
    gate = blessing["champion"]
    assert gate["version"] == int(champion.version) and gate["lineage"]
    assert gate["excluded"] == len(test & set(trained_on)), gate
    assert blessing["comparison"]["images"] == len(test) - gate["excluded"]
    relabelled = {d for d, r in after.items() if d in trained_on and r["label"] != trained_on[d]}
    assert gate["relabelled"] == len(relabelled) > 0, gate
    assert gate["relabelled_by_class"] == {f"{CLASSES[0]} -> {CLASSES[1]}": len(relabelled)}
    failed = [c["check"] for c in blessing["checks"] if not c["passed"]]
    assert failed == ["labels_kept"] and not blessing["blessed"], blessing["checks"]
    status = repo.run("dvc", "status", "--json")
    assert json.loads(status.stdout or "{}") == {}, status.stdout
