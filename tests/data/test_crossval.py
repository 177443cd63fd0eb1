"""Cross-validation's out-of-fold predictions and the decision fitted on them
(pipelines/crossval.py), on predictions written as finetune writes them. The fold runs
themselves are DVC experiments run like `imgpipe seeds`' (tests/e2e/test_pipeline_dvc.py)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from imgpipe.core.errors import InputError
from pipelines.crossval import OutOfFold, nested_decision, oof_figures, out_of_fold

CLASSES = ["ok", "minor", "broken"]


def _write(path: Path, digests: list[str], labels: list[int], probs: np.ndarray) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["sha256", "label", *(f"p_{c}" for c in CLASSES)])
        for digest, label, row in zip(digests, labels, probs, strict=True):
            writer.writerow([digest, CLASSES[label], *row])
    return path


def _folds(tmp_path: Path, folds: int = 3, per_fold: int = 40) -> tuple[dict[int, Path], set]:
    rng = np.random.default_rng(0)
    files, every = {}, set()
    for fold in range(folds):
        digests = [f"{fold:02d}{i:04d}" for i in range(per_fold)]
        labels = rng.choice(3, per_fold, p=[0.7, 0.2, 0.1]).tolist()
        logits = rng.normal(size=(per_fold, 3)) + 2.0 * np.eye(3)[labels] + [1.5, 0, 0]
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        files[fold] = _write(tmp_path / f"fold{fold}.csv", digests, labels, probs)
        every |= set(digests)
    return files, every


def test_out_of_fold_predictions_cover_every_non_test_image_once(tmp_path):
    """The folds' validation predictions joined: each non-test image once, with its fold; a
    fold file that repeats an image, or a non-test image no fold held out, is refused."""
    files, non_test = _folds(tmp_path)
    oof = out_of_fold(files, non_test)
    assert sorted(oof.sha256) == sorted(non_test) and len(oof.sha256) == len(non_test)
    assert list(np.bincount(oof.folds)) == [40, 40, 40] and oof.classes == CLASSES
    with pytest.raises(InputError, match="1 never held out"):
        out_of_fold(files, non_test | {"not-held-out"})
    repeated = {**files, 3: files[0]}
    with pytest.raises(InputError, match="40 seen twice"):
        out_of_fold(repeated, non_test)


def test_a_fitted_decision_is_scored_on_folds_it_was_not_fitted_on(tmp_path):
    """The correction that decides a fold's images is fitted on the other folds alone: fold
    0's decisions do not move when fold 0's labels are shuffled, while a correction fitted on
    every image (fold 0 included) may. With balanced accuracy weighed in, the rare classes
    are predicted more often than by the argmax."""
    files, non_test = _folds(tmp_path)
    oof = out_of_fold(files, non_test)
    decided = nested_decision(oof, balance=1.0)
    labels = oof.labels.copy()
    held = oof.folds == 0
    labels[held] = np.random.default_rng(1).permutation(labels[held])
    shuffled = OutOfFold(oof.sha256, labels, oof.folds, oof.probs, oof.classes)
    assert np.array_equal(nested_decision(shuffled, balance=1.0)[held], decided[held])
    argmax = oof.probs.argmax(axis=1)
    assert (decided != 0).sum() > (argmax != 0).sum()

    figures = oof_figures(oof, {"fine": ["ok", "minor"], "bad": ["broken"]}, balance=1.0)
    assert figures["oof.fitted.balanced_accuracy"] > figures["oof.balanced_accuracy"]
    assert {"oof.accuracy", "oof.groups.accuracy", "oof.temperature", "oof.fitted.tau"} <= set(
        figures
    )
    argmax_only = oof_figures(oof, {}, balance=None)
    assert "oof.fitted.accuracy" not in argmax_only
    assert (
        argmax_only["oof.if_balanced.balanced_accuracy"] == figures["oof.fitted.balanced_accuracy"]
    )


def test_apply_sets_the_fitted_decision_in_params_and_keeps_every_other_line(tmp_path):
    """``imgpipe crossval --apply`` writes the decision into params.yaml's
    ``finetune.decision`` (read back as the typed view), every other line and the key's
    comment as they were; it refuses a recipe given with -S, which params.yaml does not hold."""
    from conftest import PROJECT

    from imgpipe.core.params import (
        FinetuneParams,
        FittedDecision,
        ParamsError,
        load_params,
        section,
        set_value,
    )
    from pipelines.crossval import run_crossval

    path = tmp_path / "params.yaml"
    before = (PROJECT / "params.yaml").read_text().splitlines()
    path.write_text("\n".join(before) + "\n")
    fitted = {
        "objective": 0.5,
        "temperature": 1.25,
        "tau": 0.75,
        "fitted_on": "ab" * 32,
        "source": "imgpipe crossval x: 3 folds x seeds 1, 2: a test",
    }
    set_value(path, "finetune", "decision", fitted)
    after = path.read_text().splitlines()
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert len(changed) == 1 and after[changed[0]].startswith("  decision: {")
    assert after[changed[0]].endswith(before[changed[0]].partition("  #")[2])
    tuning = section(FinetuneParams, "finetune", load_params(path))
    assert tuning.decision == FittedDecision(**fitted)
    with pytest.raises(ParamsError, match="no key 'nope'"):
        set_value(path, "finetune", "nope", 1)
    with pytest.raises(InputError, match="--apply sets the decision of params"):
        run_crossval(3, [1], overrides=["finetune.epochs=2"], apply=True, root=tmp_path)
