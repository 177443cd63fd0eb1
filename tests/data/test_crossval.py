"""Cross-validation's out-of-fold predictions, the decision fitted on them and the decision
rules compared on them (pipelines/crossval.py, imgpipe/evaluation/decisions.py), on predictions
written as finetune writes them. The fold runs
themselves are DVC experiments run like `imgpipe seeds`' (tests/e2e/test_pipeline_dvc.py)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from imgpipe.core.errors import InputError
from imgpipe.data.manifest import MANIFEST_COLUMNS
from imgpipe.evaluation.decisions import RULES, compare, nested
from pipelines.crossval import (
    OutOfFold,
    compare_decisions,
    nested_decision,
    oof_figures,
    out_of_fold,
    write_oof,
)

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


def _strata_data(seed: int = 0, n: int = 600) -> tuple[np.ndarray, ...]:
    """Two strata whose classes are skewed opposite ways, each over-trusted by the model (its
    logits carry 2.5 times the stratum's log prior): one correction cannot fit both."""
    rng = np.random.default_rng(seed)
    strata = np.repeat(["mono", "poly"], n // 2)
    priors = {"mono": np.array([0.6, 0.2, 0.2]), "poly": np.array([0.2, 0.2, 0.6])}
    labels = np.concatenate([rng.choice(3, n // 2, p=priors[s]) for s in ("mono", "poly")])
    bias = np.stack([2.5 * np.log(priors[s]) for s in strata])
    logits = rng.normal(size=(n, 3)) + 2.0 * np.eye(3)[labels] + bias
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return labels, probs, np.arange(n) % 4, strata


@pytest.mark.parametrize("rule", RULES)
def test_every_decision_rule_decides_a_fold_from_the_other_folds_alone(rule):
    """Shuffling fold 0's labels leaves fold 0's decisions as they were, for every rule."""
    labels, probs, folds, strata = _strata_data()
    decided = nested(rule, labels, probs, folds, 1.0, strata)
    shuffled = labels.copy()
    held = folds == 0
    shuffled[held] = np.random.default_rng(1).permutation(labels[held])
    assert np.array_equal(nested(rule, shuffled, probs, folds, 1.0, strata)[held], decided[held])


def test_a_per_stratum_correction_wins_where_the_strata_need_different_ones():
    """Out of fold, every fitted rule beats the argmax on balanced accuracy; a correction per
    stratum beats the one pooled correction by more than the folds' spread when the strata are
    skewed opposite ways; an unknown rule, or prior_by without strata, is an error."""
    labels, probs, folds, strata = _strata_data()
    figures = compare(labels, probs, folds, CLASSES, 1.0, strata)
    balanced = {rule: f["balanced_accuracy"] for rule, f in figures.items()}
    assert all(balanced[rule] > balanced["argmax"] for rule in RULES if rule != "argmax")
    assert balanced["prior_by"] - balanced["prior"] > 2 * np.std(
        figures["prior"]["folds"]["balanced_accuracy"], ddof=1
    )
    assert set(figures["prior"]["recall"]) == set(CLASSES)
    with pytest.raises(ValueError, match="unknown decision rules"):
        compare(labels, probs, folds, CLASSES, 1.0, strata, rules=["argmax", "oracle"])
    with pytest.raises(ValueError, match="needs strata"):
        compare(labels, probs, folds, CLASSES, 1.0, None)


def test_decisions_compares_rules_on_crossvals_file_by_a_manifest_column(tmp_path):
    """``compare_decisions`` reads crossval's out-of-fold file and the manifest's metadata
    column: a summary of every rule's mean ± sd over folds and seeds; a missing column, or
    predictions of images the manifest does not hold, is an error naming it."""
    labels, probs, folds, strata = _strata_data()
    digests = [f"{i:064x}" for i in range(len(labels))]
    oof = OutOfFold(digests, labels, folds, probs, CLASSES)
    predictions = tmp_path / "oof_predictions.csv"
    write_oof(predictions, {1: oof, 42: oof})
    manifest = tmp_path / "manifest.csv"
    columns = [*MANIFEST_COLUMNS, "module_type"]
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns, restval="")
        writer.writeheader()
        for digest, label, stratum in zip(digests, labels, strata, strict=True):
            writer.writerow(
                {
                    "sha256": digest,
                    "label": CLASSES[label],
                    "split": "train",
                    "module_type": stratum,
                }
            )
    out = tmp_path / "decisions.json"
    summary = compare_decisions(
        predictions, "balanced_accuracy", 1.0, by="module_type", manifest=manifest, out=out
    )
    assert summary["seeds"] == [1, 42] and summary["folds"] == 4 and out.is_file()
    assert list(summary["rules"]) == list(RULES)
    assert (
        summary["rules"]["prior_by"]["balanced_accuracy"]["mean"]
        > (summary["rules"]["prior"]["balanced_accuracy"]["mean"])
    )
    assert "prior_by" not in compare_decisions(predictions, 0.5, 0.5, manifest=manifest)["rules"]
    with pytest.raises(InputError, match="module"):
        compare_decisions(predictions, 1.0, 1.0, by="module", manifest=manifest)
    other = tmp_path / "other.csv"
    write_oof(other, {7: OutOfFold(["f" * 64] * 3, labels[:3], folds[:3], probs[:3], CLASSES)})
    with pytest.raises(InputError, match="other data"):
        compare_decisions(other, 1.0, 1.0, by="module_type", manifest=manifest)


def test_refit_fits_another_objective_on_the_same_predictions_and_nothing_else(
    tmp_path, tmp_mlflow
):
    """``imgpipe crossval --refit``: the balanced objective's decision fitted on an earlier
    crossval's out-of-fold predictions, without a fold run, marked with the recipe it is for
    (the objective is part of it); its ``-S`` flags give that decision back through YAML and
    DVC's Hydra grammar alike. Refused: an override that changes training, predictions of
    another recipe than params.yaml's now, and --apply with overrides."""
    import shutil

    import yaml
    from conftest import PROJECT
    from dvc.utils.hydra import apply_overrides

    from imgpipe.core.params import load_params, sections, with_sets
    from imgpipe.data.lineage import training_digest
    from pipelines.crossval import RECIPE, decision_flag, oof_images, refit

    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    raw["evaluate"]["class_groups"] = {}  # ELPV's
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    labels, probs, folds, _ = _strata_data()
    oof = OutOfFold([f"{i:064x}" for i in range(len(labels))], labels, folds, probs, CLASSES)
    write_oof(tmp_path / "oof.csv", {42: oof})
    params = load_params(tmp_path / "params.yaml")
    earlier = {
        "recipe": "tiny",
        "through": "finetune",
        "mlflow_runs": {},
        "overrides": [],
        "objective": "accuracy",
        "folds": 4,
        "seeds": [42],
        "summary": {},
        "predictions": "oof.csv",
        "parent_run": "earlier-run",
        "decision": {
            "fitted_on": training_digest(
                oof_images({42: oof}),
                sections(RECIPE, with_sets(params, ["finetune.objective=accuracy"])),
            )
        },
    }
    (tmp_path / "crossval.json").write_text(json.dumps(earlier))
    balanced = ["finetune.objective=balanced_accuracy"]
    summary = refit(tmp_path / "crossval.json", balanced, root=tmp_path)
    decision = summary["decision"]
    assert decision["objective"] == "balanced_accuracy" and decision["tau"] is not None
    assert decision["fitted_on"] == training_digest(
        oof_images({42: oof}), sections(RECIPE, with_sets(params, balanced))
    )
    assert (
        summary["out_of_fold"]["42"]["oof.fitted.balanced_accuracy"]
        > (summary["out_of_fold"]["42"]["oof.balanced_accuracy"])
    )
    assert summary["refit_of"] == "earlier-run" and summary["parent_run"] != "earlier-run"

    sets = re.findall(r'-S "((?:[^"\\]|\\.)*)"', decision_flag(summary))
    assert with_sets(params, sets)["finetune"]["decision"] == decision
    shutil.copyfile(tmp_path / "params.yaml", tmp_path / "hydra.yaml")
    apply_overrides(str(tmp_path / "hydra.yaml"), sets)
    assert yaml.safe_load((tmp_path / "hydra.yaml").read_text())["finetune"]["decision"] == (
        decision
    )

    with pytest.raises(InputError, match="change how the folds train"):
        refit(tmp_path / "crossval.json", ["finetune.epochs=3"], root=tmp_path)
    with pytest.raises(InputError, match="--apply"):
        refit(tmp_path / "crossval.json", balanced, root=tmp_path, apply=True)
    raw["model"]["image_size"] = 96
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(InputError, match="another recipe"):
        refit(tmp_path / "crossval.json", balanced, root=tmp_path)


FOLD_STAGE = """
import csv, json, sys
from pathlib import Path

import numpy as np
import yaml

params = yaml.safe_load(Path("params.yaml").read_text())
fold, folds = params["ingest"]["fold"], params["ingest"]["folds"]
with open(sys.argv[1], "a") as log:  # outside the repo: how many fold runs ran
    log.write(f"{fold}\\n")
classes = ["ok", "minor", "broken"]
images = [(f"{i:064x}", classes[i % 3]) for i in range(16)]
split = ["test" if i >= 12 else "val" if i % folds == fold else "train" for i in range(16)]
Path("outputs/ingest").mkdir(parents=True, exist_ok=True)
Path("outputs/finetune").mkdir(parents=True, exist_ok=True)
with open("outputs/ingest/manifest.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, {columns!r}, restval="")
    writer.writeheader()
    for (digest, label), part in zip(images, split):
        index = classes.index(label)
        writer.writerow(dict(filepath=f"{digest}.png", label=label, label_index=index,
                             split=part, sha256=digest, width=8, height=8))
rng = np.random.default_rng(fold)
with open("outputs/finetune/val_predictions.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["sha256", "label", *(f"p_{c}" for c in classes)])
    for (digest, label), part in zip(images, split):
        if part == "val":
            p = rng.dirichlet(np.ones(3)) * 0.5 + 0.5 * np.eye(3)[classes.index(label)]
            writer.writerow([digest, label, *(f"{x:.6f}" for x in p)])
Path("metrics").mkdir(exist_ok=True)
figures = {"finetune": {"val_accuracy": 0.5 + fold / 10}}
Path("metrics/finetune.json").write_text(json.dumps(figures))
"""


@pytest.mark.slow
def test_crossval_runs_its_folds_then_resumes_only_the_runs_it_lacks(
    tmp_path, tmp_mlflow, monkeypatch
):
    """``imgpipe crossval`` over a made-up fold stage in a real git + DVC repo: the folds run
    as DVC experiments and come to out-of-fold predictions and a summary. ``--resume`` after
    that runs no fold again (each run's params, and its kept predictions byte for byte against
    its dvc.lock, say it is the same run), names the commit each kept run ran on, and gives the
    same figures; a kept copy that differs from its run's output, or another recipe, runs
    again (an experiment of the same name is replaced); and every fold runs again once the
    data ingest read has changed."""
    import subprocess
    import sys

    import yaml
    from conftest import PROJECT

    from pipelines.crossval import run_crossval

    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    repo, log = tmp_path / "repo", tmp_path / "runs.log"
    repo.mkdir()
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    raw["evaluate"]["class_groups"] = {}
    raw["ingest"]["fold"] = 0  # the workspace's own run, below: a fold like any
    (repo / "params.yaml").write_text(yaml.safe_dump(raw))
    (repo / "stage.py").write_text(FOLD_STAGE.replace("{columns!r}", repr(MANIFEST_COLUMNS)))
    stage = {
        "cmd": f"{sys.executable} stage.py {log}",
        "deps": ["stage.py"],
        "params": ["ingest.fold", "ingest.folds", "finetune.seed", "finetune.objective"],
        "outs": ["outputs/ingest", "outputs/finetune"],
        "metrics": [{"metrics/finetune.json": {"cache": False}}],
    }
    # what ingest read: the data whose change makes a kept run stale
    ingest = {"cmd": "mkdir -p seen && cp data.txt seen/", "deps": ["data.txt"], "outs": ["seen"]}
    (repo / "data.txt").write_text("16 images\n")
    stage["deps"].append("seen")
    (repo / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {"ingest": ingest, "finetune": stage}})
    )
    (repo / ".gitignore").write_text("/outputs\n/seen\n")

    def sh(*command: str) -> None:
        subprocess.run(command, cwd=repo, check=True, capture_output=True)

    sh("git", "init", "-q")
    sh(
        "git",
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@t",
        "commit",
        "-q",
        "--allow-empty",
        "-m",
        "0",
    )
    sh("dvc", "init", "-q")
    sh("dvc", "repro", "-q")  # the workspace's dvc.lock names the data and the outputs
    log.unlink()
    sh("git", "add", "-A")
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "stage")
    args = dict(name="tiny", root=repo, seed_keys=["finetune.seed"])

    first = run_crossval(2, [42], **args)
    assert log.read_text().split() == ["0", "1"]
    assert "resumed" not in first and (repo / first["predictions"]).is_file()
    resumed = run_crossval(2, [42], resume=True, **args)
    assert log.read_text().split() == ["0", "1"], "a kept fold ran again"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    assert resumed["resumed"] == dict.fromkeys(
        ["tiny-seed42-fold0", "tiny-seed42-fold1"], head.stdout.strip()
    )
    assert resumed["per_run"] == first["per_run"] and resumed["decision"] == first["decision"]

    kept = repo / "outputs/crossval/tiny/tiny-seed42-fold1.csv"
    predicted = kept.read_text()
    kept.write_text(predicted.replace("0.", "0.0", 1))
    again = run_crossval(2, [42], resume=True, **args)  # DVC's run cache gives the fold back
    assert list(again["resumed"]) == ["tiny-seed42-fold0"] and kept.read_text() == predicted
    other = run_crossval(
        2, [42], resume=True, overrides=["finetune.objective=balanced_accuracy"], **args
    )
    assert log.read_text().split() == ["0", "1", "0", "1"] and "resumed" not in other
    assert run_crossval(2, [42], resume=True, overrides=other["overrides"], **args)["resumed"]

    # The data grew since (the workspace's dvc.lock names the new data): every fold runs again.
    (repo / "data.txt").write_text("18 images\n")
    sh("dvc", "repro", "-q", "ingest")
    grown = run_crossval(2, [42], resume=True, overrides=other["overrides"], **args)
    assert log.read_text().split() == ["0", "1"] * 3 and "resumed" not in grown
