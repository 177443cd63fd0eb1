"""What the ``imgpipe`` subcommands share: params.yaml as the command line names it."""

from __future__ import annotations

import argparse


def params_of(args: argparse.Namespace) -> dict:
    """params.yaml (``--params``), with ``--profile``'s overrides when one is given."""
    from imgpipe.params import load_params, with_profile

    params = load_params(args.params)
    return with_profile(params, args.profile) if getattr(args, "profile", None) else params
