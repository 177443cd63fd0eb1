"""Fine-tuning throughput by the way it is spread: one device, two replicas on one machine
(MirroredStrategy over two logical CPU devices, the stand-in for a two-GPU node) and two
workers (MultiWorkerMirroredStrategy, two processes on 127.0.0.1, the stand-in for two nodes),
each in processes of its own, measured one after another in one run, with the ratios to one
device.

    python -m bench.distributed --steps 12

Each run fine-tunes the demo's frozen model exactly as the stage does (``finetune.prepare``,
per-replica batch from params.yaml, the rate scaled by imgpipe.model.distribute.scaled) for two
epochs of ``--steps`` steps and times the second (the first traces and fills buffers). On one
CPU the replicas share the same cores, so the ratios show what the strategy costs, not what
more GPUs or nodes give. Needs ``outputs/`` from ``make demo``. Writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.machine import describe, require


def child(args: argparse.Namespace) -> None:
    """One process of one configuration: its images/s as JSON on the last line of stdout."""
    import tensorflow as tf

    if args.replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(args.replicas)]
        )
    from imgpipe.model.distribute import cluster, fit_multi_worker, scaled, strategy

    distribution = strategy()  # first: a multi-worker strategy precedes every other TF op
    import keras

    from components.finetune import prepare
    from imgpipe.core.params import FinetuneParams, ModelParams, load_params, section
    from imgpipe.data.datasets import image_dataset
    from imgpipe.data.manifest import SHARDS
    from imgpipe.data.tfrecords import split_files
    from imgpipe.model import backbones

    params = load_params(args.params)
    model_params = section(ModelParams, "model", params)
    tuning = section(FinetuneParams, "finetune", params)
    replicas = distribution.num_replicas_in_sync
    batch, rate = scaled(tuning.batch_size, tuning.learning_rate, replicas)
    size = backbones.image_size(model_params)
    files = split_files(args.outputs / "augment" / "shards", "train")
    val = split_files(args.outputs / "ingest" / SHARDS, "val")
    with distribution.scope():
        model, _ = prepare(args.outputs / "train" / "model.keras", model_params, tuning, 10, rate)

    seconds: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            seconds.append(time.perf_counter() - self.started)

    train = image_dataset(files, size, batch, shuffle_seed=tuning.seed, epochs=2)
    validation = image_dataset(val, size, batch).take(1)
    if cluster() is None:
        model.fit(
            train,
            steps_per_epoch=args.steps,
            validation_data=validation,
            epochs=2,
            callbacks=[Timer()],
            verbose=0,
        )
    else:
        fit_multi_worker(model, distribution, train, validation, args.steps, range(2), [Timer()])
    print(json.dumps({"replicas": replicas, "images_per_second": args.steps * batch / seconds[1]}))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def measure(args: argparse.Namespace, replicas: int, workers: int) -> dict[str, Any]:
    """Images/s of ``workers`` processes (each with ``replicas`` logical devices)."""
    command = [sys.executable, "-m", "bench.distributed", "--child", "--steps", str(args.steps)]
    command += ["--replicas", str(replicas), "--params", args.params]
    command += ["--outputs", str(args.outputs)]
    hosts = [f"127.0.0.1:{_free_port()}" for _ in range(workers)]
    procs = []
    for index in range(workers):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        if workers > 1:
            env["TF_CONFIG"] = json.dumps(
                {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}
            )
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True))
    outputs = [proc.communicate()[0] for proc in procs]
    for proc, output in zip(procs, outputs, strict=True):
        if proc.returncode:
            raise SystemExit(f"bench.distributed: {command} failed:\n{output[-2000:]}")
    result = json.loads(outputs[0].strip().splitlines()[-1])
    return {"workers": workers, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--outputs", type=Path, default=Path("outputs"))
    parser.add_argument("--steps", type=int, default=12, help="timed steps (one epoch)")
    parser.add_argument("--replicas", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("bench/results/distributed.json"))
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    require(args.outputs / "train" / "model.keras")
    runs = {
        "one_device": measure(args, 1, 1),
        "two_replicas": measure(args, 2, 1),
        "two_workers": measure(args, 1, 2),
    }
    base = runs["one_device"]["images_per_second"]
    report = {
        "benchmark": "distributed",
        "machine": describe(),
        "steps": args.steps,
        "runs": runs,
        "ratio_to_one_device": {
            name: round(run["images_per_second"] / base, 2) for name, run in runs.items()
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
