"""``imgpipe sample-data`` and ``imgpipe fashion-mnist-data``: offline data sets as class folders
(``imgpipe.data.sample_data``, ``imgpipe.data.fashion_mnist_data``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from commands.common import Subcommands, add_command


def cmd_sample_data(args: argparse.Namespace) -> None:
    from imgpipe.data import sample_data

    sample_data.run(Path(args.target), force=args.force)


def cmd_fashion_mnist_data(args: argparse.Namespace) -> None:
    from imgpipe.data import fashion_mnist_data

    given: dict[str, Any] = {}  # options left out keep fashion_mnist_data.run's defaults
    if args.source is not None:
        given["source"] = Path(args.source)
    if args.sets is not None:
        given["sets"] = args.sets.split(",")
    fashion_mnist_data.run(Path(args.target), per_class=args.per_class, force=args.force, **given)


def register(sub: Subcommands) -> None:
    p = add_command(
        sub,
        "sample-data",
        cmd_sample_data,
        "write the offline ELPV sample data as class folders",
        params=False,
    )
    p.add_argument("target", nargs="?", default="data")
    p.add_argument("--force", action="store_true", help="replace a folder that holds other data")

    p = add_command(
        sub,
        "fashion-mnist-data",
        cmd_fashion_mnist_data,
        "write Fashion-MNIST (Debian dataset-fashion-mnist) as class folders of PNG files",
        params=False,
    )
    p.add_argument("target", nargs="?", default="data")
    p.add_argument(
        "--source",
        help="folder of the four idx files (default: where the Debian package puts them)",
    )
    p.add_argument(
        "--sets",
        help="t10k (10,000 images, the default), train (60,000) or train,t10k (kept as "
        "train/ and test/)",
    )
    p.add_argument(
        "--per-class", type=int, help="the first N images of each class of each set (default: all)"
    )
    p.add_argument("--force", action="store_true", help="replace an existing folder")
