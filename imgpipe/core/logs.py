"""What a stage prints, on a terminal and in a log file (DVC's output, a Kubeflow pod's log)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

LOG_INTERVAL_SECONDS = 30
"""In a log file, a progress bar writes a line at most this often, not one per batch."""


def _gpu_driver() -> bool:
    """Whether an NVIDIA kernel driver is loaded (what CUDA's cuInit needs)."""
    return Path("/proc/driver/nvidia/version").exists() or sys.platform != "linux"


def quiet_for_logs() -> None:
    """Set before TensorFlow or a progress bar starts: progress bars stay live on a terminal
    and write a line every ``LOG_INTERVAL_SECONDS`` into a log file (tqdm's ``TQDM_*``
    defaults); TensorFlow's C++ logs keep warnings and errors, except on a Linux machine with
    no NVIDIA driver, where its only error is the failed CUDA probe, so errors go too (Python
    exceptions are not logs: they still surface). A value already in the environment wins."""
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", str(LOG_INTERVAL_SECONDS))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if _gpu_driver() else "3")
