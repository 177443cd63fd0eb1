"""How a run is tied to what produced it: the commit, whether the tree was dirty (the
pipeline's own outputs do not count), and the params that differ from the baseline commit."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from imgpipe.tracking.runs import changed_params, flatten, git_state, run_identity


def _git(root: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_CONFIG_NOSYSTEM": "1",
    }
    return subprocess.run(
        ["git", *args], cwd=root, env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def _repo(tmp_path: Path, params: dict) -> Path:
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/train.json").write_text("{}")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-q", "-m", "base")
    return tmp_path


def test_the_pipelines_own_outputs_do_not_make_the_tree_dirty(tmp_path):
    """DVC deletes a git-tracked metrics file before it reruns the stage: that is no change
    of the user's, but an edited params.yaml is."""
    root = _repo(tmp_path, {"train": {"learning_rate": 0.001}})
    head = _git(root, "rev-parse", "HEAD")
    (root / "metrics/train.json").unlink()
    assert git_state(root, ["metrics/train.json"]) == (head, False)
    assert git_state(root, ["metrics"]) == (head, False)  # a folder output covers its files
    assert git_state(root) == (head, True)
    (root / "params.yaml").write_text("train: {learning_rate: 0.0003}\n")
    assert git_state(root, ["metrics/train.json"]) == (head, True)


def test_changed_params_lists_each_difference_from_the_baseline(tmp_path):
    root = _repo(tmp_path, {"train": {"learning_rate": 0.001, "epochs": 3}, "v": {"l": ["a"]}})
    head = _git(root, "rev-parse", "HEAD")
    now = {"train": {"learning_rate": 0.0003, "epochs": 3}, "v": {"l": ["a", "b"]}, "n": {"k": 1}}
    assert changed_params(root, head, now) == (
        "n.k: (none) -> 1; train.learning_rate: 0.001 -> 0.0003; v.l: a -> a,b"
    )
    assert changed_params(root, head, yaml.safe_load((root / "params.yaml").read_text())) == "none"
    assert changed_params(root, "no-such-rev", now) == "unknown"
    assert flatten({"a": {"b": [1, 2], "c": None}}) == {"a.b": "1,2", "a.c": "None"}


def test_a_run_is_named_after_its_dvc_experiment_with_its_baseline(tmp_path, monkeypatch):
    root = _repo(tmp_path, {"train": {"learning_rate": 0.001}})
    head = _git(root, "rev-parse", "HEAD")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    name, tags = run_identity(root, {"train": {"learning_rate": 0.001}}, "repro")
    assert name.startswith(f"repro-{head[:7]}-") and "dirty" not in name
    assert tags["params.changed"] == "none" and tags["git.dirty"] == "false"
    assert "dvc.experiment" not in tags

    monkeypatch.setenv("DVC_EXP_NAME", "lr-3e-4")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", head)
    name, tags = run_identity(root, {"train": {"learning_rate": 0.0003}}, "repro")
    assert name == "lr-3e-4"
    assert tags["dvc.experiment"] == "lr-3e-4" and tags["dvc.baseline"] == head
    assert tags["params.changed"] == "train.learning_rate: 0.001 -> 0.0003"
    assert tags["mlflow.source.git.commit"] == head
