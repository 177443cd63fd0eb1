"""The request log's writer, without a server: records, rotation, the size bound, retention,
sampling, and drops that never reach the caller. (Through the sidecar in front of a real
server: tests/code/test_serving.py.)"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from serving.request_log import (
    OPEN_SUFFIX,
    RECORD_OVERHEAD,
    LogSettings,
    RequestLog,
    closed_logs,
    read_logs,
    read_tfrecords,
    tfrecord_frame,
)
from serving.tensors import API_MODULES, LOG_MODULES, apis, to_proto

M = apis(API_MODULES + LOG_MODULES)


def settings(directory: Path, **overrides) -> LogSettings:
    values = {
        "directory": directory,
        "sampling_rate": 1.0,
        "max_file_bytes": 1 << 20,
        "rotate_seconds": 3600.0,
        "max_total_bytes": 8 << 20,
        "retention_seconds": 86400.0,
        "queue_bytes": 1 << 22,
    }
    return LogSettings(**{**values, **overrides})


def call(index: int, version: int = 3) -> tuple[bytes, bytes]:
    """A Predict request with one encoded 'image' and its response, serialized."""
    request = M.predict_pb2.PredictRequest()
    request.model_spec.name = "cells"
    to_proto(
        np.array([b"png-%d" % index + bytes(500)], dtype=object), request.inputs["image_bytes"]
    )
    response = M.predict_pb2.PredictResponse()
    response.model_spec.name = "cells"
    response.model_spec.version.value = version
    to_proto(np.array([[0.25, 0.75]], np.float32), response.outputs["probabilities"])
    return request.SerializeToString(), response.SerializeToString()


def test_records_are_the_calls_with_the_version_and_time_that_answered(tmp_path):
    clock = iter(range(1_700_000_000, 1_800_000_000))
    log = RequestLog(settings(tmp_path), clock=lambda: float(next(clock)))
    calls = [call(i) for i in range(5)]
    for request, response in calls:
        assert log.offer("predict", request, response)
    classify = M.classification_pb2.ClassificationRequest()
    classify.model_spec.name = "cells"
    classify.input.example_list.examples.add()
    answer = M.classification_pb2.ClassificationResponse()
    answer.model_spec.version.value = 3
    answer.result.classifications.add().classes.add(label="a", score=0.5)
    log.offer("classify", classify.SerializeToString(), answer.SerializeToString())
    log.close()

    assert not list(tmp_path.glob(f"*{OPEN_SUFFIX}"))  # closed on close()
    records = [record for _, record in read_logs(tmp_path)]
    assert len(records) == 6 and log.counts["written"] == 6
    for (request, response), record in zip(calls, records, strict=False):
        assert record.predict_log.request.SerializeToString() == request
        assert record.predict_log.response.SerializeToString() == response
        assert record.log_metadata.model_spec.name == "cells"
        assert record.log_metadata.model_spec.version.value == 3
        assert record.log_metadata.sampling_config.sampling_rate == 1.0
    stamps = [r.log_metadata.timestamp_secs for r in records]
    assert stamps == sorted(stamps) and stamps[0] >= 1_700_000_000
    assert records[-1].classify_log.response == answer


def test_files_rotate_by_size_and_age_and_the_folder_stays_bounded(tmp_path):
    now = [1_000_000.0]
    log = RequestLog(
        settings(tmp_path, max_file_bytes=4000, max_total_bytes=12000, rotate_seconds=60.0),
        clock=lambda: now[0],
    )
    for i in range(40):
        log.offer("predict", *call(i))
    log.flush()
    sizes = [p.stat().st_size for p in closed_logs(tmp_path)]
    assert log.counts["files_closed"] >= 5 and log.counts["files_deleted_size"] >= 1
    assert sum(sizes) <= 12000 and max(sizes) < 4000 + 1500  # one record past the size
    kept = sum(1 for _ in read_logs(tmp_path))
    assert kept < 40 and log.counts["written"] == 40

    log.offer("predict", *call(99))
    log.flush()
    assert list(tmp_path.glob(f"*{OPEN_SUFFIX}"))  # a young file stays open...
    now[0] += 61
    log.offer("predict", *call(100))  # ...until it is older than rotate_seconds
    log.flush()
    assert log.counts["files_closed"] >= 6
    log.close()


def test_retention_deletes_old_files(tmp_path):
    now = [2_000_000.0]
    log = RequestLog(settings(tmp_path, retention_seconds=3600.0), clock=lambda: now[0])
    log.offer("predict", *call(0))
    log.close()
    (old,) = closed_logs(tmp_path)
    import os

    os.utime(old, (now[0] - 7200, now[0] - 7200))  # written two hours ago
    log = RequestLog(settings(tmp_path, retention_seconds=3600.0), clock=lambda: now[0])
    log.offer("predict", *call(1))
    log.close()
    assert not old.exists() and log.counts["files_deleted_retention"] == 1
    assert len(closed_logs(tmp_path)) == 1


def test_sampling_logs_the_drawn_fraction(tmp_path):
    draws = iter(np.random.default_rng(0).random(1000))
    log = RequestLog(
        settings(tmp_path, sampling_rate=0.25, queue_bytes=1 << 26), sample=lambda: next(draws)
    )
    queued = sum(log.offer("predict", *call(i)) for i in range(1000))
    log.close()
    assert queued == log.counts["written"] == sum(1 for _ in read_logs(tmp_path))
    assert 200 <= queued <= 300


def test_a_failing_log_folder_drops_records_and_never_raises(tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the log folder should be")
    log = RequestLog(settings(blocked))
    for i in range(5):
        assert log.offer("predict", *call(i))  # the caller sees no error
    log.close()
    assert log.counts["dropped_write_error"] == 5 and log.counts["written"] == 0
    assert "not-a-folder" in log.last_error


@pytest.fixture
def stuck_writer(monkeypatch) -> threading.Event:
    """The log's writer thread waits (up to 10 s) until the returned event is set."""
    release = threading.Event()
    real_write = RequestLog._write

    def stuck(self, *item):
        release.wait(10)
        real_write(self, *item)

    monkeypatch.setattr(RequestLog, "_write", stuck)
    return release


def test_a_full_queue_drops_and_counts_without_blocking(tmp_path, stuck_writer):
    release = stuck_writer
    request, response = call(0)
    one = len(request) + len(response) + RECORD_OVERHEAD
    log = RequestLog(settings(tmp_path, queue_bytes=4 * one))
    offered = [log.offer("predict", *call(i)) for i in range(20)]
    release.set()
    log.close()
    dropped = log.counts["dropped_queue_full"]
    assert dropped >= 20 - 5 and offered.count(False) == dropped
    assert log.counts["written"] == 20 - dropped


def test_tfrecord_checksums_catch_a_corrupt_record(tmp_path):
    path = tmp_path / "x.tfrecord"
    path.write_bytes(tfrecord_frame(b"first") + tfrecord_frame(b"second"))
    assert list(read_tfrecords(path)) == [b"first", b"second"]
    data = bytearray(path.read_bytes())
    data[-6] ^= 0xFF  # a byte of "second"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"x.tfrecord: truncated or corrupt TFRecord at byte 21"):
        list(read_tfrecords(path))


def _open_file(folder: Path, records: list[bytes], tail: bytes = b"") -> Path:
    """A ``.open`` log file as a writer killed mid-record leaves it: whole records, then
    ``tail`` (the start of one more)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"requests-20261206T000000-dead0000-000001{OPEN_SUFFIX}"
    path.write_bytes(b"".join(tfrecord_frame(r) for r in records) + tail)
    return path


def test_retention_and_the_bound_cover_every_pods_folder_of_the_root(tmp_path):
    """A rollout replaces pods, and with them the folder names: the new pod's writer applies
    retention and the size bound to the whole log root, so the old pods' images go when due
    and count toward the bound, and their emptied folders go too."""
    import os

    now = [3_000_000.0]
    old_pod = tmp_path / "serving-old"
    log = RequestLog(settings(tmp_path, folder="serving-old"), clock=lambda: now[0])
    for i in range(3):
        log.offer("predict", *call(i))
    log.close()
    (expired,) = closed_logs(old_pod)
    os.utime(expired, (now[0] - 7200, now[0] - 7200))
    other = RequestLog(settings(tmp_path, folder="serving-other"), clock=lambda: now[0])
    other.offer("predict", *call(9))
    other.close()
    (kept,) = closed_logs(tmp_path / "serving-other")

    size = kept.stat().st_size
    new = RequestLog(
        settings(
            tmp_path, folder="serving-new", retention_seconds=3600.0, max_total_bytes=size + 100
        ),
        clock=lambda: now[0],
    )
    assert not expired.exists() and not old_pod.exists()  # retention, then the empty folder
    assert new.counts["files_deleted_retention"] == 1
    new.offer("predict", *call(10))
    new.close()  # its own file closes: the total is over the bound, the oldest file goes
    assert not kept.exists() and new.counts["files_deleted_size"] == 1
    assert [p.parent.name for p in closed_logs(tmp_path)] == ["serving-new"]


def test_a_killed_writers_open_file_is_salvaged_and_a_live_one_is_left_alone(tmp_path):
    """Left ``.open`` by a SIGKILL (no writer holds its lock), a file is cut after its last
    whole record and closed by the next writer, wherever it is under the root, so the monitor
    reads its records and retention and the bound count it; another live writer's open file
    is not touched. Files holding images are owner-only."""
    records = [b"first record", b"second record"]
    live = RequestLog(settings(tmp_path, folder="serving-live"))
    live.offer("predict", *call(0))
    live.flush()
    (held,) = (tmp_path / "serving-live").glob(f"*{OPEN_SUFFIX}")
    dead = _open_file(tmp_path / "serving-killed", records, tail=tfrecord_frame(b"third")[:9])

    log = RequestLog(settings(tmp_path, folder="serving-new"))
    assert not dead.exists() and held.exists()
    salvaged = dead.with_name(dead.name.removesuffix(".open"))
    assert list(read_tfrecords(salvaged)) == records
    log.close()
    live.close()
    # the new writer's start-up pass, or the live writer's idle one: either salvages it once
    assert log.counts["files_salvaged"] + live.counts["files_salvaged"] == 1
    assert log.counts["bytes_cut"] + live.counts["bytes_cut"] == 9
    for path in closed_logs(tmp_path):
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert (tmp_path / "serving-live").stat().st_mode & 0o777 == 0o700


def test_a_failed_write_closes_the_file_readable_instead_of_orphaning_it(tmp_path, monkeypatch):
    log = RequestLog(settings(tmp_path))
    log.offer("predict", *call(0))
    log.flush()
    real = RequestLog._record

    def broken(self, kind, request, response, when):
        raise OSError("No space left on device")

    monkeypatch.setattr(RequestLog, "_record", broken)
    log.offer("predict", *call(1))
    log.flush()
    monkeypatch.setattr(RequestLog, "_record", real)
    assert not list(tmp_path.glob(f"*{OPEN_SUFFIX}"))
    assert sum(1 for _ in read_logs(tmp_path)) == 1 and log.counts["dropped_write_error"] == 1
    log.close()


def test_the_queue_is_bounded_in_bytes_under_a_flood_of_large_calls(tmp_path, stuck_writer):
    """16 MB requests (the message cap) while the writer is stuck: what waits stays within
    ``queue_bytes``; everything beyond is dropped and counted, never blocking the caller."""
    release = stuck_writer
    big = b"x" * (16 << 20)
    log = RequestLog(settings(tmp_path, queue_bytes=64 << 20, max_file_bytes=1 << 30))
    offered = [log.offer("predict", big, b"") for _ in range(40)]
    assert offered.count(True) == 3  # 3 x (16 MB + overhead) fit in 64 MB, a 4th does not
    assert log._queued_bytes <= 64 << 20
    release.set()
    log.close()
    assert log.counts["dropped_queue_full"] == 37
