"""Hostile input and failure, case by case: what the served edge and the closed loop do with
path-traversing labels, decompression bombs, corrupt and cut-off log files, floods of
maximum-size requests, a full disk, SIGKILL mid-write and two writers at once.

    python -m bench.faults [--saved-model models/elpv_defects/1] [--out bench/results/faults.json]

Each group of cases runs in a fresh process of its own (``--group NAME``), in a folder of its
own, so that its peak memory is its own. For every case the JSON says its outcome (the answer
or error), whether the process under test stayed up, how many records were lost (and the
documented bound), how many files were written outside the folders the component may write
(must be 0) and the group's peak resident memory. ``tests/code/test_faults.py`` runs the same groups
and fails on any case whose outcome is not the expected one. The server and sidecar groups need
an exported SavedModel (default: the newest in ``models/``, from ``make demo``).
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
Row = dict[str, Any]


def _png(size: tuple[int, int] = (48, 40), seed: int = 0) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims ``width`` x ``height`` (a decompression bomb)."""
    png = bytearray(_png())
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(png[24:29])
    png[12:29] = header
    png[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(png)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _case(
    name: str, expected: str, outcome: str, *, up: bool | None = None, lost: int | None = None,
    bound: int | None = None, outside: int = 0,
) -> Row:  # fmt: skip
    return {
        "case": name,
        "expected": expected,
        "outcome": outcome,
        "ok": expected in outcome,
        "process_up": up,
        "records_lost": lost,
        "records_lost_bound": bound,
        "files_outside": outside,
    }


# --- feedback into data/ -------------------------------------------------------------------


def group_feedback(work: Path, _: Path | None) -> list[Row]:
    from imgpipe.core.errors import InputError
    from imgpipe.core.fileio import sha256_file
    from imgpipe.data import feedback

    rows = []
    data = work / "data"
    # One seed per class, fixed: str's hash changes with each process (PYTHONHASHSEED), and
    # two classes whose seeds met made the duplicate-under-another-label case flaky.
    for seed, label in enumerate(("ok", "broken")):
        (data / label).mkdir(parents=True)
        (data / label / "0.png").write_bytes(_png(seed=seed))
    outside = work / "outside"
    outside.mkdir()
    given = work / "given"
    given.mkdir()

    def row(path: Path, label: str) -> dict[str, Any]:
        return {
            "filepath": path.name,
            "path": path,
            "label": label,
            "sha256": sha256_file(path),
            "predicted": "ok",
        }

    def beyond_data() -> set[str]:
        return {f for f in _files(work) if not f.startswith(("data/", "given/"))}

    def attempt(name: str, expected: str, action: Callable[[], Any]) -> None:
        before = beyond_data()
        try:
            result = action()
            outcome = f"done: {result}"
        except InputError as error:
            outcome = f"refused: {error}"
        written = beyond_data() - before
        rows.append(_case(name, expected, outcome, up=True, outside=len(written)))

    image = given / "new.png"
    image.write_bytes(_png(seed=7))
    for name, label in (
        ("feedback label ../x", "../x"),
        ("feedback label a/b", "a/b"),
        ("feedback label .hidden", ".hidden"),
        ("feedback label with a NUL", "x\x00y"),
    ):
        attempt(
            name, "refused", lambda label=label: feedback.check_labels([label], ["ok"], [label])
        )
    attempt(
        "feedback label unknown",
        "refused",
        lambda: feedback.check_labels(["brokn"], ["ok", "broken"]),
    )
    (data / "escape").symlink_to(outside, target_is_directory=True)
    attempt(
        "feedback into a class folder that is a symlink out of data/",
        "refused",
        lambda: feedback.append(
            feedback.plan([row(image, "escape")], feedback.data_images(data)), data, "t1"
        ),
    )
    (data / "escape").unlink()
    same = given / "copy.png"
    same.write_bytes((data / "ok" / "0.png").read_bytes())
    attempt(
        "feedback duplicating a training image under another label",
        "for_review': 1",
        lambda: feedback.plan([row(same, "broken")], feedback.data_images(data)).counts(),
    )
    twice = given / "twice.png"
    twice.write_bytes(image.read_bytes())
    attempt(
        "feedback giving one image twice",
        "'appended': 1, 'skipped': 1",
        lambda: feedback.plan(
            [row(image, "ok"), row(twice, "ok")], feedback.data_images(data)
        ).counts(),
    )
    # SIGKILL mid-append: a child copies, and is killed before it marks the staging complete
    script = (
        "import sys, os, shutil, signal\n"
        "from pathlib import Path\n"
        "from imgpipe import feedback\n"
        "real = shutil.copyfile\n"
        "def die(src, dst, **kw):\n"
        "    real(src, dst, **kw)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "feedback.shutil.copyfile = die\n"
        "from imgpipe.core.fileio import sha256_file\n"
        "p = Path(sys.argv[2])\n"
        "rows = [{'filepath': p.name, 'path': p, 'label': 'ok', 'sha256': sha256_file(p),"
        " 'predicted': 'ok'}]\n"
        "feedback.append(feedback.plan(rows, {}), Path(sys.argv[1]), 't2')\n"
    )
    before = _files(data)
    killed = subprocess.run([sys.executable, "-c", script, str(data), str(image)], cwd=PROJECT)
    untouched = _files(data) == before
    recovered = feedback.finish_pending(data)
    rows.append(
        _case(
            "SIGKILL of feedback appending mid-copy",
            "data untouched",
            f"exit {killed.returncode}; "
            + ("data untouched" if untouched else "data changed")
            + f"; next append: {recovered}",
            up=False,
            outside=0,
        )
    )
    return rows


# --- images into ingest and imgpipe score ---------------------------------------------------


def group_images(work: Path, _: Path | None) -> list[Row]:
    from imgpipe.data.images import ImageRejected, check_image

    cases = {
        "ingest: PNG header claiming 20,000 x 20,000": (png_claiming(20_000, 20_000), "bomb"),
        "ingest: PNG cut off halfway": (_png()[: len(_png()) // 2], "decode_error"),
        "ingest: zero-byte file": (b"", "empty_file"),
        "ingest: text named .png": (b"not an image at all", "not_an_image"),
        "ingest: JPEG cut after its header": (_jpeg()[:200], "quarantined"),
    }
    rows = []
    for name, (data, expected) in cases.items():
        try:
            check_image(data, max_pixels=50_000_000)
            outcome = "accepted"
        except ImageRejected as error:
            outcome = f"quarantined: {error.reason}: {error.detail}"
        expected = {"bomb": "decompression_bomb"}.get(expected, expected)
        rows.append(_case(name, expected, outcome, up=True))
    return rows


def _jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


# --- the request log --------------------------------------------------------------------------


def _settings(root: Path, **overrides: Any) -> Any:
    from serving.request_log import LogSettings

    values = dict(
        directory=root, sampling_rate=1.0, max_file_bytes=1 << 20, rotate_seconds=3600.0,
        max_total_bytes=64 << 20, retention_seconds=86400.0, queue_bytes=64 << 20,
    )  # fmt: skip
    values.update(overrides)
    return LogSettings(**values)


def _call(index: int, payload: int = 500) -> tuple[bytes, bytes]:
    from serving.tensors import API_MODULES, apis, to_proto

    m = apis(API_MODULES)
    request = m.predict_pb2.PredictRequest()
    request.model_spec.name = "cells"
    to_proto(
        np.array([b"img-%d" % index + bytes(payload)], dtype=object), request.inputs["image_bytes"]
    )
    response = m.predict_pb2.PredictResponse()
    response.model_spec.name = "cells"
    response.model_spec.version.value = 1
    to_proto(np.array([[0.5, 0.5]], np.float32), response.outputs["probabilities"])
    return request.SerializeToString(), response.SerializeToString()


def group_request_log(work: Path, _: Path | None) -> list[Row]:
    from serving.request_log import OPEN_SUFFIX, RequestLog, closed_logs, read_logs

    rows = []
    root = work / "logs"
    # a log folder that is a file: every write fails, the caller never sees it
    (work / "not-a-folder").write_text("x")
    log = RequestLog(_settings(work / "not-a-folder" / "logs"))
    queued = sum(log.offer("predict", *_call(i)) for i in range(20))
    log.close()
    rows.append(
        _case(
            "request log: folder unwritable",
            "dropped 20",
            f"queued {queued}, dropped {log.counts['dropped_write_error']}, raised nothing",
            up=True,
            lost=log.counts["dropped_write_error"],
            bound=20,
        )
    )
    # a full disk: writes past a file-size limit fail (EFBIG), records are dropped and counted
    script = (
        "import resource, signal, sys, json\n"
        "from pathlib import Path\n"
        "from bench.faults import _settings, _call\n"
        "from serving.request_log import RequestLog\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
        "log = RequestLog(_settings(Path(sys.argv[1])))\n"
        "for i in range(100): log.offer('predict', *_call(i))\n"
        "log.close()\n"
        "print(json.dumps(dict(log.counts)))\n"
    )
    full = subprocess.run(
        [sys.executable, "-c", script, str(work / "full")], cwd=PROJECT, capture_output=True,
        text=True,
    )  # fmt: skip
    counts = json.loads(full.stdout.strip().splitlines()[-1]) if full.returncode == 0 else {}
    kept = sum(1 for _ in read_logs(work / "full")) if full.returncode == 0 else 0
    written, dropped = counts.get("written", 0), counts.get("dropped_write_error", 0)
    left_open = len(list((work / "full").rglob("*" + OPEN_SUFFIX)))
    # the fault happened (some dropped), every record written is readable, none unaccounted
    whole = full.returncode == 0 and dropped > 0 and kept == written == 100 - dropped
    rows.append(
        _case(
            "request log: disk full (file size limit)",
            "every written record kept readable, every other counted, 0 left open",
            f"exit {full.returncode}; written {written}, dropped {dropped}; {kept} kept readable"
            + (", " if not whole else "; every written record kept readable, every other counted, ")
            + f"{left_open} left open",
            up=full.returncode == 0,
            lost=100 - kept,
            bound=dropped,
        )
    )
    # SIGKILL mid-stream: the next writer salvages the file; lost: what was queued and the tail
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from bench.faults import _settings, _call\n"
        "from serving.request_log import RequestLog\n"
        "log = RequestLog(_settings(Path(sys.argv[1]), folder='pod-a'))\n"
        "for i in range(200): log.offer('predict', *_call(i))\n"
        "log.flush()\n"
        "for i in range(200, 260): log.offer('predict', *_call(i))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script, str(root)], cwd=PROJECT)
    after = RequestLog(_settings(root, folder="pod-b"))
    after.close()
    read = sum(1 for _ in read_logs(root))
    rows.append(
        _case(
            "SIGKILL of the sidecar's writer mid-stream",
            "salvaged",
            f"exit {killed.returncode}; salvaged {after.counts['files_salvaged']} file(s), "
            f"{read} of 260 records readable, 0 left open"
            if not list(root.rglob("*" + OPEN_SUFFIX))
            else "a .open file was left",
            up=False,
            lost=260 - read,
            bound=60,  # queued after the last flush, not yet written
        )
    )
    # a flood of maximum-size (16 MB) records with the writer stuck: memory stays bounded
    gate = {"open": False}
    real = RequestLog._write

    def stuck(self: Any, *item: Any) -> None:
        while not gate["open"]:
            time.sleep(0.01)
        real(self, *item)

    RequestLog._write = stuck  # type: ignore[method-assign]
    try:
        flood = RequestLog(
            _settings(work / "flood", max_file_bytes=1 << 30, max_total_bytes=1 << 32)
        )
        big = b"x" * (16 << 20)
        taken = sum(flood.offer("predict", big, b"") for _ in range(100))
        held = flood._queued_bytes
        gate["open"] = True
        flood.close()
    finally:
        RequestLog._write = real  # type: ignore[method-assign]
    dropped = flood.counts["dropped_queue_full"]
    bounded = held <= flood.settings.queue_bytes and dropped > 0 and taken + dropped == 100
    rows.append(
        _case(
            "request log: 100 requests of 16 MB with the writer stuck",
            "held within the bound",
            f"queued {taken}, dropped {dropped}; held {held / 2**20:.0f} MB, the bound "
            f"{flood.settings.queue_bytes / 2**20:.0f} MB: "
            + ("held within the bound" if bounded else "NOT bounded"),
            up=True,
            lost=dropped,
            bound=100 - taken,
        )
    )
    # two writers bounding the same root at once: one at a time, nothing deleted twice
    import threading

    shared = work / "shared"
    writers = [
        RequestLog(_settings(shared, folder=f"pod-{i}", max_file_bytes=4000, max_total_bytes=20000))
        for i in range(2)
    ]
    errors: list[str] = []

    def write(log: Any, first: int) -> None:
        try:
            for i in range(first, first + 150):
                log.offer("predict", *_call(i))
            log.close()
        except Exception as error:  # would be a bug
            errors.append(repr(error))

    threads = [threading.Thread(target=write, args=(w, 1000 * i)) for i, w in enumerate(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = sum(p.stat().st_size for p in closed_logs(shared))
    rows.append(
        _case(
            "two sidecar writers bounding one log root at once",
            "within the bound",
            f"errors {errors or 'none'}; {total} bytes kept of a 20000-byte bound: "
            + ("within the bound" if total <= 20000 else "over the bound"),
            up=True,
        )
    )
    return rows


# --- the monitor ----------------------------------------------------------------------------


def group_monitor(work: Path, _: Path | None) -> list[Row]:
    from imgpipe.monitoring.traffic import read_traffic
    from serving.request_log import RequestLog, tfrecord_frame

    rows = []
    logs = work / "logs"
    log = RequestLog(_settings(logs, max_file_bytes=8 << 20, max_total_bytes=1 << 34))
    for i in range(100_000):
        while not log.offer("predict", *_call(i, payload=200)):
            time.sleep(0.001)  # the writer catches up: this case measures the reader
    log.close()
    started = time.perf_counter()
    traffic = read_traffic(logs, "cells", 1, max_requests=2000, seed=1)
    seconds = time.perf_counter() - started
    rows.append(
        _case(
            "monitor: 100,000 logged requests",
            "sampled 2000",
            f"counted {traffic.requests}, sampled {len(traffic.encoded)} in {seconds:.1f} s",
            up=True,
        )
    )
    bad = logs / "requests-corrupt.tfrecord"
    bad.write_bytes(tfrecord_frame(b"not a PredictionLog") + b"\x00" * 7)
    skip = [f for f in traffic.files]
    once = read_traffic(logs, "cells", 1, skip=skip)
    again = read_traffic(logs, "cells", 1, skip=skip + once.files)
    rows.append(
        _case(
            "monitor: a corrupt log file",
            "quarantined",
            f"quarantined: {once.quarantined}; the next check reads {len(again.files)} file(s)"
            if once.quarantined
            else "not quarantined",
            up=True,
        )
    )
    # two monitors at once: the second is refused before it reads or writes anything
    import yaml

    from imgpipe.monitoring.check import one_check_at_a_time

    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["monitor"]["directory"] = str(work / "monitor")
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    with one_check_at_a_time(work / "monitor"):
        second = subprocess.run(
            [sys.executable, "-m", "commands", "monitor", "--params", str(work / "params.yaml"),
             "--saved-model", str(work / "m" / "1"), "--log-dir", str(logs)],
            cwd=PROJECT, capture_output=True, text=True,
        )  # fmt: skip
    written = sorted(p.name for p in (work / "monitor").iterdir() if p.name != ".lock")
    rows.append(
        _case(
            "two monitors at once",
            "another imgpipe monitor is checking",
            f"exit {second.returncode}: {second.stderr.strip().splitlines()[-1][:200]}; "
            f"the second wrote {written or 'nothing'}",
            up=True,
        )
    )
    cut = logs / "requests-cut.tfrecord"
    frame = tfrecord_frame(b"x" * 100)
    cut.write_bytes(frame[:50])
    cutoff = read_traffic(logs, "cells", 1, skip=skip + once.files)
    rows.append(
        _case(
            "monitor: a log file cut off mid-record",
            "quarantined",
            f"quarantined: {sorted(cutoff.quarantined)}" if cutoff.quarantined else "raised",
            up=True,
        )
    )
    return rows


# --- the gRPC server and the sidecar (subprocesses, a real SavedModel) ---------------------


def _serve(work: Path, saved_model: Path) -> tuple[str, Any]:
    """The local gRPC server on 127.0.0.1 serving a copy of ``saved_model`` as version 1 of a
    model named after its folder: (the model's name, the ServerProcess)."""
    import shutil

    from serving.process import ServerProcess, model_config

    model = saved_model.parent.name
    models = work / "models"
    shutil.copytree(saved_model, models / model / "1")
    config = model_config(work / "models.config", model, f"/models/{model}")
    command = ["--model_config_file", str(config), "--mount", f"{models}:/models"]
    return model, ServerProcess(command, work / "server")


def group_server(work: Path, saved_model: Path | None) -> list[Row]:

    from serving.client import ServingClient, ServingClientError
    from serving.transport import MAX_MESSAGE_BYTES

    if saved_model is None:
        return []
    model, server = _serve(work, saved_model)
    rows = []
    try:
        with ServingClient(server.address, timeout=120) as client:
            good = _png()
            cases: dict[str, tuple[str, Callable[[], Any]]] = {
                "gRPC: PNG header claiming 20,000 x 20,000": (
                    "INVALID_ARGUMENT",
                    lambda: client.predict_bytes([png_claiming(20_000, 20_000)], model=model),
                ),
                "gRPC: PNG header claiming 4,000 x 5,000 (just over 16 MP)": (
                    "INVALID_ARGUMENT",
                    lambda: client.predict_bytes([png_claiming(4_000, 5_000)], model=model),
                ),
                "gRPC: bytes that are no image": (
                    "INVALID_ARGUMENT",
                    lambda: client.predict_bytes([b"GIF89a but not really"], model=model),
                ),
                "gRPC: JPEG cut after its header": (
                    "INVALID_ARGUMENT",
                    lambda: client.predict_bytes([_jpeg()[:200]], model=model),
                ),
                "gRPC: a message over 16 MB": (
                    "RESOURCE_EXHAUSTED",
                    lambda: client.predict_bytes([b"\0" * (MAX_MESSAGE_BYTES + 1024)], model=model),
                ),
                "gRPC: a float tensor for image_bytes": (
                    "INVALID_ARGUMENT",
                    lambda: client.predict(
                        {"image_bytes": np.zeros((1,), np.float32)}, model=model
                    ),
                ),
                "gRPC: an unknown model name with a path in it": (
                    "NOT_FOUND",
                    lambda: client.predict_bytes([good], model="../../etc/passwd"),
                ),
                "gRPC: an empty batch": (
                    "INVALID_ARGUMENT",
                    lambda: client.predict_bytes([], model=model),
                ),
            }
            for name, (expected, call) in cases.items():
                try:
                    call()
                    outcome = "OK"
                except ServingClientError as error:
                    outcome = f"{error.code.name}: {error.details[:160]}"
                except Exception as error:
                    outcome = f"client error {type(error).__name__}: {str(error)[:160]}"
                alive = server.process.poll() is None
                answered = client.predict_bytes([good], model=model)["probabilities"].shape
                rows.append(_case(name, expected, outcome, up=alive and answered[0] == 1))
    finally:
        code = server.stop()
    rows.append(_case("gRPC server: SIGTERM after the hostile calls", "exit 0", f"exit {code}"))
    return rows


def group_sidecar(work: Path, saved_model: Path | None) -> list[Row]:

    import yaml

    from serving.client import ServingClient
    from serving.process import SIDECAR, ServerProcess
    from serving.request_log import OPEN_SUFFIX, read_logs

    if saved_model is None:
        return []
    model, server = _serve(work, saved_model)
    rows = []
    logs = work / "logs"
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["request_log"].update(directory=str(logs), sampling_rate=1.0, queue_mb=64)
    params_file = work / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    try:
        sidecar = ServerProcess(
            ["sidecar", "--upstream", server.address, "--params", str(params_file),
             "--log-folder", "pod-a"],
            work / "sidecar", module=SIDECAR,
        )  # fmt: skip
        images = [_png(seed=i) for i in range(40)]
        with ServingClient(sidecar.address, timeout=120) as client:
            for image in images:
                client.predict_bytes([image], model=model)
            big = [b"\0" * (15 << 20)]
            refused = 0
            for _ in range(6):  # 15 MB each: refused by the model, logged or dropped, bounded
                try:
                    client.predict_bytes(big, model=model)
                except Exception:
                    refused += 1
        rss = _rss_mb(sidecar.process.pid)
        sidecar.process.send_signal(signal.SIGKILL)
        sidecar.process.wait()
        rows.append(
            _case(
                "sidecar: six 15 MB requests after 40 images",
                "bounded",
                f"{refused} refused by the model; sidecar RSS {rss:.0f} MB with a 64 MB queue: "
                + ("bounded" if rss <= 64 + 200 else "over the bound + 200 MB"),
                up=True,
            )
        )
        sidecar.log.close()
        again = ServerProcess(
            ["sidecar", "--upstream", server.address, "--params", str(params_file),
             "--log-folder", "pod-b"],
            work / "sidecar2", module=SIDECAR,
        )  # fmt: skip
        again.stop()
        records = sum(1 for _ in read_logs(logs))
        left_open = len(list(logs.rglob("*" + OPEN_SUFFIX)))
        rows.append(
            _case(
                "SIGKILL of the sidecar, then a new one starts",
                "0 left open",
                f"{records} of 40 image calls readable after the restart; {left_open} left open",
                up=False,
                lost=40 - min(records, 40),
                bound=40,
            )
        )
    finally:
        server.stop()
    return rows


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):  # the peak resident set
            return int(line.split()[1]) / 1024
    return float("nan")


GROUPS: dict[str, Callable[[Path, Path | None], list[Row]]] = {
    "feedback": group_feedback,
    "images": group_images,
    "request_log": group_request_log,
    "monitor": group_monitor,
    "server": group_server,
    "sidecar": group_sidecar,
}


def run_group(name: str, work: Path, saved_model: Path | None) -> list[Row]:
    """One group in a fresh process: its rows, each with the process's peak memory, and the
    files written outside ``work`` (a sibling canary folder stays empty)."""
    work.mkdir(parents=True, exist_ok=True)
    canary = work.parent / f"{work.name}-canary"
    canary.mkdir(exist_ok=True)
    argv = [sys.executable, "-m", "bench.faults", "--group", name, "--work", str(work)]
    if saved_model is not None:
        argv += ["--saved-model", str(saved_model)]
    done = subprocess.run(argv, cwd=PROJECT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"fault group {name} failed:\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
        )
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    outside = len(_files(canary))
    for row in rows:
        row["group"] = name
        row["files_outside"] += outside
    return rows


def _child(name: str, work: Path, saved_model: Path | None) -> None:
    rows = GROUPS[name](work, saved_model)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for row in rows:
        row["peak_rss_mb"] = round(peak, 1)
    print(json.dumps(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", choices=sorted(GROUPS), help="run one group (a child)")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--saved-model", type=Path, help="default: the newest in models/")
    parser.add_argument("--out", type=Path, default=Path("bench/results/faults.json"))
    args = parser.parse_args()
    if args.group:
        _child(args.group, args.work, args.saved_model)
        return
    import tempfile

    from bench.machine import describe
    from bench.serving import latest_version

    saved_model = args.saved_model
    if saved_model is None:
        newest = sorted((PROJECT / "models").glob("*/"))
        saved_model = latest_version(newest[0]) if newest else None
    started = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        for name in GROUPS:
            group = run_group(name, Path(tmp) / name, saved_model)
            for row in group:
                flag = "ok  " if row["ok"] and row["files_outside"] == 0 else "FAIL"
                print(f"{flag} {row['case']}: {row['outcome'][:150]}", flush=True)
            rows += group
    report = {
        "machine": describe(),
        "saved_model": str(saved_model),
        "cases": len(rows),
        "as_expected": sum(r["ok"] for r in rows),
        "files_outside": sum(r["files_outside"] for r in rows),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{report['as_expected']}/{report['cases']} cases as expected, "
        f"{report['files_outside']} files outside their folders -> {args.out}"
    )


if __name__ == "__main__":
    main()
