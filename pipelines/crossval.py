"""A recipe by cross-validation over the non-test images: each of ``ingest.folds`` folds in turn
is the validation split (``ingest.fold``), one DVC experiment through finetune per fold and
seed. What comes of it:

- the figures of every fold run, as mean ± sd over folds and seeds (the validation figures
  ``imgpipe seeds`` reports), under a parent MLflow run that nests the fold runs;
- the out-of-fold predictions: every non-test image once per seed, predicted by the fold model
  that never trained on it (finetune's ``val_predictions.csv``, the network's own
  probabilities), and their figures, over the classes and the groups of
  ``evaluate.class_groups``;
- the decision ``finetune.objective`` asks for, fitted on the out-of-fold predictions of all
  the non-test images rather than on one validation split, and scored honestly: each fold's
  images are decided by a correction fitted on the other folds' predictions; and the
  temperature fitted on them. ``apply`` writes it into params.yaml (``finetune.decision``,
  marked with the images and recipe it was fitted for), and the production run, trained on
  every non-test image, folds it in (``finetune.train_on``).

The test split is never read: every run stops at finetune, and holds its fold out
(``finetune.train_on=train``).

>>> run_crossval(5, [42], name="default")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgpipe.core.errors import InputError
from imgpipe.core.fileio import write_json_atomic
from imgpipe.data.lineage import training_digest
from imgpipe.data.manifest import read_manifest
from pipelines.seeds import (
    FOLDS_TAG,
    SEED_KEYS,
    experiment_run,
    headline,
    log_parent,
    newest_experiment_refs,
    run_experiments,
    spread,
    summarise,
    workspace_kept,
)

RECIPE = ("model", "augment", "train", "finetune")
"""The params sections a fitted decision is valid for (with the images: training_digest)."""
THROUGH = "finetune"
"""The last stage of a fold run: validation only, the test split sealed."""
PREDICTIONS = "outputs/finetune/val_predictions.csv"
OUT_DIR = Path("outputs/crossval")


@dataclass(frozen=True)
class OutOfFold:
    """One seed's out-of-fold predictions: every non-test image once."""

    sha256: list[str]
    labels: np.ndarray
    folds: np.ndarray
    probs: np.ndarray
    classes: list[str]


def _probability_rows(
    path: Path, required: set[str], what: str
) -> tuple[list[dict[str, str]], list[str]]:
    """A predictions CSV's rows and its probability columns (``p_<class>``, in order), checked
    to hold the ``required`` columns too; ``what`` names the file an error speaks of."""
    if not path.is_file():
        raise InputError(f"{path}: no such file ({what})")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        columns = [c for c in fields if c.startswith("p_")]
        missing = sorted(required - set(fields)) + ([] if columns else ["p_<class>"])
        if missing:
            raise InputError(f"{path}: not {what} (lacks {missing})")
        return list(reader), columns


def _probabilities(rows: Sequence[Mapping[str, str]], columns: Sequence[str]) -> np.ndarray:
    return np.array([[float(r[c]) for c in columns] for r in rows], np.float64)


def read_predictions(path: Path) -> tuple[list[str], list[str], np.ndarray, list[str]]:
    """finetune's val_predictions.csv: sha256s, labels, probabilities, class names."""
    rows, columns = _probability_rows(path, {"sha256", "label"}, "finetune's val predictions")
    probs = _probabilities(rows, columns)
    return [r["sha256"] for r in rows], [r["label"] for r in rows], probs, [c[2:] for c in columns]


def out_of_fold(fold_files: Mapping[int, Path], non_test: set[str]) -> OutOfFold:
    """The folds' validation predictions of one seed joined, checked to hold every non-test
    image (``non_test``, by sha256) exactly once."""
    digests: list[str] = []
    labels: list[str] = []
    folds: list[int] = []
    probs: list[np.ndarray] = []
    classes: list[str] | None = None
    for fold, path in sorted(fold_files.items()):
        shas, names, p, columns = read_predictions(path)
        if classes is not None and columns != classes:
            raise InputError(f"{path}: classes {columns}, the other folds {classes}")
        classes = columns
        digests += shas
        labels += names
        folds += [fold] * len(shas)
        probs.append(p)
    seen = set(digests)
    twice = len(digests) - len(seen)
    missing, extra = non_test - seen, seen - non_test
    if twice or missing or extra:
        raise InputError(
            f"the folds' validation images are not the non-test images once each: {twice} seen "
            f"twice, {len(missing)} never held out, {len(extra)} not in the non-test split"
        )
    assert classes is not None
    index = {name: i for i, name in enumerate(classes)}
    return OutOfFold(
        digests,
        np.array([index[name] for name in labels], np.int64),
        np.array(folds, np.int64),
        np.concatenate(probs),
        classes,
    )


def nested_decision(oof: OutOfFold, balance: float) -> np.ndarray:
    """Each image's class under the prior correction for ``balance``
    (imgpipe.evaluation.metrics.prior_correction) fitted on the other folds' predictions and labels
    alone: a fitted decision scored on images it was not fitted on."""
    from imgpipe.evaluation.decisions import nested

    return nested("prior", oof.labels, oof.probs, oof.folds, balance)


def oof_figures(
    oof: OutOfFold, groups: Mapping[str, Sequence[str]], balance: float | None
) -> dict[str, float]:
    """The out-of-fold figures of the network's own decision (4 classes and the groups), the
    temperature fitted on them, and for a fitted objective (``balance``) the decision each
    fold gets from a correction fitted on the other folds' predictions (``oof.fitted.*``);
    for the accuracy objective, what the balanced one would give (``oof.if_balanced.*``)."""
    from imgpipe.evaluation.metrics import (
        decision_metrics,
        fit_temperature,
        group_metrics,
        prior_correction,
        shift_probabilities,
    )

    predicted = oof.probs.argmax(axis=1)
    own = decision_metrics(oof.labels, predicted, oof.classes)
    shift = np.zeros(len(oof.classes))
    figures: dict[str, float] = {
        "oof.accuracy": own["accuracy"],
        "oof.balanced_accuracy": own["balanced_accuracy"],
    }
    if groups:
        grouped = group_metrics(oof.labels, predicted, oof.classes, groups)
        figures["oof.groups.accuracy"] = grouped["accuracy"]
        figures["oof.groups.balanced_accuracy"] = grouped["balanced_accuracy"]
    if balance is None:  # what the balanced objective would trade, from the same predictions
        traded = decision_metrics(oof.labels, nested_decision(oof, 1.0), oof.classes)
        figures["oof.if_balanced.accuracy"] = traded["accuracy"]
        figures["oof.if_balanced.balanced_accuracy"] = traded["balanced_accuracy"]
    else:
        fitted = decision_metrics(oof.labels, nested_decision(oof, balance), oof.classes)
        figures["oof.fitted.accuracy"] = fitted["accuracy"]
        figures["oof.fitted.balanced_accuracy"] = fitted["balanced_accuracy"]
        counts = np.bincount(oof.labels, minlength=len(oof.classes))
        figures["oof.fitted.tau"], shift = prior_correction(oof.labels, oof.probs, counts, balance)
    # As finetune folds them in: the temperature is fitted after the correction.
    figures["oof.temperature"] = fit_temperature(
        oof.labels, lambda t: shift_probabilities(oof.probs, shift, t)
    )
    return {key: round(float(value), 6) for key, value in figures.items()}


def _non_test(manifest: Path) -> set[str]:
    return {row["sha256"] for row in read_manifest(manifest, ("train", "val"))}


def write_oof(path: Path, oofs: Mapping[int, OutOfFold]) -> None:
    """Every seed's out-of-fold predictions in one CSV: sha256, label, seed, fold, p_<class>."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        classes = next(iter(oofs.values())).classes
        writer.writerow(["sha256", "label", "seed", "fold", *(f"p_{c}" for c in classes)])
        for seed, oof in oofs.items():
            for digest, label, fold, row in zip(
                oof.sha256, oof.labels, oof.folds, oof.probs, strict=True
            ):
                writer.writerow([digest, classes[label], seed, fold, *(f"{p:.6f}" for p in row)])


def read_oof(path: Path) -> dict[int, OutOfFold]:
    """:func:`write_oof`'s CSV read back: each seed's out-of-fold predictions."""
    rows, columns = _probability_rows(
        path, {"sha256", "label", "seed", "fold"}, "imgpipe crossval's out-of-fold predictions"
    )
    classes = [c[2:] for c in columns]
    index = {name: i for i, name in enumerate(classes)}
    oofs: dict[int, OutOfFold] = {}
    for seed in sorted({int(r["seed"]) for r in rows}):
        mine = [r for r in rows if int(r["seed"]) == seed]
        unknown = sorted({r["label"] for r in mine} - set(index))
        if unknown:
            raise InputError(f"{path}: labels {unknown} have no probability column")
        oofs[seed] = OutOfFold(
            [r["sha256"] for r in mine],
            np.array([index[r["label"]] for r in mine], np.int64),
            np.array([int(r["fold"]) for r in mine], np.int64),
            _probabilities(mine, columns),
            classes,
        )
    return oofs


def compare_decisions(
    predictions: Path,
    objective: str | float,
    balance: float,
    *,
    by: str | None = None,
    manifest: Path = Path("outputs/ingest/manifest.csv"),
    out: Path | None = None,
) -> dict[str, Any]:
    """The decision rules of :mod:`imgpipe.evaluation.decisions` for an objective (``balance``:
    the weight of balanced accuracy), each fitted on all folds but one of a crossval's
    out-of-fold predictions and scored on the fold left out, per seed; ``by``: the manifest's
    metadata column whose values ``prior_by`` fits one correction each for (without it, that
    rule is left out). Mean ± sd over every fold of every seed; ``out``: the summary as JSON."""
    from imgpipe.evaluation.decisions import RULES, compare

    oofs = read_oof(predictions)
    rules = [rule for rule in RULES if by is not None or rule != "prior_by"]
    strata: dict[str, str] = {}
    if by is not None:
        rows = read_manifest(manifest, ("train", "val"), columns=(by,))
        strata = {row["sha256"]: row[by] for row in rows}
    per_seed: dict[str, dict[str, Any]] = {}
    for seed, oof in oofs.items():
        values = None
        if by is not None:
            unknown = [d for d in oof.sha256 if d not in strata]
            if unknown:
                raise InputError(
                    f"{predictions}: {len(unknown)} images of seed {seed} are not non-test images "
                    f"of {manifest} (e.g. {unknown[0][:12]}): the predictions are of other data"
                )
            values = np.array([strata[d] for d in oof.sha256])
        per_seed[str(seed)] = compare(
            oof.labels, oof.probs, oof.folds, oof.classes, balance, values, rules
        )
    first = next(iter(per_seed.values()))
    summary = {
        "predictions": str(predictions),
        "objective": objective,
        "balance": balance,
        "by": by,
        "seeds": [int(s) for s in per_seed],
        "folds": len(first["argmax"]["folds"]["accuracy"]),
        "images": len(next(iter(oofs.values())).labels),
        "classes": next(iter(oofs.values())).classes,
        "rules": {
            rule: {
                **{
                    key: spread([v for s in per_seed.values() for v in s[rule]["folds"][key]])
                    for key in ("accuracy", "balanced_accuracy", "objective")
                },
                "recall": {
                    name: spread([s[rule]["recall"][name] for s in per_seed.values()])
                    for name in first[rule]["recall"]
                },
            }
            for rule in rules
        },
        "per_seed": per_seed,
    }
    if out is not None:
        write_json_atomic(out, summary)
    return summary


def describe_decisions(summary: Mapping[str, Any]) -> str:
    """One line per rule: the objective, accuracy and balanced accuracy over folds, and each
    class's out-of-fold recall."""
    lines = [
        f"decision rules for objective {summary['objective']} (balance {summary['balance']}), "
        f"fitted on {summary['folds'] - 1} folds and scored on the fold left out, mean ± sd over "
        f"{summary['folds']} folds x seeds {summary['seeds']} ({summary['images']} images):"
    ]
    for rule, figures in summary["rules"].items():
        recalls = ", ".join(f"{c} {s['mean']:.3f}" for c, s in figures["recall"].items())
        lines.append(
            f"  {rule:10s} objective {figures['objective']['mean']:.4f} ± "
            f"{figures['objective']['sd']:.4f}  accuracy {figures['accuracy']['mean']:.4f} ± "
            f"{figures['accuracy']['sd']:.4f}  balanced {figures['balanced_accuracy']['mean']:.4f}"
            f" ± {figures['balanced_accuracy']['sd']:.4f}  recall: {recalls}"
        )
    return "\n".join(lines)


AFTER_TRAINING = ("objective", "calibrate")
"""finetune params that act after training (imgpipe.core.params.RESUME_IGNORES): the fold runs'
predictions serve any value of them, so a change needs no fold run again (``refit``)."""


def fit_out_of_fold(
    oofs: Mapping[int, OutOfFold],
    groups: Mapping[str, Sequence[str]],
    tuning: Any,
    recipe: Mapping[str, Any],
    name: str,
) -> dict[str, Any]:
    """A crossval summary's out-of-fold entries: each seed's out-of-fold figures
    (``out_of_fold``), their mean ± sd over seeds (``out_of_fold_summary``), and the decision
    for ``tuning.objective`` fitted on every seed's predictions together, marked with the images
    and ``recipe`` it is valid for (``decision``: what params.yaml's ``finetune.decision``
    holds)."""
    seeds = list(oofs)
    per_seed = {seed: oof_figures(oofs[seed], groups, tuning.balance) for seed in seeds}
    pooled = OutOfFold(
        [d for o in oofs.values() for d in o.sha256],
        np.concatenate([o.labels for o in oofs.values()]),
        np.concatenate([o.folds for o in oofs.values()]),
        np.concatenate([o.probs for o in oofs.values()]),
        oofs[seeds[0]].classes,
    )
    decision = oof_figures(pooled, groups, tuning.balance)
    folds = len(np.unique(pooled.folds))
    fitted = {
        "objective": tuning.objective,
        "temperature": decision["oof.temperature"],
        "tau": decision.get("oof.fitted.tau"),
        "fitted_on": training_digest(oof_images(oofs), recipe),
        "source": f"imgpipe crossval {name}: {folds} folds x seeds "
        f"{', '.join(map(str, seeds))}, {len(pooled.sha256)} out-of-fold predictions",
    }
    return {
        "out_of_fold": {str(seed): per_seed[seed] for seed in seeds},
        "out_of_fold_summary": {
            key: spread([per_seed[s][key] for s in seeds]) for key in per_seed[seeds[0]]
        },
        "decision": fitted,
    }


def oof_images(oofs: Mapping[int, OutOfFold]) -> dict[str, str]:
    """sha256 -> label of the images the out-of-fold predictions cover."""
    return {
        d: o.classes[label]
        for o in oofs.values()
        for d, label in zip(o.sha256, o.labels, strict=True)
    }


def run_crossval(
    folds: int,
    seeds: Sequence[int],
    *,
    overrides: Sequence[str] = (),
    name: str = "crossval",
    root: Path | None = None,
    out: Path | None = None,
    seed_keys: Sequence[str] = SEED_KEYS,
    apply: bool = False,
    resume: bool = False,
) -> dict[str, Any]:
    """Cross-validate the recipe (params.yaml with ``overrides``, as ``dvc exp run -S`` takes
    them) over ``folds`` folds and ``seeds``: ``folds * len(seeds)`` DVC experiments
    ``<name>-seed<S>-fold<F>`` through finetune; then the out-of-fold predictions
    (``outputs/crossval/<name>/oof_predictions.csv``), the parent MLflow run and ``out``.
    Afterwards the workspace's params.yaml, dvc.lock and metrics are put back and DVC checks
    out the outputs they name (the fold runs stay in ``dvc exp show``). ``apply``: then set
    params.yaml's ``finetune.decision`` to the decision fitted here (params.yaml's own recipe
    only: not with ``overrides``). ``resume``: a fold run that an earlier, interrupted
    crossval of this name finished (:meth:`Resumable.kept`) is not run again; the summary names
    the commit each such run ran on (``resumed``)."""
    import mlflow

    from imgpipe.core.params import (
        EvaluateParams,
        FinetuneParams,
        load_params,
        section,
        sections,
        set_value,
        with_sets,
    )
    from imgpipe.tracking.runs import ensure_experiment, tracking_uri

    root = (root or Path.cwd()).resolve()
    if folds < 2:
        raise InputError(f"crossval: --folds must be at least 2, got {folds}")
    if apply and overrides:
        raise InputError(
            "crossval: --apply sets the decision of params.yaml's own recipe; make the -S "
            f"values {list(overrides)} params.yaml's first, then cross-validate it"
        )
    base = load_params(root / "params.yaml")
    raw = with_sets(base, list(overrides))
    tuning = section(FinetuneParams, "finetune", raw)
    recipe = sections(RECIPE, raw)
    groups = dict(section(EvaluateParams, "evaluate", raw).class_groups)
    saved = root / OUT_DIR / name
    if saved.exists() and not resume:
        shutil.rmtree(saved)
    saved.mkdir(parents=True, exist_ok=True)
    experiment = {
        (seed, fold): f"{name}-seed{seed}-fold{fold}" for seed in seeds for fold in range(folds)
    }
    variants = [
        (
            experiment[seed, fold],
            [
                *overrides,
                f"ingest.folds={folds}",
                f"ingest.fold={fold}",
                "finetune.train_on=train",
                *(f"{key}={seed}" for key in seed_keys),
            ],
        )
        for seed in seeds
        for fold in range(folds)
    ]
    mlflow.set_tracking_uri(tracking_uri(root))
    kept: dict[str, KeptRun] = {}
    if resume:
        earlier = Resumable.of(root)
        for run, sets in variants:
            if (found := earlier.kept(saved, run, with_sets(base, list(sets)))) is not None:
                kept[run] = found
    non_test: set[str] = set()

    def collect(run: str) -> Mapping[str, float]:
        shutil.copy(root / PREDICTIONS, saved / f"{run}.csv")
        non_test.update(_non_test(root / "outputs/ingest/manifest.csv"))
        return headline(root / "metrics", with_test=False)

    to_run = [variant for variant in variants if variant[0] not in kept]
    with workspace_kept(root, "crossval"):  # DVC's -S leaves the last fold's params behind
        ran, runs = run_experiments(to_run, through=THROUGH, root=root, after=collect)
    if kept:  # the test split is sealed: every fold's non-test images are the workspace's
        non_test.update(_non_test(root / "outputs/ingest/manifest.csv"))
        runs.update({run: found.mlflow_run for run, found in kept.items() if found.mlflow_run})
    figures = {run: dict(kept[run].figures) if run in kept else ran[run] for run, _ in variants}
    summary: dict[str, Any] = {
        "recipe": name,
        "overrides": list(overrides),
        "through": THROUGH,
        "folds": folds,
        "seeds": list(seeds),
        "seed_keys": list(seed_keys),
        "objective": tuning.objective,
        "per_run": figures,
        "summary": summarise(figures),
        **conclude(saved, experiment, non_test, groups, tuning, recipe, name),
        "predictions": str((saved / "oof_predictions.csv").relative_to(root)),
        "mlflow_runs": dict(runs),
    }
    if kept:
        summary["resumed"] = {run: found.commit for run, found in kept.items()}
    parent = {
        **summary,
        "summary": {**summary["summary"], **summary["out_of_fold_summary"]},
    }
    summary["parent_run"] = log_parent(
        parent, ensure_experiment(mlflow, root), label=f"{folds} folds x {len(seeds)} seeds"
    )
    mlflow.MlflowClient().set_tag(summary["parent_run"], FOLDS_TAG, str(folds))
    if out is not None:
        write_json_atomic(out, summary)
    if apply:
        set_value(root / "params.yaml", "finetune", "decision", summary["decision"])
    return summary


def conclude(
    saved: Path,
    experiment: Mapping[tuple[int, int], str],
    non_test: set[str],
    groups: Mapping[str, Sequence[str]],
    tuning: Any,
    recipe: Mapping[str, Any],
    name: str,
) -> dict[str, Any]:
    """What the fold runs' predictions (``saved/<experiment>.csv``, ``experiment``: (seed,
    fold) -> its run) come to: each seed's out-of-fold predictions over ``non_test``, written
    to ``saved/oof_predictions.csv``, and :func:`fit_out_of_fold`'s entries of the summary."""
    seeds = list(dict.fromkeys(seed for seed, _ in experiment))  # in the order asked
    oofs = {
        seed: out_of_fold(
            {fold: saved / f"{run}.csv" for (s, fold), run in experiment.items() if s == seed},
            non_test,
        )
        for seed in seeds
    }
    write_oof(saved / "oof_predictions.csv", oofs)
    return fit_out_of_fold(oofs, groups, tuning, recipe, name)


def _data_read(lock: Mapping[str, Any]) -> list[Any]:
    """What ingest read in a dvc.lock, its code aside: the data folder (and its md5)."""
    deps = lock.get("stages", {}).get("ingest", {}).get("deps", [])
    return [dep for dep in deps if not str(dep.get("path", "")).endswith(".py")]


@dataclass(frozen=True)
class KeptRun:
    """A fold run that an earlier, interrupted crossval finished (:meth:`Resumable.kept`)."""

    figures: Mapping[str, float]
    mlflow_run: str | None
    commit: str


@dataclass(frozen=True)
class Resumable:
    """What a resumed crossval checks each earlier fold run against, read once: the newest
    experiment ref of each name, the data the workspace's dvc.lock names, DVC's cache."""

    root: Path
    refs: Mapping[str, str]
    data: list[Any]
    cache: Path

    @classmethod
    def of(cls, root: Path) -> Resumable:
        import subprocess

        import yaml

        lock = root / "dvc.lock"
        here = (yaml.safe_load(lock.read_text()) if lock.is_file() else None) or {}
        cache = subprocess.run(
            ["dvc", "cache", "dir"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        return cls(root, newest_experiment_refs(root), _data_read(here), Path(cache))

    def _git(self, *args: str) -> str:
        import subprocess

        done = subprocess.run(["git", *args], cwd=self.root, capture_output=True, text=True)
        return done.stdout if done.returncode == 0 else ""

    def kept(self, saved: Path, run: str, params: Mapping[str, Any]) -> KeptRun | None:
        """The DVC experiment ``run`` as an earlier crossval of this name left it, when it is
        the same run: the newest experiment of that name ran on ``params`` (its params.yaml),
        the copy of its predictions in ``saved`` is its finetune output byte for byte (the md5
        its dvc.lock gives, from DVC's cache), and it read the data the workspace's dvc.lock
        names (ingest's deps other than code). Then its figures (its metrics), its MLflow run
        and the commit it ran on; else None (run it again)."""
        import hashlib
        import tempfile

        import yaml

        ref = self.refs.get(run)
        copy = saved / f"{run}.csv"
        if (
            ref is None
            or not copy.is_file()
            or yaml.safe_load(self._git("show", f"{ref}:params.yaml")) != params
        ):
            return None
        lock = yaml.safe_load(self._git("show", f"{ref}:dvc.lock")) or {}
        if _data_read(lock) != self.data:  # the data grew or changed since
            return None
        folder, file = str(Path(PREDICTIONS).parent), Path(PREDICTIONS).name
        outs = lock.get("stages", {}).get(THROUGH, {}).get("outs", [])
        listing_md5 = next((o.get("md5", "") for o in outs if o["path"] == folder), "")
        listing = self.cache / "files" / "md5" / listing_md5[:2] / listing_md5[2:]
        if not listing_md5.endswith(".dir") or not listing.is_file():
            return None
        expected = {e["relpath"]: e["md5"] for e in json.loads(listing.read_text())}.get(file)
        if hashlib.md5(copy.read_bytes()).hexdigest() != expected:
            return None
        with tempfile.TemporaryDirectory(prefix="imgpipe-kept-run-") as tmp:
            (Path(tmp) / "finetune.json").write_text(
                self._git("show", f"{ref}:metrics/finetune.json")
            )
            figures = headline(Path(tmp), with_test=False)
        return KeptRun(figures, experiment_run(run), self._git("rev-parse", f"{ref}^").strip())


def refit(
    previous: Path,
    overrides: Sequence[str],
    *,
    root: Path | None = None,
    out: Path | None = None,
    apply: bool = False,
) -> dict[str, Any]:
    """The decision of params.yaml's objective, or of another (``overrides``), fitted on the
    out-of-fold predictions of an earlier ``imgpipe crossval`` (its summary, ``previous``)
    without a fold run: ``overrides`` may set only finetune params that act after training
    (``AFTER_TRAINING``). Refused when the predictions are not of params.yaml's recipe any more
    (the earlier decision's images and recipe no longer match). A parent MLflow run records it,
    tagged with the earlier one. ``apply``: as :func:`run_crossval`'s."""
    import mlflow

    from imgpipe.core.params import (
        EvaluateParams,
        FinetuneParams,
        load_params,
        section,
        sections,
        set_value,
        with_sets,
    )
    from imgpipe.tracking.runs import ensure_experiment

    root = (root or Path.cwd()).resolve()
    if apply and overrides:
        raise InputError(
            "crossval: --apply sets the decision of params.yaml's own recipe; make the -S "
            f"values {list(overrides)} params.yaml's first, then refit"
        )
    earlier = json.loads(previous.read_text())
    allowed = tuple(f"finetune.{key}=" for key in AFTER_TRAINING)
    training = [o for o in overrides if not o.startswith(allowed)]
    if training:
        raise InputError(
            f"crossval --refit: {training} change how the folds train; only "
            f"{', '.join(f'finetune.{k}' for k in AFTER_TRAINING)} act after training: run "
            "imgpipe crossval again for the others"
        )
    ran = with_sets(
        load_params(root / "params.yaml"),
        [*earlier["overrides"], f"finetune.objective={earlier['objective']}"],
    )
    oofs = read_oof(root / earlier["predictions"])
    if training_digest(oof_images(oofs), sections(RECIPE, ran)) != earlier["decision"]["fitted_on"]:
        raise InputError(
            f"crossval --refit: the predictions of {previous} were made under another recipe "
            "or other images than params.yaml's now: run imgpipe crossval again"
        )
    raw = with_sets(load_params(root / "params.yaml"), [*earlier["overrides"], *overrides])
    tuning = section(FinetuneParams, "finetune", raw)
    groups = dict(section(EvaluateParams, "evaluate", raw).class_groups)
    summary = {
        **earlier,
        "overrides": [*earlier["overrides"], *overrides],
        "objective": tuning.objective,
        **fit_out_of_fold(
            oofs, groups, tuning, sections(RECIPE, raw), f"{earlier['recipe']}, refit"
        ),
        "refit_of": earlier["parent_run"],
    }
    parent = {
        **summary,
        "recipe": f"{earlier['recipe']} refit",
        "summary": {**summary["summary"], **summary["out_of_fold_summary"]},
        "mlflow_runs": {},  # the fold runs stay nested under the run that made them
    }
    summary["parent_run"] = log_parent(
        parent, ensure_experiment(mlflow, root), label=f"{summary['folds']} folds refit"
    )
    client = mlflow.MlflowClient()
    client.set_tag(summary["parent_run"], FOLDS_TAG, str(summary["folds"]))
    client.set_tag(summary["parent_run"], "refit_of", earlier["parent_run"])
    if out is not None:
        write_json_atomic(out, summary)
    if apply:
        set_value(root / "params.yaml", "finetune", "decision", summary["decision"])
    return summary


def _flow(value: Any) -> str:
    """A value in the flow style that both DVC's ``-S`` (Hydra's grammar) and YAML read back as
    it is: strings single-quoted, numbers and null bare."""
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{key}: {_flow(item)}" for key, item in value.items()) + "}"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return "null" if value is None else json.dumps(value)


def decision_flag(summary: Mapping[str, Any]) -> str:
    """The ``-S`` flags that give a run the summary's recipe and its fitted decision (``dvc exp
    run`` and ``imgpipe seeds`` take them), so that it trains on every non-test image."""
    sets = [*summary["overrides"], f"finetune.decision={_flow(summary['decision'])}"]
    return " ".join('-S "' + s.replace('"', '\\"') + '"' for s in sets)


def describe(summary: Mapping[str, Any]) -> str:
    """The out-of-fold figures and the fitted decision, then each fold figure's mean ± sd."""
    lines = [
        f"{summary['recipe']}: {summary['folds']} folds x seeds {summary['seeds']}, "
        f"{summary['decision']['source']}"
    ]
    for key, stats in {**summary["out_of_fold_summary"], **summary["summary"]}.items():
        lines.append(f"  {key:40s} {stats['mean']:.4f} ± {stats['sd']:.4f}")
    lines.append(f"  decision: {json.dumps(summary['decision'])}")
    return "\n".join(lines)
