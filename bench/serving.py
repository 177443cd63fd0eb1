"""Serving: latency and throughput of the exported model through the local server's gRPC API,
with and without server-side batching, against calling the SavedModel in-process; all measured
in one run on one image file.

    python -m bench.serving --clients 1,8,32 --requests 200 --repeats 3

Per setting: p50/p99 latency of single-image Predict calls on the bytes signature and the
throughput when ``clients`` threads (one channel each) send them back to back. Each figure is the
median over ``--repeats`` rounds, rounds interleaved between the two servers. Writes JSON
(``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.machine import describe

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


def load(address: str, model: str, image: bytes, clients: int, requests: int) -> dict[str, Any]:
    """``requests`` single-image Predict calls spread over ``clients`` threads."""
    from serving.client import ServingClient

    per_client = max(1, requests // clients)

    def worker(_: int) -> list[float]:
        latencies = []
        with ServingClient(address, timeout=120) as client:
            client.predict_bytes([image], model=model)  # connect outside the timing
            for _ in range(per_client):
                started = time.perf_counter()
                client.predict_bytes([image], model=model)
                latencies.append(time.perf_counter() - started)
        return latencies

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        latencies = [x for chunk in pool.map(worker, range(clients)) for x in chunk]
    elapsed = time.perf_counter() - started
    return {**percentiles(latencies), "images_per_second": len(latencies) / elapsed}


def in_process(saved_model: Path, image: bytes, requests: int) -> dict[str, float]:
    import tensorflow as tf

    signature = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    batch = tf.constant([image])
    for _ in range(5):
        signature(image_bytes=batch)
    latencies = []
    for _ in range(requests):
        started = time.perf_counter()
        signature(image_bytes=batch)["probabilities"].numpy()
        latencies.append(time.perf_counter() - started)
    return {**percentiles(latencies), "images_per_second": len(latencies) / sum(latencies)}


def median_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in rounds), 2) for k in rounds[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="elpv_defects")
    parser.add_argument("--base", type=Path, default=None, help="default: models/<model>")
    parser.add_argument("--image", type=Path, default=None, help="default: a test-split image")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=200, help="per setting and round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/serving.json"))
    args = parser.parse_args()

    from serving.process import ServerProcess, model_config

    base = args.base or PROJECT / "models" / args.model
    version = latest_version(base)
    image = args.image.read_bytes() if args.image else _test_image()
    clients = [int(c) for c in args.clients.split(",")]

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        root = Path(tmp)
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
        try:
            rounds: dict[str, list[dict[str, float]]] = {}
            for _ in range(args.repeats):
                for name, server in servers.items():
                    for n in clients:
                        rounds.setdefault(f"{name}/{n}", []).append(
                            load(server.address, args.model, image, n, args.requests)
                        )
            rounds["in_process/1"] = [
                in_process(root / "models" / args.model / "1", image, args.requests)
                for _ in range(args.repeats)
            ]
        finally:
            codes = {name: server.stop() for name, server in servers.items()}
    results = {key: median_of(value) for key, value in rounds.items()}
    report = {
        "benchmark": "serving",
        "machine": describe(),
        "model": f"{args.model} (from {version})",
        "image_bytes": len(image),
        "requests_per_setting": args.requests,
        "repeats": args.repeats,
        "server_exit_codes": codes,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'setting':<16} {'p50 ms':>8} {'p99 ms':>8} {'img/s':>8}")
    for key, r in results.items():
        print(f"{key:<16} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['images_per_second']:>8.1f}")
    print(f"-> {args.out}")


def _test_image() -> bytes:
    from components.evaluate import read_test_split

    return read_test_split(PROJECT / "outputs" / "ingest" / "shards").encoded[0]


if __name__ == "__main__":
    main()
