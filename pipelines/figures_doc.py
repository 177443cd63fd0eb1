"""The figure tables of the README and docs/accuracy.md, rendered from the committed files that
hold the figures (``metrics/*.json``, ``docs/accuracy.yaml``), so that a quoted figure cannot
drift from its source: ``make docs`` rewrites them, and tests/code/test_docs.py fails when a page
differs from what its sources render or quotes a figure outside a rendered block.

A rendered block sits between ``<!-- render: NAME -->`` and ``<!-- end render -->``; NAME is a
key of ``BLOCKS``. Only files that ``make demo`` writes from the code and the seed alone are read
(evaluate.json, export.json) besides those it never writes (seeds files, docs/accuracy.yaml):
no figure of the machine (a time, a throughput) from a file a rerun elsewhere rewrites.

>>> render_page(Path("docs/accuracy.md").read_text(), Path("."))  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

PAGES = ("README.md", "docs/accuracy.md")
BLOCK = re.compile(r"(<!-- render: ([\w-]+) -->\n)(.*?)(<!-- end render -->)", re.DOTALL)
SEEDS = "metrics/seeds.json"
SEEDS_BALANCED = "metrics/seeds_balanced.json"
ENSEMBLE = "metrics/ensemble.json"
ENSEMBLE_EXPORT = "metrics/ensemble_export.json"
STUDENT = "metrics/student.json"
STUDENT_EXPORT = "metrics/student_export.json"
SOURCES = "docs/accuracy.yaml"
"""Published figures on ELPV (each with its classes, split, hardware and citation) and the
targets set for this pipeline."""


class RenderError(ValueError):
    """A page names a block no renderer knows, or a source lacks what a block needs."""


def _json(root: Path, path: str) -> dict[str, Any]:
    file = root / path
    if not file.is_file():
        raise RenderError(f"{path}: missing; it is the source of a rendered table")
    return json.loads(file.read_text())


def _groups(root: Path) -> str:
    """``functional/defective``: the class groups of params.yaml's evaluate section."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    return "/".join(params["evaluate"].get("class_groups") or {}) or "class groups"


def spread_text(stats: Mapping[str, float], places: int = 3) -> str:
    """``0.737 ± 0.032``: a mean ± sd of ``imgpipe seeds``."""
    return f"{stats['mean']:.{places}f} ± {stats['sd']:.{places}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _seed_figures(root: Path) -> list[tuple[str, str]]:
    """The figures a seeds summary may hold, in reading order, with what each one is."""
    groups = _groups(root)
    return [
        ("test.accuracy", "test accuracy, served decision"),
        ("test.argmax.accuracy", "test accuracy, the network's argmax"),
        ("test.balanced_accuracy", "test balanced accuracy, served"),
        ("test.argmax.balanced_accuracy", "test balanced accuracy, argmax"),
        ("test.groups.accuracy", f"test 2-class accuracy ({groups}), served"),
        ("test.argmax.groups.accuracy", f"test 2-class accuracy ({groups}), argmax"),
        ("test.groups.balanced_accuracy", f"test 2-class balanced accuracy ({groups}), served"),
        ("test.ece", "test expected calibration error, served"),
        ("finetune.val_accuracy", "validation accuracy, argmax"),
        ("finetune.corrected_val_accuracy", "validation accuracy, fitted decision"),
        ("finetune.val_balanced_accuracy", "validation balanced accuracy, argmax"),
        ("finetune.corrected_val_balanced_accuracy", "validation balanced accuracy, fitted"),
        ("export.val_agreement.tflite_int8", "full-integer int8 agreement, validation"),
        ("finetune.seconds", "fine-tuning seconds per seed, the machine of that run"),
    ]


def _override_text(override: str) -> str:
    """``-S key=value`` as a reader wants it: a fitted decision by where it was fitted."""
    key, _, value = override.partition("=")
    if key == "finetune.decision":
        source = yaml.safe_load(value).get("source", "?")
        return f"`-S finetune.decision=...` (fitted by {source})"
    return f"`-S {override}`"


def render_seeds(root: Path, source: str = SEEDS) -> str:
    """A recipe over training seeds (default: the default recipe's, metrics/seeds.json): each
    figure's mean ± sd, range and per-seed values."""
    summary = _json(root, source)
    stats, per_seed = summary["summary"], summary["per_seed"]
    seeds = [str(s) for s in summary["seeds"]]
    known = _seed_figures(root)
    recalls = sorted(k for k in stats if k.startswith("test.recall."))
    figures = [*known, *((k, f"test recall of {k.removeprefix('test.recall.')}") for k in recalls)]
    rows = []
    for key, what in figures:
        if key not in stats:
            continue
        places = 0 if key.endswith("seconds") else 4  # a time in whole seconds
        rows.append(
            [
                what,
                f"**{spread_text(stats[key], min(places, 3))}**",
                f"{stats[key]['min']:.{places}f} .. {stats[key]['max']:.{places}f}",
                *(f"{per_seed[s][key]:.{places}f}" for s in seeds),
            ]
        )
    overrides = ", ".join(_override_text(o) for o in summary["overrides"]) or "none"
    return (
        f"`imgpipe seeds --seeds {' '.join(seeds)} --through {summary['through']}` "
        f"(recipe `{summary['recipe']}`, overrides: {overrides}; `{source}`, MLflow parent run "
        f"`{summary['parent_run']}`):\n\n"
        + _table(["figure", "mean ± sd", "min .. max", *(f"seed {s}" for s in seeds)], rows)
    )


def render_ensemble(root: Path) -> str:
    """The default recipe's seed models averaged in one (``imgpipe ensemble``) and, once
    distilled (``imgpipe distill``), its student, evaluated on the test split
    (metrics/ensemble.json, metrics/student.json: evaluate's summaries), beside the seeds' mean
    ± sd (metrics/seeds.json); and their exports' int8 files."""
    from pipelines.seeds import evaluation_figures

    ensemble = evaluation_figures(_json(root, ENSEMBLE))
    distilled = (root / STUDENT).is_file()
    student = evaluation_figures(_json(root, STUDENT)) if distilled else {}
    summary = _json(root, SEEDS)
    stats = summary["summary"]
    rows = [
        [
            what,
            f"**{ensemble[key]:.4f}**",
            *([f"{student[key]:.4f}" if key in student else ""] if distilled else []),
            spread_text(stats[key], 4),
        ]
        for key, what in _seed_figures(root)
        if key in ensemble and key in stats
    ]
    seeds = " ".join(str(s) for s in summary["seeds"])
    exports = []
    models = [("the ensemble", ENSEMBLE_EXPORT), ("the default model", "metrics/export.json")]
    if distilled:
        models.insert(1, ("the student", STUDENT_EXPORT))
    for what, path in models:
        report = _json(root, path)
        int8 = report["parity"].get("tflite_int8", {})
        exports.append(
            [
                f"{what} (`{path}`)",
                f"{int8['accuracy']:.4f}" if int8 else "no int8 file",
                f"{int8['top1_agreement']:.4f}" if int8 else "",
                f"{report['sizes_mb']['saved_model']:.1f}",
                f"{report['sizes_mb']['tflite_int8']:.1f}" if int8 else "",
            ]
        )
    student_text = (
        f", and its student (`imgpipe distill`, then `imgpipe evaluate`: `{STUDENT}`)"
        if distilled
        else ""
    )
    return (
        f"`imgpipe ensemble` of the models of seeds {seeds} of `{SEEDS}`, then `imgpipe "
        f"evaluate` (`{ENSEMBLE}`){student_text}:\n\n"
        + _table(
            [
                "figure",
                "the ensemble",
                *(["the student"] if distilled else []),
                f"one model, mean ± sd of seeds {seeds}",
            ],
            rows,
        )
        + "\nExported by `imgpipe export`, the full-integer int8 file on the test split, and "
        "its agreement with the SavedModel:\n\n"
        + _table(
            [
                "model",
                "int8 test accuracy",
                "int8 top-1 agreement",
                "SavedModel MB",
                "int8 TFLite MB",
            ],
            exports,
        )
    )


def _seed(root: Path, params_file: str = "params.yaml") -> str:
    """A params file's training seeds, as the run in the workspace used them (``42``)."""
    params = yaml.safe_load((root / params_file).read_text())
    seeds = {params["train"]["seed"], params["finetune"]["seed"]}
    return " / ".join(str(s) for s in sorted(seeds))


def _run_table(root: Path, folder: str) -> tuple[str, dict[str, Any]]:
    """One pipeline run's test figures (``folder``'s evaluate.json and export.json): the served
    decision, the network's own and the class groups, per class recall, the calibration error
    and the int8 file's agreement; and its evaluate summary."""
    evaluation = _json(root, f"{folder}/evaluate.json")
    served, own = evaluation["test"], evaluation.get("argmax")
    groups = evaluation.get("groups", {})
    objective = served.get("objective", "not recorded")
    header = ["figure", f"served (objective {objective})", "argmax"]
    rows = []
    for key, what in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy")):
        rows.append([f"test {what}", f"{served[key]:.4f}", f"{own[key]:.4f}" if own else ""])
    for key in ("accuracy", "balanced_accuracy"):
        if groups:
            names = "/".join(groups["served"]["per_class"])
            rows.append(
                [
                    f"test 2-class {key.replace('_', ' ')} ({names})",
                    f"{groups['served'][key]:.4f}",
                    f"{groups['argmax'][key]:.4f}",
                ]
            )
    for label, row in served["per_class"].items():
        theirs = f"{own['per_class'][label]['recall']:.4f}" if own else ""
        rows.append(
            [f"test recall of {label} ({row['support']} images)", f"{row['recall']:.4f}", theirs]
        )
    rows.append(["test expected calibration error", f"{served['ece']:.4f}", ""])
    exported = _json(root, f"{folder}/export.json")
    for split, key in (("test", "parity"), ("validation", "parity_validation")):
        for kind, parity in sorted(exported.get(key, {}).items()):
            if isinstance(parity, dict) and "top1_agreement" in parity:
                rows.append(
                    [
                        f"{kind} agreement with the served model, {split}",
                        f"{parity['top1_agreement']:.4f}",
                        "",
                    ]
                )
    return _table(header, rows), evaluation


def render_release(root: Path) -> str:
    """This release's run (metrics/evaluate.json, export.json)."""
    table, evaluation = _run_table(root, "metrics")
    return (
        f"Seed {_seed(root)}, `metrics/evaluate.json` and `metrics/export.json` "
        f"({evaluation['test']['images']} test images):\n\n" + table
    )


FASHION = "metrics/fashion_mnist"
"""A run of the pipeline on Fashion-MNIST: its own metrics files and the params it ran with."""


def _changed(ours: Mapping[str, Any], theirs: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``section.key=value`` for every leaf of ``theirs`` that differs from ``ours``."""
    changed = []
    for key, value in theirs.items():
        mine = ours.get(key) if isinstance(ours, Mapping) else None
        if isinstance(value, Mapping) and value and isinstance(mine, Mapping):
            changed += _changed(mine, value, f"{prefix}{key}.")
        elif mine != value:
            changed.append(f"{prefix}{key}={json.dumps(value)}")
    return changed


def render_fashion(root: Path) -> str:
    """The pipeline's run on Fashion-MNIST (``metrics/fashion_mnist/``): what it ran with, its
    split, and the same figures as this release's run."""
    if not (root / FASHION / "evaluate.json").is_file():
        return f"`{FASHION}/` is not there yet: no Fashion-MNIST run of this release.\n"
    table, _ = _run_table(root, FASHION)
    ours = yaml.safe_load((root / "params.yaml").read_text())
    theirs = yaml.safe_load((root / FASHION / "params.yaml").read_text())
    changed = ", ".join(f"`{c}`" for c in _changed(ours, theirs)) or "none"
    splits = _json(root, f"{FASHION}/ingest.json")["split_method"]["achieved_fractions"]
    images = _json(root, f"{FASHION}/ingest.json")["images"]
    tuned = _json(root, f"{FASHION}/finetune.json")["finetune"]
    shares = ", ".join(f"{name} {share:.0%}" for name, share in sorted(splits.items()))
    return (
        f"`imgpipe fashion-mnist-data data --sets train,t10k --per-class 600`, then `dvc repro "
        f"export` with params.yaml's values but {changed} (`{FASHION}/params.yaml`); "
        f"{images} images ({shares}); seed {_seed(root, f'{FASHION}/params.yaml')}; "
        f"fine-tuning {tuned['seconds']:.0f} s + {tuned['quantization_aware_seconds']:.0f} s "
        f"quantization-aware on {tuned['training_images']} images (`{FASHION}/`):\n\n" + table
    )


def _recipe_files(root: Path) -> list[Path]:
    return sorted((root / "metrics").glob("seeds*.json"))


def render_recipes(root: Path) -> str:
    """Every recipe measured over seeds (metrics/seeds*.json), on validation: the network's
    argmax, the decision fitted on validation (where one was), the int8 agreement."""
    columns = (
        ("finetune.val_accuracy", "val accuracy, argmax"),
        ("finetune.val_balanced_accuracy", "val balanced, argmax"),
        ("finetune.corrected_val_accuracy", "val accuracy, fitted decision"),
        ("finetune.corrected_val_balanced_accuracy", "val balanced, fitted decision"),
        ("export.val_agreement.tflite_int8", "int8 agreement, val"),
    )
    rows = []
    for path in _recipe_files(root):
        summary = json.loads(path.read_text())
        stats = summary["summary"]
        if not any(key in stats for key, _ in columns):
            continue  # the production run: every non-test image trained, nothing to validate on
        changed = ", ".join(f"`{o}`" for o in summary["overrides"]) or "none (the default)"
        rows.append(
            [
                f"`{path.relative_to(root)}`",
                changed,
                " ".join(str(s) for s in summary["seeds"]),
                *(spread_text(stats[key]) if key in stats else "" for key, _ in columns),
            ]
        )
    header = ["file", "changed from the default of its day", "seeds", *(w for _, w in columns)]
    return _table(header, rows)


def render_published(root: Path) -> str:
    """Published figures on ELPV with what each one measures (docs/accuracy.yaml)."""
    sources = yaml.safe_load((root / SOURCES).read_text())
    rows = [
        [
            str(entry["figure"]),
            entry["method"],
            entry["classes"],
            entry["split"],
            entry["hardware"],
            f"[{entry['citation']}]({entry['url']})",
            entry["checked"],
        ]
        for entry in sources["published"]
    ]
    header = ["accuracy", "method", "classes", "split", "hardware", "source", "checked in"]
    return _table(header, rows)


def render_targets(root: Path) -> str:
    """The targets of docs/accuracy.yaml beside the figure measured for each (from the file it
    names: a seeds summary's mean ± sd, or one figure of another metrics file, less the
    figure ``minus`` names), and whether it is met."""
    sources = yaml.safe_load((root / SOURCES).read_text())
    rows = []
    for target in sources["targets"]:
        measured, met = "not measured yet", ""
        source = target.get("source")
        if source and (root / source).is_file():
            found = json.loads((root / source).read_text())
            if "summary" in found:  # a seeds summary: mean ± sd
                stats = found["summary"].get(target["figure"])
                if stats and "value" in target:
                    measured = f"{spread_text(stats)} (`{source}`)"
                    value = stats[target.get("statistic", "mean")]
                    met = "yes" if _meets(value, target["op"], target["value"]) else "no"
            else:
                value = _figure(found, target["figure"], source)
                measured = f"{value:.4g} (`{source}`)"
                if "minus" in target:
                    less = target["minus"]
                    other = _figure(_json(root, less["source"]), less["figure"], less["source"])
                    measured = f"{value:.4f} - {other:.4f} = {value - other:+.4f} (`{source}`)"
                    value -= other
                met = "yes" if _meets(value, target["op"], target["value"]) else "no"
        wanted = target.get("target") or f"{target['op']} {target['value']}"
        rows.append([target["model"], target["what"], wanted, measured, met])
    return _table(["model", "figure", "target", "measured", "met"], rows)


def _figure(found: Mapping[str, Any], path: str, source: str) -> float:
    """The figure at the dotted ``path`` of a metrics file (keys may hold ``/``)."""
    value: Any = found
    for key in path.split("."):
        if not isinstance(value, Mapping) or key not in value:
            raise RenderError(f"{source}: no figure {path}")
        value = value[key]
    return float(value)


def _meets(value: float, op: str, target: float) -> bool:
    return value >= target if op == "≥" else value <= target


def render_headline(root: Path) -> str:
    """The README's headline: the default over seeds (served and argmax, 4 and 2 classes),
    this release's run, and the int8 file's agreement."""
    stats = _json(root, SEEDS)["summary"]
    groups = _groups(root)
    images = stats.get("finetune.training_images")
    trained = (
        f" (trained on {images['mean']:.0f} images)"
        if images
        else " (val held out: the recipe before the production run)"
    )
    rows = []
    for key, what in _seed_figures(root):
        if key.startswith("test.") and key in stats and "ece" not in key:
            rows.append(
                [
                    f"{what}, mean of 3 training seeds{trained}",
                    f"**{spread_text(stats[key])}**",
                    f"`{SEEDS}`",
                ]
            )
    evaluation = _json(root, "metrics/evaluate.json")
    served, own = evaluation["test"], evaluation.get("argmax")
    seed = _seed(root)
    tuned = _json(root, "metrics/finetune.json")["finetune"]
    trained_on = (
        f", trained on {tuned['training_images']} images ({tuned['trained_on']})"
        if "training_images" in tuned
        else ""
    )
    run = f"{served['accuracy']:.4f} / {served['balanced_accuracy']:.4f}"
    if own:
        run += f" (argmax {own['accuracy']:.4f} / {own['balanced_accuracy']:.4f})"
    rows.append(
        [
            f"this release's run, seed {seed}{trained_on}: test accuracy / balanced accuracy, "
            "served "
            f"(objective {served.get('objective', 'not recorded')})",
            run,
            "`metrics/evaluate.json`",
        ]
    )
    if "groups" in evaluation:
        grouped = evaluation["groups"]
        rows.append(
            [
                f"this release's run: test 2-class accuracy ({groups}), served / argmax",
                f"{grouped['served']['accuracy']:.4f} / {grouped['argmax']['accuracy']:.4f}",
                "`metrics/evaluate.json`",
            ]
        )
    parity = _json(root, "metrics/export.json")
    agreement = [
        f"{parity[split]['tflite_int8']['top1_agreement']:.3f}"
        for split in ("parity", "parity_validation")
        if "tflite_int8" in parity.get(split, {})
    ]
    rows.append(
        [
            f"full-integer int8 TFLite agreement with the served model, seed {seed}: "
            "test / validation",
            " / ".join(agreement),
            "`metrics/export.json`",
        ]
    )
    return _table(["figure", "value", "from"], rows)


CROSSVAL = "metrics/crossval.json"
CROSSVAL_FIGURES = (
    ("oof.accuracy", "out-of-fold accuracy, argmax"),
    ("oof.balanced_accuracy", "out-of-fold balanced accuracy, argmax"),
    ("oof.groups.accuracy", "out-of-fold 2-class accuracy, argmax"),
    ("oof.fitted.accuracy", "out-of-fold accuracy, the objective's decision fitted on other folds"),
    ("oof.fitted.balanced_accuracy", "out-of-fold balanced accuracy, the same decision"),
    ("oof.if_balanced.accuracy", "out-of-fold accuracy, were the objective balanced accuracy"),
    ("oof.if_balanced.balanced_accuracy", "out-of-fold balanced accuracy, the same"),
    ("oof.temperature", "temperature fitted on the out-of-fold predictions"),
    ("finetune.val_accuracy", "fold runs: validation accuracy, argmax"),
    ("finetune.val_balanced_accuracy", "fold runs: validation balanced accuracy, argmax"),
    ("finetune.seconds", "fold runs: fine-tuning seconds, the machine of that run"),
)


def render_crossval(root: Path) -> str:
    """``imgpipe crossval``'s summary (metrics/crossval.json): the out-of-fold figures over
    every non-test image, mean ± sd over seeds, and the fold runs' figures over folds and
    seeds."""
    if not (root / CROSSVAL).is_file():
        return f"`{CROSSVAL}` is not there yet: no cross-validation of this release.\n"
    summary = _json(root, CROSSVAL)
    stats = {**summary["out_of_fold_summary"], **summary["summary"]}
    rows = [
        [what, spread_text(stats[key], 0 if key.endswith("seconds") else 3)]
        for key, what in CROSSVAL_FIGURES
        if key in stats
    ]
    overrides = ", ".join(f"`-S {o}`" for o in summary["overrides"]) or "none"
    return (
        f"`imgpipe crossval --folds {summary['folds']} --seeds "
        f"{' '.join(str(s) for s in summary['seeds'])}` (overrides: {overrides}; objective "
        f"{summary['objective']}; {summary['decision']['source']}; "
        f"`{CROSSVAL}`, MLflow parent run `{summary['parent_run']}`):\n\n"
        + _table(["figure", "mean ± sd"], rows)
    )


DECISIONS = "metrics/decisions.json"
DECISION_RULES = {
    "argmax": "the network's argmax (nothing fitted)",
    "prior": "one prior correction (what finetune serves)",
    "prior_by": "a prior correction per value of `{by}`",
    "offsets": "a logit offset per class",
    "cutpoints": "cut-points on the expected class (a regression read-out)",
}


def render_decisions(root: Path) -> str:
    """``imgpipe decisions``' summary (metrics/decisions.json): each decision rule's figures
    out-of-fold, mean ± sd over folds and seeds, and each class's recall."""
    if not (root / DECISIONS).is_file():
        return f"`{DECISIONS}` is not there yet: no decision rules compared.\n"
    summary = _json(root, DECISIONS)
    classes, order = summary["classes"], list(DECISION_RULES)
    rows = [
        [
            DECISION_RULES[rule].format(by=summary["by"]),
            f"**{spread_text(figures['objective'])}**",
            spread_text(figures["accuracy"]),
            *(f"{figures['recall'][c]['mean']:.3f}" for c in classes),
        ]
        for rule, figures in sorted(summary["rules"].items(), key=lambda r: order.index(r[0]))
    ]
    by = f" --by {summary['by']}" if summary["by"] else ""
    seeds = " ".join(str(s) for s in summary["seeds"])
    return (
        f"`imgpipe decisions {summary['predictions']} --objective {summary['objective']}{by}` "
        f"(`{DECISIONS}`; {summary['folds']} folds x seeds {seeds}, {summary['images']} "
        "images; each rule fitted on the other folds):\n\n"
        + _table(
            [
                "decision rule",
                f"{summary['objective']}, mean ± sd over folds",
                "accuracy",
                *(f"recall of {c}" for c in classes),
            ],
            rows,
        )
    )


DECISIONS_PER_EPOCH = "metrics/decisions_per_epoch.json"
CROSSVAL_PER_EPOCH = "metrics/crossval_per_epoch.json"


def render_per_epoch(root: Path) -> str:
    """Class-balanced sampling drawn per epoch against the default recipe, by cross-validation
    over the same folds (metrics/decisions_per_epoch.json against metrics/decisions.json): each
    rule's figure per recipe, mean ± sd over folds, and the per-epoch recipe's gain fold by fold
    (a difference within a fold, where both recipes saw the same images)."""
    if not (root / DECISIONS_PER_EPOCH).is_file():
        return f"`{DECISIONS_PER_EPOCH}` is not there yet: the recipe is not cross-validated.\n"
    base, drawn = _json(root, DECISIONS), _json(root, DECISIONS_PER_EPOCH)
    if (base["folds"], base["seeds"], base["objective"]) != (
        drawn["folds"],
        drawn["seeds"],
        drawn["objective"],
    ):
        raise ValueError(f"{DECISIONS_PER_EPOCH} and {DECISIONS}: other folds, seeds or objective")
    rows = []
    for rule in ("argmax", "prior"):
        for figure in (base["objective"], "accuracy"):
            gains = [
                b - a
                for seed in base["seeds"]
                for a, b in zip(
                    base["per_seed"][str(seed)][rule]["folds"][figure],
                    drawn["per_seed"][str(seed)][rule]["folds"][figure],
                    strict=True,
                )
            ]
            sd = statistics.stdev(gains) if len(gains) > 1 else 0.0
            rows.append(
                [
                    DECISION_RULES[rule],
                    figure,
                    spread_text(base["rules"][rule][figure]),
                    spread_text(drawn["rules"][rule][figure]),
                    f"{statistics.fmean(gains):+.3f} ± {sd:.3f}",
                    f"{sum(g > 0 for g in gains)} of {len(gains)}",
                ]
            )
    cv = _json(root, CROSSVAL_PER_EPOCH)
    seeds = " ".join(str(s) for s in cv["seeds"])
    command = " ".join(
        [
            f"imgpipe crossval --folds {cv['folds']} --seeds {seeds} --name {cv['recipe']}",
            *(f"-S {o}" for o in cv["overrides"]),
        ]
    )
    return (
        f"`{command}` (`{CROSSVAL_PER_EPOCH}`, MLflow parent run `{cv['parent_run']}`), then "
        f"`imgpipe decisions` on its out-of-fold predictions (`{DECISIONS_PER_EPOCH}`), against "
        f"the default recipe's (`{DECISIONS}`); {base['folds']} folds x seeds {seeds}, each rule "
        "fitted on the other folds:\n\n"
        + _table(
            [
                "decision rule",
                "figure",
                "default recipe",
                "per-epoch draw",
                "gain, mean ± sd over folds",
                "folds it gains",
            ],
            rows,
        )
    )


BLOCKS: dict[str, Callable[[Path], str]] = {
    "crossval": render_crossval,
    "decisions": render_decisions,
    "per_epoch": render_per_epoch,
    "fashion": render_fashion,
    "headline": render_headline,
    "seeds": render_seeds,
    "seeds_balanced": lambda root: render_seeds(root, SEEDS_BALANCED),
    "ensemble": render_ensemble,
    "release": render_release,
    "recipes": render_recipes,
    "published": render_published,
    "targets": render_targets,
}


def render_page(text: str, root: Path) -> str:
    """``text`` with every rendered block's content made anew from the files under ``root``."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(2)
        if name not in BLOCKS:
            raise RenderError(f"no renderer for block {name!r}; known: {sorted(BLOCKS)}")
        return f"{match.group(1)}{BLOCKS[name](root)}{match.group(4)}"

    return BLOCK.sub(replace, text)


def outside_blocks(text: str) -> str:
    """``text`` without its rendered blocks: the prose that may quote no figure."""
    return BLOCK.sub("", text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--check", action="store_true", help="exit 1 if a page is out of date")
    args = parser.parse_args(argv)
    stale = []
    for page in PAGES:
        path = args.root / page
        text = path.read_text()
        rendered = render_page(text, args.root)
        if rendered != text:
            stale.append(page)
            if not args.check:
                path.write_text(rendered)
    verb = "out of date" if args.check else "rendered"
    print(f"figures_doc: {verb}: {', '.join(stale) or 'none'}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
