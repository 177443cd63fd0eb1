"""Drift detection on the served model: how often ``imgpipe monitor``'s checks raise a false
alarm on held-out test images, and the smallest shift they flag, with every image sent through
the logging sidecar in front of the local server (what ``make serve`` runs).

    python -m bench.drift --repeats 20 --requests 200 --shift-repeats 3

Each scenario is a seeded draw of ``--requests`` test-split images (without replacement),
changed by its shift, sent one per Predict call (bytes signature, 4 client threads) through a
sidecar that logs into a folder of its own; then the monitor's checks
(``imgpipe.monitoring.traffic.check_traffic`` and ``reasons_to_retrain``, at params.yaml's
thresholds) run on what the sidecar logged. An alarm is any reason to retrain: embedding drift,
prediction drift or an input check. Shifts, each at several strengths: darkened (pixels times a
factor), blurred (Gaussian, radius in pixels of the 300 px cell), rotated (degrees, corners black),
and images of another data set (scikit-learn's handwritten digits, upscaled to 300 px grayscale).
The no-shift draws overlap (200 of the 657 test images each), so they are not independent.
Needs ``models/`` and ``outputs/ingest`` from ``make demo``. Writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.machine import describe, require
from bench.serving import PROJECT, latest_version

SHIFTS: dict[str, list[float]] = {
    "darken": [0.97, 0.94, 0.9, 0.8, 0.7, 0.6],  # pixel values times this factor
    "blur": [0.5, 1.0, 1.5, 2.0, 3.0],  # Gaussian radius, pixels
    "rotate": [1.0, 2.0, 3.0, 5.0],  # degrees, counter-clockwise
    "digits": [1.0],  # another data set
}


def shifted(encoded: bytes, kind: str, level: float) -> bytes:
    """``encoded`` changed by one shift, re-encoded as PNG (lossless)."""
    from PIL import Image, ImageFilter

    opened = Image.open(io.BytesIO(encoded))
    opened.load()
    image: Image.Image = opened
    if kind == "darken":
        image = image.point(lambda v: round(v * level))
    elif kind == "blur":
        image = image.filter(ImageFilter.GaussianBlur(level))
    elif kind == "rotate":
        fill = 0 if len(image.getbands()) == 1 else (0,) * len(image.getbands())
        image = image.rotate(level, resample=Image.Resampling.BILINEAR, fillcolor=fill)
    else:
        raise ValueError(f"unknown shift {kind!r}")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def digits(count: int, seed: int, side: int = 300) -> list[bytes]:
    """``count`` of scikit-learn's 1,797 handwritten digits (8x8, shipped with it), upscaled to
    ``side`` px grayscale PNGs."""
    from PIL import Image
    from sklearn.datasets import load_digits

    images = load_digits().images
    chosen = np.random.default_rng(seed).choice(len(images), size=count, replace=False)
    encoded = []
    for i in chosen:
        pixels = np.clip(images[i] * (255.0 / 16.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels, mode="L").resize((side, side), Image.Resampling.BILINEAR)
        out = io.BytesIO()
        image.save(out, format="PNG")
        encoded.append(out.getvalue())
    return encoded


def send(address: str, model: str, images: list[bytes], clients: int) -> int:
    """One Predict call per image over ``clients`` threads; the number that failed."""
    from serving.client import ServingClient, ServingClientError

    def worker(chunk: list[bytes]) -> int:
        failed = 0
        with ServingClient(address, timeout=60) as client:
            for image in chunk:
                try:
                    client.predict({"image_bytes": np.array([image], dtype=object)}, model=model)
                except ServingClientError:
                    failed += 1
        return failed

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        return sum(pool.map(worker, [images[i::clients] for i in range(clients)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="no-shift draws")
    parser.add_argument("--requests", type=int, default=200, help="images per draw")
    parser.add_argument("--shift-repeats", type=int, default=3, help="draws per shift strength")
    parser.add_argument(
        "--shifts", default=",".join(SHIFTS), help=f"comma-separated, of {', '.join(SHIFTS)}"
    )
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--saved-model", type=Path, default=None, help="default: newest in models/")
    parser.add_argument("--params", type=Path, default=PROJECT / "params.yaml")
    parser.add_argument("--out", type=Path, default=Path("bench/results/drift.json"))
    args = parser.parse_args()
    args.shifts = args.shifts.split(",") if args.shifts else []
    unknown = set(args.shifts) - set(SHIFTS)
    if unknown:
        raise SystemExit(f"unknown shift(s) {sorted(unknown)}; known: {list(SHIFTS)}")

    from imgpipe.core.params import MonitorParams, ValidateParams, load_params, section
    from imgpipe.data.tfrecords import read_split
    from imgpipe.export.savedmodel import SavedModelClassifier
    from imgpipe.monitoring.reference import read_reference
    from imgpipe.monitoring.traffic import check_traffic, read_traffic, reasons_to_retrain
    from serving.config import served_model_name
    from serving.process import SIDECAR, ServerProcess, model_config

    started = time.perf_counter()
    params = load_params(args.params)
    monitor = section(MonitorParams, "monitor", params)
    validate = section(ValidateParams, "validate", params)
    model = served_model_name(args.params)
    saved_model = args.saved_model or latest_version(require(PROJECT / "models" / model))
    version = int(saved_model.name)
    reference = read_reference(saved_model)
    served = SavedModelClassifier(saved_model)
    test = read_split(require(PROJECT / "outputs" / "ingest" / "shards"), "test").encoded
    if len(test) < args.requests:
        raise SystemExit(f"{len(test)} test images, fewer than --requests {args.requests}")

    def draw(seed: int) -> list[bytes]:
        chosen = np.random.default_rng(seed).choice(len(test), size=args.requests, replace=False)
        return [test[i] for i in chosen]

    scenarios: list[tuple[str, float, int, list[bytes]]] = [
        ("none", 0.0, r, draw(r)) for r in range(args.repeats)
    ]
    for kind in args.shifts:
        for level in SHIFTS[kind]:
            for r in range(args.shift_repeats):
                seed = 1000 + r
                images = (
                    digits(args.requests, seed)
                    if kind == "digits"
                    else [shifted(e, kind, level) for e in draw(seed)]
                )
                scenarios.append((kind, level, seed, images))

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-drift-") as tmp:
        root = Path(tmp)
        shutil.copytree(saved_model, root / "models" / model / str(version))
        config = model_config(root / "models.config", model, f"/models/{model}")
        server = ServerProcess(
            ["--model_config_file", str(config), "--mount", f"{root / 'models'}:/models"],
            root / "server",
        )
        try:
            for i, (kind, level, seed, images) in enumerate(scenarios):
                logs = root / "logs" / f"{i:03d}"
                sidecar_params = yaml.safe_load(args.params.read_text())
                sidecar_params["request_log"].update(directory=str(logs), sampling_rate=1.0)
                params_file = root / f"params-{i:03d}.yaml"
                params_file.write_text(yaml.safe_dump(sidecar_params))
                sidecar = ServerProcess(
                    ["sidecar", "--upstream", server.address, "--params", str(params_file)],
                    root / "sidecar",
                    module=SIDECAR,
                )
                try:
                    failed = send(sidecar.address, model, images, args.clients)
                finally:
                    sidecar.stop()  # closes the log file: the monitor reads closed files only
                traffic = read_traffic(
                    logs, model, version, max_requests=monitor.max_requests, seed=seed
                )
                check = check_traffic(
                    traffic,
                    reference,
                    served.embed_bytes,
                    monitor,
                    validate,
                    root / "docs" / f"{i:03d}",
                    seed=seed,
                )
                reasons = reasons_to_retrain(check, {})
                row = {
                    "shift": kind,
                    "level": level,
                    "seed": seed,
                    "sent": len(images),
                    "failed": failed,
                    "logged": check["requests"],
                    "embedding_p": check.get("embedding_p"),
                    "class_p": check.get("class_p"),
                    "confidence_p": check.get("confidence_p"),
                    "input_failures": len(check.get("input_failures", [])),
                    "fired": sorted(
                        name
                        for name, hit in (
                            ("embedding", check.get("embedding_drift")),
                            ("prediction", check.get("prediction_drift")),
                            ("input", check.get("input_failures")),
                        )
                        if hit
                    ),
                    "alarm": bool(reasons),
                }
                rows.append(row)
                print(
                    f"{i + 1}/{len(scenarios)} {kind} {level:g} seed {seed}: "
                    f"{'ALARM ' + ','.join(row['fired']) if row['alarm'] else 'no alarm'} "
                    f"(embedding p {row['embedding_p']:.3g}, classes p {row['class_p']:.3g}, "
                    f"confidence p {row['confidence_p']:.3g}; {row['logged']}/{row['sent']} "
                    f"logged, {failed} failed)",
                    flush=True,
                )
        finally:
            server_exit = server.stop()

    report = summarise(rows, args)
    report.update(
        machine=describe(),
        model=f"{model} v{version} (from {saved_model})",
        reference_images=len(reference.embeddings),
        thresholds={
            "false_alarm_rate": monitor.false_alarm_rate,
            "max_requests": monitor.max_requests,
            "input_mostly": monitor.input_mostly,
            "permutations": monitor.permutations,
        },
        server_exit_code=server_exit,
        wall_seconds=round(time.perf_counter() - started, 1),
        scenarios=rows,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    null = report["no_shift"]
    print(
        f"no shift: {null['alarms']} alarms in {null['repeats']} draws "
        f"(false-alarm rate {null['false_alarm_rate']:.2f}); smallest shift flagged in every "
        f"draw: {report['smallest_detected']}; {report['failed_requests']} failed requests, "
        f"{report['logged_requests']}/{report['sent_requests']} logged -> {args.out}"
    )


def summarise(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """False-alarm rate, detection rate per shift strength, the smallest strength flagged in
    every draw, and request accounting."""
    null = [r for r in rows if r["shift"] == "none"]
    fired = {
        name: sum(name in r["fired"] for r in null) for name in ("embedding", "prediction", "input")
    }
    shifts: dict[str, list[dict[str, Any]]] = {}
    smallest: dict[str, float | None] = {}
    for kind in args.shifts:
        levels = SHIFTS[kind]
        shifts[kind] = []
        smallest[kind] = None
        for level in levels:
            draws = [r for r in rows if r["shift"] == kind and r["level"] == level]
            if not draws:
                continue
            detected = sum(r["alarm"] for r in draws)
            shifts[kind].append(
                {
                    "level": level,
                    "detected": f"{detected}/{len(draws)}",
                    "fired": sorted({name for r in draws for name in r["fired"]}),
                    "median_embedding_p": statistics.median(r["embedding_p"] for r in draws),
                }
            )
            if smallest[kind] is None and detected == len(draws):
                smallest[kind] = level
    return {
        "benchmark": "drift",
        "requests_per_draw": args.requests,
        "no_shift": {
            "repeats": len(null),
            "alarms": sum(r["alarm"] for r in null),
            "false_alarm_rate": sum(r["alarm"] for r in null) / max(1, len(null)),
            "fired": fired,
            "embedding_p": [round(r["embedding_p"], 4) for r in null],
        },
        "shifts": shifts,
        "smallest_detected": smallest,
        "sent_requests": sum(r["sent"] for r in rows),
        "logged_requests": sum(r["logged"] for r in rows),
        "failed_requests": sum(r["failed"] for r in rows),
    }


if __name__ == "__main__":
    main()
