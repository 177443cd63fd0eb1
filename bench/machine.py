"""What every benchmark figure names: the machine it was measured on."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe() -> dict[str, object]:
    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": model,
        "cores": cores,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def require(path: Path) -> Path:
    """``path``, or exit with what to run first when the pipeline has not made it yet."""
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `make demo` first (benchmarks use its outputs)")
    return path
