"""A recipe over several training seeds: one DVC experiment (and so one MLflow run) per seed,
then a parent MLflow run with the mean, sd, min and max of the headline figures, the seed
runs nested under it in the UI, and a JSON summary (``metrics/seeds.json`` for the default).

One run's figure on a small data set moves by several points with the seed alone, so a recipe
is compared with another by its mean and spread, not by one run (``imgpipe runs``).

>>> seeds.run_recipe([1, 2, 42], through="finetune", overrides=["finetune.epochs=16"])
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from imgpipe.core.errors import InputError
from imgpipe.core.fileio import write_json_atomic
from pipelines.stages import STAGES

SEED_KEYS = ("train.seed", "finetune.seed")
"""The training seeds a recipe is repeated over (the head's initialisation and dropout, the
fine-tuning order and views); the data's split and augment's materialised views stay put."""
PARENT_TAG = "imgpipe.seeds"
"""Set on a parent run: the number of seeds it summarises."""
RECIPE_TAG = "imgpipe.recipe"
EXPERIMENTS_REF = "refs/exps"
"""Where DVC keeps its experiments in git: ``<ref>/<baseline[:2]>/<baseline[2:]>/<name>``."""
FOLDS_TAG = "imgpipe.folds"
"""Set on a cross-validation's parent run (``imgpipe crossval``): the number of folds; its
spread is over folds and seeds, not seeds alone."""
VALIDATION = (
    "finetune.val_accuracy",
    "finetune.val_balanced_accuracy",
    "finetune.corrected_val_accuracy",
    "finetune.corrected_val_balanced_accuracy",
    "finetune.val_ece",
    "finetune.float_val_accuracy",
)
"""The validation figures summarised, from metrics/finetune.json (``corrected_``: with the
decision fitted on validation, what is served; ``float_``: a quantization-aware run's float
model before its quantized epochs); when the seed runs reached evaluate, the test split's
accuracy, balanced accuracy, ECE and per-class recall too (of the served decision; the
network's own, ``test.argmax.*``; the class groups', ``test.groups.*``), and when they
reached export, the TFLite models' agreement with the SavedModel on validation (validation
figures choose recipes, test figures only report the final one)."""


def spread(values: Sequence[float]) -> dict[str, float]:
    """mean, sample sd (0 for one value), min and max, rounded to 4 places.

    >>> spread([0.8, 0.82, 0.84])
    {'mean': 0.82, 'sd': 0.02, 'min': 0.8, 'max': 0.84}
    """
    values = [float(v) for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {
        "mean": round(statistics.fmean(values), 4),
        "sd": round(sd, 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def within_spread(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    """Whether two recipes' means differ by less than the larger of their seed sds: a gap the
    seeds alone could make."""
    return abs(a["mean"] - b["mean"]) < max(a["sd"], b["sd"])


def headline(metrics_dir: Path, with_test: bool, with_export: bool = False) -> dict[str, float]:
    """The headline figures of the run whose outputs are in ``metrics_dir``; the test split's
    only ``with_test`` (the run reached evaluate: else its evaluate.json is an older run's),
    export's only ``with_export``."""
    figures: dict[str, float] = {}
    tuned = _read(metrics_dir / "finetune.json").get("finetune", {})
    for key in VALIDATION:
        name = key.removeprefix("finetune.")
        if name in tuned:
            figures[key] = float(tuned[name])
    for key in ("seconds", "training_images"):  # what a run costs and what it trained on
        if key in tuned:
            figures[f"finetune.{key}"] = float(tuned[key])
    if with_test:
        figures.update(evaluation_figures(_read(metrics_dir / "evaluate.json")))
    exported = _read(metrics_dir / "export.json") if with_export else {}
    for kind, row in exported.get("parity_validation", {}).items():
        if isinstance(row, dict) and "top1_agreement" in row:
            figures[f"export.val_agreement.{kind}"] = float(row["top1_agreement"])
    return figures


def evaluation_figures(evaluation: Mapping[str, Any]) -> dict[str, float]:
    """The test split's figures of one evaluate summary (metrics/evaluate.json), under the
    names a recipe's summary gives them: ``test.*`` (the served decision: accuracy, balanced
    accuracy, ECE, per-class recall), ``test.argmax.*`` (the network's own) and the class
    groups' (``test.groups.*``, ``test.argmax.groups.*``)."""
    figures: dict[str, float] = {}
    test = evaluation.get("test", {})
    for key in ("accuracy", "balanced_accuracy", "ece"):
        if key in test:
            figures[f"test.{key}"] = float(test[key])
    for label, row in test.get("per_class", {}).items():
        figures[f"test.recall.{label}"] = float(row["recall"])
    own = evaluation.get("argmax", {})
    for key in ("accuracy", "balanced_accuracy"):
        if key in own:
            figures[f"test.argmax.{key}"] = float(own[key])
    for decided, grouped in evaluation.get("groups", {}).items():
        prefix = "test.groups" if decided == "served" else f"test.{decided}.groups"
        for key in ("accuracy", "balanced_accuracy"):
            figures[f"{prefix}.{key}"] = float(grouped[key])
    return figures


def summarise(per_seed: Mapping[Any, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Each figure every seed (or fold run) reported: its spread over them."""
    keys = set.intersection(*(set(f) for f in per_seed.values())) if per_seed else set()
    return {key: spread([f[key] for f in per_seed.values()]) for key in sorted(keys)}


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _current(params: Mapping[str, Any], key: str) -> Any:
    section, name = key.split(".", 1)
    return params[section][name]


@contextlib.contextmanager
def workspace_kept(root: Path, what: str) -> Iterator[None]:
    """The workspace as it was, put back afterwards: params.yaml, dvc.lock and the metrics files
    byte for byte (DVC's -S leaves the last run's), the persisted folders (fine-tuning's
    checkpoints, which DVC does not cache) from a copy, and the other outputs checked out of
    DVC's cache as dvc.lock names them, so that ``dvc status`` is as clean as before."""
    persisted = [
        root / out.path for stage in STAGES.values() for out in stage.outputs.values()
        if out.dvc == "persist" and (root / out.path).is_dir()
    ]  # fmt: skip
    kept = {
        path: path.read_bytes()
        for path in [root / "params.yaml", root / "dvc.lock", *(root / "metrics").glob("*")]
        if path.is_file()
    }
    with tempfile.TemporaryDirectory(prefix="imgpipe-kept-") as copies:
        for index, folder in enumerate(persisted):
            shutil.copytree(folder, Path(copies) / str(index), symlinks=True)
        try:
            yield
        finally:
            for path, content in kept.items():
                path.write_bytes(content)
            for index, folder in enumerate(persisted):
                shutil.rmtree(folder, ignore_errors=True)
                shutil.copytree(Path(copies) / str(index), folder, symlinks=True)
            restored = subprocess.run(
                ["dvc", "checkout", "--force", "-q"],
                cwd=root,
                capture_output=True,
                text=True,
                env={**os.environ, "DVC_NO_ANALYTICS": "1"},
            )
            if restored.returncode != 0:
                print(f"{what}: dvc checkout could not restore the outputs: {restored.stderr}")


def run_experiments(
    variants: Sequence[tuple[str, Sequence[str]]],
    *,
    through: str,
    root: Path,
    after: Callable[[str], Mapping[str, float]],
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Run each ``(name, overrides)`` of ``variants`` as the DVC experiment ``name`` (``dvc exp
    run <through> --name <name> -S ...``), one after another in the workspace; after each, call
    ``after(name)`` for its figures (it reads the workspace's outputs, which the next run
    replaces). Returns the figures and the MLflow run of each experiment. params.yaml keeps its
    text (DVC's -S rewrites it without comments). An experiment of the same name on this commit
    (an earlier run of this recipe) is removed first: DVC refuses to run over it, and forcing
    the run would also rerun the stages it reuses. Those of other commits stay."""
    import mlflow
    import yaml

    from imgpipe.tracking.runs import tracking_uri

    original = (root / "params.yaml").read_text()
    params = yaml.safe_load(original)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    if through not in STAGES:
        raise InputError(f"--through must be a stage, one of {list(STAGES)}; got {through!r}")
    mlflow.set_tracking_uri(tracking_uri(root))
    figures: dict[str, dict[str, float]] = {}
    runs: dict[str, str] = {}
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()
    for experiment, overrides in variants:
        ref = experiment_ref(head, experiment)
        if (
            subprocess.run(["git", "show-ref", "--verify", "--quiet", ref], cwd=root).returncode
            == 0
        ):
            subprocess.run(["git", "update-ref", "-d", ref], cwd=root, check=True)
            print(f"replacing the earlier experiment {experiment} of this commit", flush=True)
        command = ["dvc", "exp", "run", through, "--name", experiment]
        for override in overrides:
            command += ["-S", override]
        print(f"{' '.join(command)}", flush=True)
        done = subprocess.run(command, cwd=root, env=env)
        if done.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(command)}` failed (exit {done.returncode}); "
                f"the runs before it are in `dvc exp show`"
            )
        figures[experiment] = dict(after(experiment))
        if yaml.safe_load((root / "params.yaml").read_text()) == params:
            (root / "params.yaml").write_text(original)  # DVC's -S rewrote it: keep its comments
        if (run := experiment_run(experiment)) is not None:
            runs[experiment] = run
    return figures, runs


def experiment_ref(baseline: str, name: str) -> str:
    """The git ref DVC keeps the experiment ``name`` of the commit ``baseline`` as."""
    return f"{EXPERIMENTS_REF}/{baseline[:2]}/{baseline[2:]}/{name}"


def newest_experiment_refs(root: Path) -> dict[str, str]:
    """Each DVC experiment name's newest ref in the repo at ``root``, over every baseline."""
    listing = subprocess.run(
        ["git", "for-each-ref", "--sort=-committerdate", "--format=%(refname)", EXPERIMENTS_REF],
        cwd=root,
        capture_output=True,
        text=True,
    ).stdout
    newest: dict[str, str] = {}
    for ref in listing.split():
        newest.setdefault(ref.rsplit("/", 1)[-1], ref)
    return newest


def experiment_run(experiment: str) -> str | None:
    """The newest MLflow run of the DVC experiment ``experiment`` (its stages' tag), if any."""
    import mlflow

    from imgpipe.tracking.runs import EXPERIMENT_TAG

    found = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`{EXPERIMENT_TAG}` = '{experiment}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return found[0].info.run_id if found else None


def run_recipe(
    seeds: Sequence[int],
    *,
    through: str,
    overrides: Sequence[str] = (),
    name: str | None = None,
    root: Path | None = None,
    out: Path | None = None,
    seed_keys: Sequence[str] = SEED_KEYS,
) -> dict[str, Any]:
    """Run the recipe (params.yaml with ``overrides``, ``key=value`` as ``dvc exp run -S``
    takes them) once per seed, up to stage ``through``, each a DVC experiment named
    ``<name>-seed<N>``; then record the parent MLflow run and write ``out``. A seed equal to
    params.yaml's runs last, so that afterwards the workspace holds that run's outputs (the
    others stay in DVC's experiments: ``dvc exp show``); with ``overrides``, the workspace is
    put back as it was instead (:func:`workspace_kept`)."""
    import mlflow
    import yaml

    from imgpipe.tracking.runs import ensure_experiment

    root = (root or Path.cwd()).resolve()
    params = yaml.safe_load((root / "params.yaml").read_text())
    name = name or "recipe-" + time.strftime("%m%d-%H%M%S")
    default = {_current(params, key) for key in seed_keys}
    ordered = sorted(seeds, key=lambda s: (s in default, seeds.index(s)))
    order = list(STAGES)
    if through not in order[order.index("finetune") :]:
        # a recipe's figures are finetune's (and evaluate's, export's): through an earlier
        # stage, metrics/finetune.json would be an older run's, the same for every seed
        raise InputError(
            f"seeds: --through must be finetune or a later stage, one of "
            f"{order[order.index('finetune') :]}; got {through!r}"
        )
    reaches_evaluate = order.index(through) >= order.index("evaluate")
    reaches_export = order.index(through) >= order.index("export")
    experiment = {seed: f"{name}-seed{seed}" for seed in ordered}
    variants = [
        (experiment[seed], [*overrides, *(f"{key}={seed}" for key in seed_keys)])
        for seed in ordered
    ]
    # params.yaml's own recipe leaves its last run (params.yaml's seed) in the workspace;
    # another recipe (overrides) leaves the workspace as it was
    with workspace_kept(root, "seeds") if overrides else contextlib.nullcontext():
        figures, runs = run_experiments(
            variants,
            through=through,
            root=root,
            after=lambda _: headline(
                root / "metrics", with_test=reaches_evaluate, with_export=reaches_export
            ),
        )
    per_seed = {seed: figures[experiment[seed]] for seed in ordered}
    summary = {
        "recipe": name,
        "overrides": list(overrides),
        "through": through,
        "seed_keys": list(seed_keys),
        "seeds": list(ordered),
        "per_seed": {str(seed): per_seed[seed] for seed in ordered},
        "summary": summarise(per_seed),
        "mlflow_runs": {
            str(seed): runs[experiment[seed]] for seed in ordered if experiment[seed] in runs
        },
    }
    summary["parent_run"] = log_parent(summary, ensure_experiment(mlflow, root))
    if out is not None:
        write_json_atomic(out, summary)
    return summary


def log_parent(summary: Mapping[str, Any], experiment_id: str, label: str | None = None) -> str:
    """The parent MLflow run of a recipe's seed runs: its params (recipe, seeds, overrides),
    ``<figure>.mean/.sd/.min/.max`` metrics, and ``mlflow.parentRunId`` on every seed run so
    the UI nests them; ``label`` names what it spans (default: ``N seeds``). Returns its id."""
    import mlflow

    client = mlflow.MlflowClient()
    parent = client.create_run(
        experiment_id,
        run_name=f"{summary['recipe']} x {label or str(len(summary['seeds'])) + ' seeds'}",
        tags={PARENT_TAG: str(len(summary["seeds"])), RECIPE_TAG: summary["recipe"]},
    )
    run_id = parent.info.run_id
    client.log_param(run_id, "seeds", " ".join(str(s) for s in summary["seeds"]))
    client.log_param(run_id, "overrides", "; ".join(summary["overrides"]) or "none")
    client.log_param(run_id, "through", summary["through"])
    for key, stats in summary["summary"].items():
        for stat, value in stats.items():
            client.log_metric(run_id, f"{key}.{stat}", value)
    for child in summary["mlflow_runs"].values():
        client.set_tag(child, "mlflow.parentRunId", run_id)
        client.set_tag(child, RECIPE_TAG, summary["recipe"])
    client.set_terminated(run_id)
    return str(run_id)


def describe(summary: Mapping[str, Any]) -> str:
    """One line per headline figure: ``finetune.val_accuracy 0.8123 ± 0.0101 (min .. max)``."""
    lines = [f"{summary['recipe']}: {len(summary['seeds'])} seeds {summary['seeds']}"]
    for key, stats in summary["summary"].items():
        lines.append(
            f"  {key:34s} {stats['mean']:.4f} ± {stats['sd']:.4f} "
            f"({stats['min']:.4f} .. {stats['max']:.4f})"
        )
    return "\n".join(lines)


def recipe_table(parents: Sequence[Any], over: str = "seeds") -> str:
    """Parent runs (MLflow ``Run`` objects) as a markdown table of validation figures, mean ±
    sd over their seeds (or ``over`` what else they span), each compared with the first: a gap
    smaller than the larger sd is within the spread, which one run cannot tell from noise."""
    figures = ("finetune.val_accuracy", "finetune.val_balanced_accuracy")

    def stats(run: Any, key: str) -> dict[str, float] | None:
        metrics = run.data.metrics
        if f"{key}.mean" not in metrics:
            return None
        return {"mean": metrics[f"{key}.mean"], "sd": metrics.get(f"{key}.sd", 0.0)}

    lines = [
        "",
        f"| recipe (mean ± sd over {over}) | seeds | val accuracy | val balanced accuracy | "
        "vs the first recipe |",
        "|---|---|---|---|---|",
    ]
    first = parents[0]
    for run in parents:
        cells = []
        for key in figures:
            value = stats(run, key)
            cells.append(f"{value['mean']:.4f} ± {value['sd']:.4f}" if value else "")
        verdicts = []
        for key in figures:
            a, b = stats(first, key), stats(run, key)
            if run is first or a is None or b is None:
                continue
            gap = b["mean"] - a["mean"]
            where = "within" if within_spread(a, b) else "beyond"
            verdicts.append(f"{key.split('.')[-1]} {gap:+.4f} ({where} the spread)")
        lines.append(
            f"| {run.data.tags.get(RECIPE_TAG, run.info.run_name)} | "
            f"{run.data.params.get('seeds', '')} | {cells[0]} | {cells[1]} | "
            f"{'; '.join(verdicts) or '-'} |"
        )
    return "\n".join(lines)
