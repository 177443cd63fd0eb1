"""Ingest scaling: images/s with 1 and 2 worker processes on the same folder, and peak resident
memory at a small and a large folder (it must not grow with the number of images: the large
one's peak within 1.5x of the small one's).

    python -m bench.ingest_scale --images 50000 --small 5000

Generates, once, a folder of small PNGs (48x48, four class folders) under ``--cache``
(``bench/data/``, not in git); the small folder holds the first ``--small`` images of each
class as hard links to the large one's files (the same files, no more disk). Each ingest runs
in a fresh process (``--child``), which reports its own wall time and the peak RSS of itself
and of its largest child process (``getrusage``: the workers, and any helper TensorFlow forks
at import, which counts the parent's pages). Writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.machine import describe

CLASSES = ("circle", "square", "stripes", "noise")
SIDE = 48  # above validate's min_side of 32
MEMORY_BOUND = 1.5


def _image(label: int, rng: np.random.Generator) -> np.ndarray:
    """One distinct 48x48 RGB image: a class pattern under per-image noise."""
    y, x = np.mgrid[:SIDE, :SIDE]
    pattern = [
        (x - 24) ** 2 + (y - 24) ** 2 < 200,
        (abs(x - 24) < 14) & (abs(y - 24) < 14),
        (x // 6) % 2 == 0,
        rng.random((SIDE, SIDE)) < 0.5,
    ][label]
    base = np.where(pattern[..., None], 200, 50).astype(np.int16)
    noise = rng.integers(-30, 31, (SIDE, SIDE, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def generate(root: Path, images: int) -> float:
    """``images`` PNGs under ``root/<class>/`` (skipped when already there); the seconds spent."""
    from PIL import Image

    done = root / ".complete"
    if done.is_file() and done.read_text() == str(images):
        return 0.0
    started = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        label = i % len(CLASSES)
        path = root / CLASSES[label] / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_image(label, rng)).save(path, compress_level=1)
    done.write_text(str(images))
    return time.perf_counter() - started


def subset(large: Path, small: Path, images: int) -> None:
    """``small``: the first ``images`` of ``large`` (by name, spread over the classes), as
    hard links to the same files (a symlink leaving the source would be quarantined)."""
    done = small / ".complete"
    if done.is_file() and done.read_text() == str(images):
        return
    shutil.rmtree(small, ignore_errors=True)
    per_class = images // len(CLASSES)
    for label in CLASSES:
        (small / label).mkdir(parents=True)
        for name in sorted(os.listdir(large / label))[:per_class]:
            os.link(large / label / name, small / label / name)
    done.write_text(str(images))


def child(source: Path, out: Path, workers: int) -> None:
    """One ingest of ``source`` with ``workers`` processes, in this fresh process; prints its
    figures as JSON."""
    from components import ingest
    from imgpipe.core.params import DataParams, IngestParams, ValidateParams, load_params, section

    params = load_params("params.yaml")
    params["ingest"]["workers"] = workers
    started = time.perf_counter()
    summary = ingest.run(
        source=source,
        out=out / "ingest",
        summary=out / "ingest.json",
        data=section(DataParams, "data", {"data": {"source": str(source), "metadata_csv": None}}),
        ingest=section(IngestParams, "ingest", params),
        validate=section(ValidateParams, "validate", params),
        progress=False,
    )
    seconds = time.perf_counter() - started
    kib = 1024  # ru_maxrss is in KiB on Linux
    print(
        json.dumps(
            {
                "images": summary["images"],
                "quarantined": summary["quarantined"],
                "seconds": round(seconds, 2),
                "images_per_second": round(summary["images"] / seconds, 1),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib, 1),
                "children_peak_rss_mb": round(
                    resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib, 1
                ),
            }
        )
    )


def measure(source: Path, workers: int, scratch: Path) -> dict[str, Any]:
    """One ingest in a fresh process; its figures."""
    shutil.rmtree(scratch, ignore_errors=True)
    result = subprocess.run(
        [sys.executable, "-m", "bench.ingest_scale", "--child", str(source), "--workers",
         str(workers), "--scratch", str(scratch)],
        capture_output=True,
        text=True,
    )  # fmt: skip
    shutil.rmtree(scratch, ignore_errors=True)
    if result.returncode:
        raise SystemExit(f"ingest of {source} failed:\n{result.stdout}{result.stderr[-3000:]}")
    figures: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"{source.name}, {workers} worker(s): {figures}", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--small", type=int, default=5_000)
    parser.add_argument("--cache", type=Path, default=Path("bench/data"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/ingest_scale.json"))
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.scratch, args.workers)
        return

    large, small = args.cache / f"images_{args.images}", args.cache / f"images_{args.small}"
    generation = generate(large, args.images)
    subset(large, small, args.small)
    scratch = args.cache / "scratch"
    # small and large at 2 workers side by side for memory, then 1 worker on the large one
    runs = {
        "small_2_workers": measure(small, 2, scratch),
        "large_2_workers": measure(large, 2, scratch),
        "large_1_worker": measure(large, 1, scratch),
    }
    one, two = runs["large_1_worker"], runs["large_2_workers"]
    peak_small = max(
        runs["small_2_workers"]["peak_rss_mb"], runs["small_2_workers"]["children_peak_rss_mb"]
    )
    peak_large = max(two["peak_rss_mb"], two["children_peak_rss_mb"])
    ratio = peak_large / peak_small
    report = {
        "benchmark": "ingest_scale",
        "machine": describe(),
        "images": args.images,
        "small_images": args.small,
        "image_side": SIDE,
        "generation_seconds": round(generation, 1),
        "runs": runs,
        "images_per_second": {"1": one["images_per_second"], "2": two["images_per_second"]},
        "speedup_2_over_1_worker": round(two["images_per_second"] / one["images_per_second"], 2),
        "peak_rss_mb": {"small": peak_small, "large": peak_large},
        "peak_rss_large_over_small": round(ratio, 2),
        "memory_bound": MEMORY_BOUND,
        "memory_flat": ratio <= MEMORY_BOUND,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if not report["memory_flat"]:
        raise SystemExit(
            f"peak RSS at {args.images} images is {ratio:.2f}x that at {args.small}, "
            f"above the {MEMORY_BOUND}x bound"
        )


if __name__ == "__main__":
    main()
