"""What the ``imgpipe`` commands share: how one registers, and params.yaml as the command line
names it."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

Command = Callable[[argparse.Namespace], None]
Subcommands = Any
"""argparse's subparsers action (``ArgumentParser.add_subparsers()``), which has no public type."""


def add_command(
    sub: Subcommands, name: str, func: Command, help: str, *, params: bool = True
) -> argparse.ArgumentParser:
    """Register ``imgpipe <name>``, run by ``func``; with ``params``, it takes ``--params``."""
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
    parser.set_defaults(func=func)
    if params:
        parser.add_argument("--params", default="params.yaml", help="the pipeline's parameters")
    return parser


def params_of(args: argparse.Namespace) -> dict:
    """params.yaml (``--params``), with ``--profile``'s overrides when one is given."""
    from imgpipe.core.params import load_params, with_profile

    params = load_params(args.params)
    return with_profile(params, args.profile) if getattr(args, "profile", None) else params
