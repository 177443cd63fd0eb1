"""What the ``imgpipe`` subcommands share: params.yaml as the command line names it."""

from __future__ import annotations

import argparse

LOCAL_PIPELINE_ROOT = "outputs/kfp"
"""kfp.local's artifacts (``pipeline run-local``, ``monitor --retrain kfp-local``)."""
LOCAL_SHARED = "outputs/kfp-shared"
"""The folder standing in for the shared claim under kfp.local: serving versions (models/),
feature cache, checkpoints, kept across runs."""


def params_of(args: argparse.Namespace) -> dict:
    """params.yaml (``--params``), with ``--profile``'s overrides when one is given."""
    from imgpipe.core.params import load_params, with_profile

    params = load_params(args.params)
    return with_profile(params, args.profile) if getattr(args, "profile", None) else params
