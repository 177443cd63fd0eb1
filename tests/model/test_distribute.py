"""Training under tf.distribute strategies, each run a process of its own (distributed_run.py,
or the ``imgpipe finetune`` CLI as a Kubeflow Trainer pod runs it):

- two replicas (MirroredStrategy over two logical CPU devices, the CPU stand-in for a two-GPU
  node) reach the same weights as one device taking the same global batches at the same rate,
  for the frozen phase (2 epochs) and fine-tuning (2 epochs);
- two workers on 127.0.0.1 (MultiWorkerMirroredStrategy from TF_CONFIG) fine-tune the same two
  epochs: killing one fails the job with an error that says so, and the rerun resumes from the
  last checkpoint and ends on the one-device weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import PROJECT, build_tiny_project, free_port, read_csv_rows

from imgpipe.core.params import load_params

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
CLASSES = {"a": 20, "b": 20, "c": 20}  # 20% val, 20% test: 12 train images per class
TOLERANCE = 1e-6
"""Largest allowed weight difference between one device and two replicas or workers.
Measured: 7e-9 after the frozen phase, 9e-8 after a fine-tuning epoch (all-reduce sums in
another order than one device's batch mean). A wrong batch or rate scaling, or another data
order, moves weights by 1e-3 and more; one fine-tuning epoch moves the unfrozen weights by
~7e-4."""


def test_scaled_batch_and_rate():
    from imgpipe.model.distribute import scaled

    assert scaled(32, 1e-4, 1) == (32, 1e-4)
    assert scaled(32, 1e-4, 4) == (128, 4e-4)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distribute")


@pytest.fixture(scope="module")
def runs(root) -> dict[int, Path]:
    """ingest and augment once; then train + finetune on one device (batch and rate x2) and on
    two replicas, side by side."""
    sys.path.insert(0, str(HERE))
    from distributed_run import MODEL, TRAIN

    build_tiny_project(
        root, CLASSES, 32, MODEL, {**TRAIN, "epochs": 1}, val_fraction=0.2, test_fraction=0.2
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(HERE.parents[1])}
    outs = {replicas: root / f"replicas-{replicas}" for replicas in (1, 2)}
    procs = {
        replicas: subprocess.Popen(
            [
                sys.executable,
                str(HERE / "distributed_run.py"),
                str(root),
                str(out),
                str(replicas),
                str(3 - replicas),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for replicas, out in outs.items()
    }
    for replicas, proc in procs.items():
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{replicas} replica(s):\n{output[-4000:]}"
    return outs


def _summary(out: Path, phase: str) -> dict:
    name = {"frozen": "train", "finetune": "finetune"}[phase]
    return json.loads((out / f"{name}.json").read_text())[phase]


def _weights(path: Path) -> dict[str, list[np.ndarray]]:
    import keras

    model = keras.models.load_model(path, compile=False)
    return {w.path: [np.asarray(w)] for w in model.weights}


@pytest.mark.parametrize("phase", ["frozen", "finetune"])
def test_two_replicas_match_one_device(runs, phase):
    """Same global batch (24 frozen, 12 fine-tuning) and rate: the summaries report 1 and 2
    replicas and the same validation accuracy; every weight agrees within TOLERANCE, and some
    weights did change in this phase (else there is nothing to compare)."""
    one, two = (_summary(runs[r], phase) for r in (1, 2))
    assert (one["replicas"], two["replicas"]) == (1, 2)
    assert one["val_accuracy"] == pytest.approx(two["val_accuracy"], abs=1e-6)
    folder = {"frozen": "train", "finetune": "finetune"}[phase]
    w1, w2 = (_weights(runs[r] / folder / "model.keras") for r in (1, 2))
    assert w1.keys() == w2.keys()
    worst = max(
        float(np.abs(a[0] - b[0]).max()) for a, b in zip(w1.values(), w2.values(), strict=True)
    )
    assert worst <= TOLERANCE, worst
    if phase == "frozen":  # the head starts from seeded weights that no file keeps: its
        # training loss must fall over the phase's two epochs, on one device and on two
        for replicas in (1, 2):
            losses = [float(r["loss"]) for r in read_csv_rows(runs[replicas] / "train_history.csv")]
            assert len(losses) >= 2 and losses[-1] < losses[0], (replicas, losses)
        return
    before = _weights(runs[1] / "train" / "model.keras")
    moved = max(
        float(np.abs(a[0] - b[0]).max()) for a, b in zip(before.values(), w1.values(), strict=True)
    )
    assert moved > 100 * TOLERANCE, moved


def _workers(root: Path, folder: Path, trained: Path, attempt: str) -> list[subprocess.Popen]:
    """``imgpipe finetune`` as two workers of one job (TF_CONFIG on 127.0.0.1), writing to
    ``folder`` (checkpoints shared, as on a Trainer job's volume)."""
    hosts = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    command = [
        str(Path(sys.executable).parent / "imgpipe"),
        "finetune",
        "--params", str(folder / "params.yaml"),
        "--trained", str(trained),
        "--dataset", str(root / "outputs" / "ingest"),
        "--frozen-history", str(trained.parent.parent / "train_history.csv"),
        "--out", str(folder / "finetune"),
        "--summary", str(folder / "finetune.json"),
        "--history", str(folder / "finetune_history.csv"),
        "--checkpoints", str(folder / "checkpoints"),
    ]  # fmt: skip
    procs = []
    for index in range(2):
        config = {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
        env.update(
            TF_CONFIG=json.dumps(config),
            TF_CPP_MIN_LOG_LEVEL="2",
            PYTHONPATH=str(HERE.parent),
            MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'mlflow.db'}",
            MLFLOW_EXPERIMENT_NAME="multi-worker",
        )
        log = open(folder / f"{attempt}-worker-{index}.log", "w")  # noqa: SIM115 (Popen owns it)
        procs.append(
            subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
        )
    return procs


def _log(folder: Path, name: str) -> str:
    return (folder / f"{name}.log").read_text(errors="replace")[-4000:]


def test_two_workers_fail_on_a_lost_worker_then_resume_to_the_one_device_weights(root, runs):
    """Two workers, per-worker batch 6 at rate 1e-4 (the one-device run: 12 at 2e-4), two
    epochs from the one-device frozen model. Worker 1 is killed once epoch 0 is checkpointed:
    worker 0 fails with an error naming the lost worker and the checkpoints. Rerun, the job
    resumes after epoch 0, and its weights (the best epoch's and the last, resumed, epoch's)
    match one device's."""
    sys.path.insert(0, str(HERE))
    from distributed_run import FINETUNE, FINETUNE_FIXED, MODEL

    folder = root / "workers"
    folder.mkdir()
    raw = load_params(PROJECT / "params.yaml")
    raw["model"] = {**raw["model"], **MODEL}
    raw["finetune"] = {**raw["finetune"], **FINETUNE, **FINETUNE_FIXED}
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    trained = runs[1] / "train" / "model.keras"
    state_file = folder / "checkpoints" / "state.json"

    first = _workers(root, folder, trained, "first")
    try:
        deadline = time.monotonic() + 300
        while not state_file.is_file():
            assert time.monotonic() < deadline and first[0].poll() is None, _log(
                folder, "first-worker-0"
            )
            time.sleep(0.02)
        os.kill(first[1].pid, signal.SIGKILL)
        assert first[0].wait(timeout=180) != 0, _log(folder, "first-worker-0")
    finally:
        for proc in first:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    chief_log = _log(folder, "first-worker-0")
    assert "lost a worker during epoch 1" in chief_log, chief_log
    assert str(folder / "checkpoints") in chief_log, chief_log
    assert json.loads(state_file.read_text())["epoch"] == 0
    assert not (folder / "finetune.json").exists()

    second = _workers(root, folder, trained, "second")
    for index, proc in enumerate(second):
        assert proc.wait(timeout=300) == 0, _log(folder, f"second-worker-{index}")
    summary = json.loads((folder / "finetune.json").read_text())["finetune"]
    assert summary["replicas"] == 2 and summary["resumed_from_epoch"] == 1, summary
    assert summary["epochs"] == 2
    # Every epoch's figures are the job's, across both workers' slices (early stopping and the
    # kept epoch depend on them), and they are one device's.
    ours_rows, reference_rows = (
        read_csv_rows(folder / "finetune_history.csv"),
        read_csv_rows(runs[1] / "finetune_history.csv"),
    )
    assert len(ours_rows) == len(reference_rows) == 2
    for ours_row, reference_row in zip(ours_rows, reference_rows, strict=True):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert float(ours_row[key]) == pytest.approx(float(reference_row[key]), abs=1e-5), key
    for model in ("finetune/model.keras", "checkpoints/epoch-001.keras"):  # best, and last
        ours, reference = _weights(folder / model), _weights(runs[1] / model)
        worst = max(
            float(np.abs(a[0] - b[0]).max())
            for a, b in zip(ours.values(), reference.values(), strict=True)
        )
        assert worst <= TOLERANCE, (model, worst)
