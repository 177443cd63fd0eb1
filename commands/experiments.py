"""Recipes compared as DVC experiments: ``imgpipe seeds`` (``pipelines.seeds``), ``imgpipe
crossval`` (``pipelines.crossval``) with ``imgpipe decisions`` on its out-of-fold predictions,
and ``imgpipe growing-data`` (``pipelines.growing``); and ``imgpipe ensemble``
(``imgpipe.model.ensemble``), their models averaged in one, and ``imgpipe distill``
(``pipelines.distill``), an ensemble learnt by one student. Each command parses and prints; the
work is the library's."""

from __future__ import annotations

import argparse
from pathlib import Path

from commands.common import Subcommands, add_command, params_of


def cmd_seeds(args: argparse.Namespace) -> None:
    """Run the recipe over several training seeds (DVC experiments), record the parent MLflow
    run with each figure's mean, sd, min and max, and print them."""
    from pipelines import seeds

    summary = seeds.run_recipe(
        args.seeds,
        through=args.through,
        overrides=args.set or [],
        name=args.name,
        out=args.out,
        seed_keys=args.seed_keys or seeds.SEED_KEYS,
    )
    print(seeds.describe(summary))
    if args.out:
        print(f"summary: {args.out}; MLflow parent run {summary['parent_run']}")


def cmd_crossval(args: argparse.Namespace) -> None:
    """Cross-validate the recipe over the non-test images (DVC experiments through finetune),
    record the parent MLflow run and the out-of-fold predictions, and print the figures."""
    from pipelines import crossval, seeds

    if args.refit:
        summary = crossval.refit(args.refit, args.set or [], out=args.out, apply=args.apply)
    else:
        summary = crossval.run_crossval(
            args.folds,
            args.seeds,
            overrides=args.set or [],
            name=args.name,
            out=args.out,
            seed_keys=args.seed_keys or seeds.SEED_KEYS,
            apply=args.apply,
            resume=args.resume,
        )
    print(crossval.describe(summary))
    print(f"out-of-fold predictions: {summary['predictions']}")
    if args.out:
        print(f"summary: {args.out}; MLflow parent run {summary['parent_run']}")
    if summary["overrides"] and not args.apply:
        print(
            "a production run of this recipe on every non-test image, with this decision: "
            f"dvc exp run {crossval.decision_flag(summary)}"
        )
    if args.apply:
        print(
            "params.yaml: finetune.decision set; `dvc repro` now trains the served model on "
            "every non-test image with it (finetune.train_on)"
        )


def cmd_decisions(args: argparse.Namespace) -> None:
    """Compare decision rules for an objective on crossval's out-of-fold predictions, each
    fitted on all folds but one and scored on the fold left out."""
    from imgpipe.core.errors import InputError
    from imgpipe.core.params import FinetuneParams, section, with_sets
    from pipelines import crossval

    params = params_of(args)
    if args.objective is not None:
        params = with_sets(params, [f"finetune.objective={args.objective}"])
    tuning = section(FinetuneParams, "finetune", params)
    if tuning.balance is None:
        raise InputError(
            "decisions: the accuracy objective is the network's argmax, nothing to fit; pass "
            "--objective balanced_accuracy or a weight in (0, 1]"
        )
    summary = crossval.compare_decisions(
        args.predictions,
        tuning.objective,
        tuning.balance,
        by=args.by,
        manifest=args.manifest,
        out=args.out,
    )
    print(crossval.describe_decisions(summary))
    if args.out:
        print(f"summary: {args.out}")


def cmd_growing_data(args: argparse.Namespace) -> None:
    """The growing-data scenario through DVC or kfp.local; print its claims."""
    from imgpipe.core.params import with_sets
    from pipelines import growing

    report = growing.run(
        Path(args.source),
        Path(args.work),
        orchestrator=args.orchestrator,
        params=with_sets(params_of(args), args.set or []),
        new_fraction=args.new_fraction,
        corrupt_fraction=args.corrupt_fraction,
        seed=args.seed,
        out=args.out,
    )
    for version, record in report["versions"].items():
        print(f"{version}: {record['images']} images {record['splits']} in {record['seconds']} s")
    for claim in report["claims"]:
        print(f"- {claim}")


def cmd_ensemble(args: argparse.Namespace) -> None:
    """Average the members' probabilities in one model folder that evaluate and export take
    like finetune's."""
    from imgpipe.model.ensemble import write_ensemble
    from imgpipe.model.training import DECISION, MODEL

    out = Path(args.out)
    decision = write_ensemble([Path(m) for m in args.members], out)
    print(
        f"{out}: the mean of {len(args.members)} models' probabilities (objective "
        f"{decision['objective']}); evaluate it with `imgpipe evaluate --tuned {out / MODEL} "
        f"--decision {out / DECISION}`"
    )


def cmd_distill(args: argparse.Namespace) -> None:
    """Train one student on the teacher's probabilities, in a model folder that evaluate and
    export take like finetune's."""
    from imgpipe.core.params import with_sets
    from imgpipe.model.training import DECISION, MODEL
    from pipelines import distill

    out = Path(args.out)
    summary = distill.run(Path(args.teacher), out, with_sets(params_of(args), args.set or []))
    print(distill.describe(summary, out))
    print(
        f"evaluate it with `imgpipe evaluate --tuned {out / MODEL} --decision "
        f"{out / DECISION}`, export it with `imgpipe export --tuned {out / MODEL}`"
    )


def register(sub: Subcommands) -> None:
    p = add_command(
        sub,
        "seeds",
        cmd_seeds,
        "run a recipe over several training seeds: mean ± sd of its figures, in MLflow",
        params=False,
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2], metavar="N")
    p.add_argument(
        "--through",
        default="finetune",
        help="last stage each seed runs: finetune (validation only, for choosing a recipe) or "
        "evaluate (test figures too, for the final one)",
    )
    p.add_argument("-S", "--set", action="append", metavar="KEY=VALUE", help="as dvc exp run -S")
    p.add_argument("--name", help="the recipe's name (default: recipe-<time>)")
    p.add_argument("--out", type=Path, help="write the summary as JSON (e.g. metrics/seeds.json)")
    p.add_argument(
        "--seed-keys",
        nargs="+",
        metavar="SECTION.KEY",
        help="the params each seed sets (default: train.seed finetune.seed); finetune.seed "
        "alone keeps the frozen phase and varies only fine-tuning",
    )

    p = add_command(
        sub,
        "crossval",
        cmd_crossval,
        "compare a recipe by k-fold cross-validation over the non-test images: mean ± sd over "
        "folds and seeds, out-of-fold predictions, the decision fitted on them",
        params=False,
    )
    p.add_argument("--folds", type=int, default=5, metavar="K")
    p.add_argument("--seeds", type=int, nargs="+", default=[42], metavar="N")
    p.add_argument("-S", "--set", action="append", metavar="KEY=VALUE", help="as dvc exp run -S")
    p.add_argument("--name", default="crossval", help="the recipe's name (default: crossval)")
    p.add_argument(
        "--out", type=Path, help="write the summary as JSON (e.g. metrics/crossval.json)"
    )
    p.add_argument(
        "--seed-keys",
        nargs="+",
        metavar="SECTION.KEY",
        help="the params each seed sets (default: train.seed finetune.seed)",
    )
    p.add_argument(
        "--apply",
        action="store_true",
        help="set params.yaml's finetune.decision to the decision fitted out-of-fold, for the "
        "production run on every non-test image",
    )
    p.add_argument(
        "--refit",
        type=Path,
        metavar="SUMMARY",
        help="an earlier crossval's summary (e.g. metrics/crossval.json): fit the decision of "
        "another objective (-S finetune.objective=...) on its out-of-fold predictions, "
        "without a fold run",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="after an interrupted crossval of this --name: keep the fold runs it finished "
        "(the same params, their predictions kept), run the others",
    )

    p = add_command(
        sub,
        "decisions",
        cmd_decisions,
        "compare decision rules (prior correction, per metadata value, per-class offsets, "
        "cut-points on the expected class) for an objective on crossval's out-of-fold "
        "predictions, each scored on the fold it was not fitted on",
    )
    p.add_argument("predictions", type=Path, help="imgpipe crossval's oof_predictions.csv")
    p.add_argument(
        "--objective",
        help="accuracy's trade for the rare classes: balanced_accuracy or a weight in (0, 1] "
        "(default: params.yaml's finetune.objective)",
    )
    p.add_argument(
        "--by", metavar="COLUMN", help="a manifest metadata column: one correction per value"
    )
    p.add_argument(
        "--manifest",
        type=Path,
        default=Path("outputs/ingest/manifest.csv"),
        help="ingest's manifest, for --by (default: outputs/ingest/manifest.csv)",
    )
    p.add_argument(
        "--out", type=Path, help="write the summary as JSON (e.g. metrics/decisions.json)"
    )

    p = add_command(
        sub,
        "growing-data",
        cmd_growing_data,
        "run the pipeline on three versions of a data set (v1; v2 = v1 + new images; v3 = v2 "
        "with a class partly relabelled) and check what the split and the gate do",
    )
    p.add_argument("source", help="a folder of class folders (e.g. data)")
    p.add_argument("work", help="a new folder for the versions, the runs and their registry")
    p.add_argument("--orchestrator", choices=["dvc", "kfp"], default="dvc")
    p.add_argument("--profile", help="profiles/<name>.yaml overrides, e.g. quick")
    p.add_argument("-S", "--set", action="append", metavar="KEY=VALUE", help="as dvc exp run -S")
    p.add_argument("--new-fraction", type=float, default=0.1, help="v2's new images, of v1's")
    p.add_argument(
        "--corrupt-fraction", type=float, default=0.25, help="of the largest class, in v3"
    )
    p.add_argument("--seed", type=int, default=0, help="draws the new and relabelled images")
    p.add_argument("--out", type=Path, help="write the report as JSON")

    p = add_command(
        sub,
        "ensemble",
        cmd_ensemble,
        "average several fine-tuned models (seeds, folds) in one model folder (model.keras and "
        "decision.json), served and evaluated like one",
        params=False,
    )
    p.add_argument("members", nargs="+", help="model.keras files (each with its decision.json)")
    p.add_argument("--out", required=True, help="the new folder, e.g. outputs/ensemble")

    p = add_command(
        sub,
        "distill",
        cmd_distill,
        "train one student model on a teacher's (an ensemble's) probabilities of every view of "
        "every non-test image, with finetune's recipe and quantization-aware epochs",
    )
    p.add_argument("teacher", help="a model folder with model.keras, e.g. outputs/ensemble")
    p.add_argument("--out", required=True, help="the new folder, e.g. outputs/student")
    p.add_argument("-S", "--set", action="append", metavar="KEY=VALUE", help="as dvc exp run -S")
