"""Serving: latency and throughput of the exported model through the local server's gRPC API,
with and without server-side batching, against calling the SavedModel in-process and the TFLite
models through ai-edge-litert; all measured in one run on one image file.

    python -m bench.serving --clients 1,8,32 --requests 200 --repeats 3

Per setting: p50/p99 latency of single-image Predict calls on the bytes signature and the
throughput when ``clients`` threads (one channel each) send them back to back; one client's
bytes request against the same image as a uint8 tensor (request sizes too); one image through
the SavedModel in-process and through the float32 and int8 TFLite models; and the wall time
of ``imgpipe predict`` on one image, a process per call, as a user runs it. Each figure is the
median over ``--repeats`` rounds, settings interleaved within each round. Needs ``models/`` and
``outputs/export`` from ``make demo``. Writes JSON (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.machine import describe, require

PROJECT = Path(__file__).resolve().parents[1]


def latest_version(base: Path) -> Path:
    versions = sorted((int(p.name), p) for p in base.iterdir() if p.name.isdigit())
    if not versions:
        raise SystemExit(f"no version folders in {base}: run `make demo` first")
    return versions[-1][1]


def percentiles(latencies: list[float]) -> dict[str, float]:
    return {
        "p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "p99_ms": 1000 * float(np.percentile(latencies, 99)),
    }


def load(
    address: str, model: str, request: dict[str, Any], clients: int, requests: int
) -> dict[str, Any]:
    """``requests`` single-image Predict calls spread over ``clients`` threads; ``request``
    holds the keyword arguments of ``ServingClient.predict`` besides the model. A failed call
    is counted (``failed``, beside ``calls``: every call made, the connecting ones too), not
    timed."""
    from serving.client import ServingClient, ServingClientError

    per_client = max(1, requests // clients)

    def worker(_: int) -> tuple[list[float], int]:
        latencies, failed = [], 0
        with ServingClient(address, timeout=120) as client:
            client.predict(**request, model=model)  # connect outside the timing
            for _ in range(per_client):
                started = time.perf_counter()
                try:
                    client.predict(**request, model=model)
                except ServingClientError:
                    failed += 1
                    continue
                latencies.append(time.perf_counter() - started)
        return latencies, failed

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(worker, range(clients)))
    elapsed = time.perf_counter() - started
    latencies = [x for chunk, _ in done for x in chunk]
    return {
        **percentiles(latencies),
        "images_per_second": len(latencies) / elapsed,
        "calls": clients * (per_client + 1),
        "failed": sum(failed for _, failed in done),
    }


def in_process(saved_model: Path, image: bytes, requests: int) -> dict[str, float]:
    import tensorflow as tf

    signature = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    batch = tf.constant([image])
    return timed(lambda: signature(image_bytes=batch)["probabilities"].numpy(), requests)


def command_line(address: str, model: str, image: Path, calls: int) -> dict[str, float]:
    """Wall time of ``imgpipe predict`` on one image file as a user runs it: a new process
    each call (interpreter start, imports, channel, request), one warm-up call first."""
    imgpipe = Path(sys.executable).parent / "imgpipe"
    command = [str(imgpipe), "predict", "--server", address, "--model", model, str(image)]

    def call() -> None:
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    return timed(call, calls, warmup=1)


def timed(call: Any, requests: int, warmup: int = 5) -> dict[str, float]:
    """p50/p99 and images/s of ``requests`` back-to-back single-image calls, after ``warmup``
    calls."""
    for _ in range(warmup):
        call()
    latencies = []
    for _ in range(requests):
        started = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - started)
    return {**percentiles(latencies), "images_per_second": len(latencies) / sum(latencies)}


def requests_for(image: bytes, size: int) -> dict[str, tuple[dict[str, Any], int]]:
    """Single-image Predict requests, with the size of each serialized PredictRequest: the
    encoded file on the bytes signature, and its pixels (resized to the model's input) as the
    uint8 tensor of ``serving_images``. A float32 tensor of the same pixels has no signature to
    go to (the model takes uint8), so only its size is reported."""
    import tensorflow as tf

    from imgpipe.data.datasets import decode_and_resize
    from imgpipe.export.savedmodel import BYTES_INPUT, IMAGES_INPUT, IMAGES_SIGNATURE
    from serving.tensors import apis, to_proto

    pixels = decode_and_resize(tf.constant(image), size).numpy()[None]
    inputs = {
        "bytes": ({BYTES_INPUT: np.array([image], dtype=object)}, None),
        "uint8_tensor": ({IMAGES_INPUT: pixels.round().astype(np.uint8)}, IMAGES_SIGNATURE),
        "float32_tensor": ({IMAGES_INPUT: pixels.astype(np.float32)}, None),
    }
    sized = {}
    for name, (tensors, signature) in inputs.items():
        request = apis().predict_pb2.PredictRequest()
        for key, value in tensors.items():
            to_proto(value, request.inputs[key])  # what the client sends, as it builds it
        kwargs = {"inputs": tensors, **({"signature": signature} if signature else {})}
        sized[name] = (kwargs, request.ByteSize())
    return sized


def tflite(path: Path, image: bytes, size: int, requests: int) -> dict[str, float]:
    """Single-image latency of a TFLite model through ai-edge-litert, decoding excluded."""
    import tensorflow as tf

    from imgpipe.data.datasets import decode_and_resize
    from imgpipe.export.tflite import TFLiteClassifier

    model = TFLiteClassifier(path)
    pixels = decode_and_resize(tf.constant(image), size).numpy()
    return timed(lambda: model(pixels), requests)


def median_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {
        k: round(statistics.median(r[k] for r in rounds), 2)
        for k in rounds[0]
        if k not in ("calls", "failed")  # counts: summed over the rounds instead
    }


def total(rounds: dict[str, list[dict[str, float]]], key: str, prefix: str = "") -> int:
    """``key`` (calls or failed) summed over every round of the settings starting ``prefix``."""
    return int(sum(r.get(key, 0) for k, v in rounds.items() if k.startswith(prefix) for r in v))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="served model name (default: params.yaml's)")
    parser.add_argument(
        "--base",
        type=Path,
        default=None,
        help="SavedModel versions (default: the export's, outputs/export/serving/<model>: the "
        "same model as the TFLite files)",
    )
    parser.add_argument("--image", type=Path, default=None, help="default: a test-split image")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=200, help="per setting and round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tflite", type=Path, default=PROJECT / "outputs" / "export" / "tflite")
    parser.add_argument("--params", type=Path, default=PROJECT / "params.yaml")
    parser.add_argument("--out", type=Path, default=Path("bench/results/serving.json"))
    args = parser.parse_args()

    from imgpipe.core.params import ModelParams, load_params, section
    from imgpipe.export.savedmodel import TFLITE_FILES
    from imgpipe.model import backbones
    from serving.config import served_model_name
    from serving.process import SIDECAR, ServerProcess, model_config

    args.model = args.model or served_model_name(args.params)
    base = args.base or PROJECT / "outputs" / "export" / "serving" / args.model
    version = latest_version(require(base))
    image = args.image.read_bytes() if args.image else sample_image()
    clients = [int(c) for c in args.clients.split(",")]
    size = backbones.image_size(section(ModelParams, "model", load_params(args.params)))
    requests = requests_for(image, size)
    # What the export made: export.int8 and int8_weights; only int8 when quantization-aware.
    tflite_files = {
        kind: args.tflite / name
        for kind, name in TFLITE_FILES.items()
        if (args.tflite / name).is_file()
    }
    if not tflite_files:
        require(args.tflite / TFLITE_FILES["int8"])

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        root = Path(tmp)
        image_file = root / "image"
        image_file.write_bytes(image)
        shutil.copytree(version, root / "models" / args.model / "1")
        config = model_config(root / "models.config", args.model, f"/models/{args.model}")
        common = ["--model_config_file", str(config), "--mount", f"{root / 'models'}:/models"]
        servers = {
            "unbatched": ServerProcess(common, root / "unbatched"),
            "batched": ServerProcess(
                [
                    *common,
                    "--enable_batching",
                    "--batching_parameters_file",
                    str(PROJECT / "serving" / "batching.config"),
                ],
                root / "batched",
            ),
        }
        logged = root / "params.yaml"  # the sidecar logs every call (sampling 1.0) into root/logs
        sidecar_params = yaml.safe_load(args.params.read_text())
        sidecar_params["request_log"].update(directory=str(root / "logs"), sampling_rate=1.0)
        logged.write_text(yaml.safe_dump(sidecar_params))
        servers["sidecar"] = ServerProcess(
            ["sidecar", "--upstream", servers["unbatched"].address, "--params", str(logged)],
            root / "sidecar",
            module=SIDECAR,
        )
        try:
            rounds: dict[str, list[dict[str, float]]] = {}
            for _ in range(args.repeats):  # settings interleaved within each round
                for name, server in servers.items():  # the sidecar fronts the unbatched server
                    for n in clients:
                        rounds.setdefault(f"{name}/{n}", []).append(
                            load(server.address, args.model, requests["bytes"][0], n, args.requests)
                        )
                for name in ("unbatched", "sidecar"):  # the logging sidecar's cost, side by side
                    rounds.setdefault(f"logged_{name}/1", []).append(
                        load(
                            servers[name].address,
                            args.model,
                            requests["bytes"][0],
                            1,
                            args.requests,
                        )
                    )
                for kind in ("bytes", "uint8_tensor"):
                    rounds.setdefault(f"request_{kind}/1", []).append(
                        load(
                            servers["unbatched"].address,
                            args.model,
                            requests[kind][0],
                            1,
                            args.requests,
                        )
                    )
                rounds.setdefault("imgpipe_predict_cli/1", []).append(
                    command_line(servers["unbatched"].address, args.model, image_file, 5)
                )
                rounds.setdefault("in_process/1", []).append(
                    in_process(root / "models" / args.model / "1", image, args.requests)
                )
                for kind, path in tflite_files.items():
                    rounds.setdefault(f"tflite_{kind}/1", []).append(
                        tflite(path, image, size, args.requests)
                    )
        finally:
            codes = {name: server.stop() for name, server in servers.items()}
        from serving.request_log import read_logs

        logged_records = sum(1 for _ in read_logs(root / "logs"))
    results = {key: median_of(value) for key, value in rounds.items()}
    through_sidecar = ("sidecar", "logged_sidecar")  # every call the sidecar answered
    answered = sum(total(rounds, "calls", p) - total(rounds, "failed", p) for p in through_sidecar)
    report = {
        "benchmark": "serving",
        "machine": describe(),
        "model": f"{args.model} (from {version})",
        "image_bytes": len(image),
        "request_bytes": {kind: n for kind, (_, n) in requests.items()},
        "requests_per_setting": args.requests,
        "repeats": args.repeats,
        "server_exit_codes": codes,
        "failed_requests": total(rounds, "failed"),
        "sidecar_answered_requests": answered,
        "sidecar_logged_records": logged_records,
        "every_answered_request_logged": logged_records == answered,
        "sidecar_overhead_p50_ms": round(
            results["logged_sidecar/1"]["p50_ms"] - results["logged_unbatched/1"]["p50_ms"], 3
        ),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'setting':<24} {'p50 ms':>8} {'p99 ms':>8} {'img/s':>8}")
    for key, r in results.items():
        print(f"{key:<24} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['images_per_second']:>8.1f}")
    print(f"-> {args.out}")


def sample_image() -> bytes:
    """The first test image of the demo's ingest output, as its encoded file."""
    from imgpipe.data.tfrecords import read_split

    return read_split(PROJECT / "outputs" / "ingest" / "shards", limit=1).encoded[0]


if __name__ == "__main__":
    main()
