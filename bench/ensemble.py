"""An ensemble against one model and against its distilled student: single-image latency of
the exported SavedModel in-process and of the full-integer int8 TFLite file, the default model's
export beside the ensemble's and the student's, measured side by side in one run on one image
(rounds interleaved, medians).

    imgpipe ensemble .../model.keras ... --out outputs/ensemble    # then export it:
    imgpipe export --tuned outputs/ensemble/model.keras --evaluation metrics/ensemble.json \\
      --out outputs/ensemble/export --summary metrics/ensemble_export.json
    imgpipe distill outputs/ensemble --out outputs/student         # and export it the same way
    python -m bench.ensemble --requests 100 --repeats 3

Needs ``outputs/export`` from ``make demo`` and an exported ensemble (``--ensemble``); the
student (``--student``) is measured when its export is there. Writes JSON (``--out``) and
prints it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.machine import describe, require
from bench.serving import in_process, median_of, sample_image, tflite

PROJECT = Path(__file__).resolve().parents[1]


def _files(export: Path, model_name: str) -> dict[str, Path]:
    from imgpipe.export.savedmodel import TFLITE, TFLITE_FILES, saved_model_dir

    return {
        "saved_model": require(saved_model_dir(export, model_name)),
        "tflite_int8": require(export / TFLITE / TFLITE_FILES["int8"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--single", type=Path, default=PROJECT / "outputs" / "export")
    parser.add_argument(
        "--ensemble", type=Path, default=PROJECT / "outputs" / "ensemble" / "export"
    )
    parser.add_argument("--student", type=Path, default=PROJECT / "outputs" / "student" / "export")
    parser.add_argument("--params", type=Path, default=PROJECT / "params.yaml")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from imgpipe.core.params import ModelParams, load_params, section
    from imgpipe.model import backbones

    params = load_params(args.params)
    name = params["serving"]["model_name"]
    size = backbones.image_size(section(ModelParams, "model", params))
    models = {"one_model": _files(args.single, name), "ensemble": _files(args.ensemble, name)}
    if args.student.is_dir():
        models["student"] = _files(args.student, name)
    image = sample_image()
    rounds: dict[str, list[dict[str, float]]] = {}
    for _ in range(args.repeats):
        for model, files in models.items():
            rounds.setdefault(f"{model}/saved_model", []).append(
                in_process(files["saved_model"], image, args.requests)
            )
            rounds.setdefault(f"{model}/tflite_int8", []).append(
                tflite(files["tflite_int8"], image, size, args.requests)
            )
    figures: dict[str, Any] = {key: median_of(value) for key, value in rounds.items()}
    for kind in ("saved_model", "tflite_int8"):
        one, many = figures[f"one_model/{kind}"], figures[f"ensemble/{kind}"]
        figures[f"ensemble_over_one_model/{kind}/p50"] = round(many["p50_ms"] / one["p50_ms"], 2)
        if "student" in models:
            student = figures[f"student/{kind}"]
            figures[f"student_over_ensemble/{kind}/p50"] = round(
                student["p50_ms"] / many["p50_ms"], 2
            )
    report = {"machine": describe(), "requests": args.requests, "repeats": args.repeats, **figures}
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
