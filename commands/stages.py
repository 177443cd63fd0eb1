"""``imgpipe <stage>``: every declared stage (``pipelines.stages``) on the paths given, DVC's
paths by default, so ``imgpipe ingest`` alone does what ``dvc repro ingest`` does; and
``imgpipe profile``, a profile as ``dvc exp run`` flags."""

from __future__ import annotations

import argparse
from pathlib import Path

from commands.common import Subcommands, add_command, params_of


def cmd_stage(args: argparse.Namespace) -> None:
    from imgpipe.model.distribute import is_chief
    from pipelines import runner
    from pipelines.stages import STAGES

    stage = STAGES[args.command]
    if stage.name == "finetune":  # a TrainJob pod: TensorFlow's cluster from JobSet's env
        from imgpipe.model.trainjob import set_tf_config

        set_tf_config()
    params = params_of(args)
    paths = runner.default_paths(stage, params)
    paths.update({n: Path(v) for n in paths if (v := getattr(args, n, None)) is not None})
    # A non-chief worker of a multi-worker job trains beside the chief, which alone writes.
    if not is_chief():
        summary = runner.execute_as_worker(stage, paths, params)
    else:
        summary = runner.execute(stage, paths, params, whole_run=not args.stage_log)
    print(runner.describe(stage, summary))


def cmd_profile(args: argparse.Namespace) -> None:
    """The profile as ``dvc exp run`` flags: ``dvc exp run -n full $(imgpipe profile full)``."""
    from imgpipe.core.params import load_params, set_flags, with_profile

    with_profile(load_params(args.params), args.name)  # every override checked first
    print(" ".join(set_flags(args.name)))


def register(sub: Subcommands) -> None:
    from pipelines.stages import STAGES

    for stage in STAGES.values():
        p = add_command(sub, stage.name, cmd_stage, stage.help)
        for name in stage.inputs:
            p.add_argument(
                f"--{name.replace('_', '-')}",
                metavar="PATH",
                help=f"input (default: {stage.input_path(name)})",
            )
        for name, output in stage.outputs.items():
            p.add_argument(
                f"--{name.replace('_', '-')}",
                metavar="PATH",
                help=f"output (default: {output.path})",
            )
        p.add_argument(
            "--stage-log",
            action="store_true",
            help="log only this stage's params and figures, as a pipeline step into a store of "
            "its own (a Kubeflow Trainer pod); by default the run speaks for the whole pipeline",
        )

    p = add_command(
        sub, "profile", cmd_profile, "print a profile's overrides as `dvc exp run -S` flags"
    )
    p.add_argument("name", help="profiles/<name>.yaml, e.g. full, or a path")
