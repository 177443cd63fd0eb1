"""The request log: sampled Predict and Classify calls, with their responses, as TF Serving's own
``tensorflow.serving.PredictionLog`` records (the warmup file's format) in rotated TFRecord files.

TF Serving keeps no request log of its own (tensorflow/serving#2223), so the logging sidecar
(``serving/sidecar.py``) hands each sampled call to a ``RequestLog``. The request path only
draws the sample and queues the raw bytes; a writer thread builds the record and writes it. A
full queue, a full disk or any failed write drops the record, counts it and never fails the
request. A file is written as ``*.tfrecord.open`` and renamed ``*.tfrecord`` when it is closed
(past ``max_file_mb`` or ``rotate_seconds``): readers (``imgpipe monitor``) take closed files
only. The folder is bounded (``max_total_mb``: the oldest files go first) and images are kept
``retention_hours`` at most. Neither side loads TensorFlow: TFRecord framing is written here
with ``google-crc32c``.

    log = RequestLog(LogSettings.from_params(params["request_log"]))
    log.offer("predict", request_bytes, response_bytes)  # never raises, never blocks
    log.close()
    for path, record in read_logs(Path("outputs/request_logs")):  # PredictionLog protos
        ...
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import secrets
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c

from serving.tensors import API_MODULES, LOG_MODULES, apis

log = logging.getLogger("serving.request_log")

SUFFIX, OPEN_SUFFIX = ".tfrecord", ".tfrecord.open"
KINDS = ("predict", "classify")
"""The calls that are logged: the ones whose request carries an image."""
_MASK_DELTA = 0xA282EAD8  # TFRecord's CRC mask (tensorflow/core/lib/hash/crc32c.h)
_STOP = object()


def _masked_crc(data: bytes) -> bytes:
    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF)


def tfrecord_frame(record: bytes) -> bytes:
    """One TFRecord: length, its masked CRC32C, the data, its masked CRC32C."""
    length = struct.pack("<Q", len(record))
    return length + _masked_crc(length) + record + _masked_crc(record)


def read_tfrecords(path: Path) -> Iterator[bytes]:
    """The records of a TFRecord file, checking both checksums of each; a corrupt or truncated
    record is an error naming the file and its offset."""
    with open(path, "rb") as file:
        offset = 0
        while header := file.read(12):
            if len(header) < 12 or _masked_crc(header[:8]) != header[8:]:
                raise ValueError(f"{path}: bad TFRecord length header at byte {offset}")
            (length,) = struct.unpack("<Q", header[:8])
            data, crc = file.read(length), file.read(4)
            if len(data) < length or _masked_crc(data) != crc:
                raise ValueError(f"{path}: truncated or corrupt TFRecord at byte {offset}")
            offset += 16 + length
            yield data


@dataclass(frozen=True)
class LogSettings:
    """Where and how much to log (params.yaml's ``request_log`` section, the folder resolved)."""

    directory: Path
    sampling_rate: float
    max_file_bytes: int
    rotate_seconds: float
    max_total_bytes: int
    retention_seconds: float
    queue_records: int

    @classmethod
    def from_params(cls, params: Any, directory: Path | None = None) -> LogSettings:
        """From a ``RequestLogParams``; ``directory`` replaces the params' folder (a pod's own
        folder on the shared volume)."""
        return cls(
            directory=Path(directory or params.directory),
            sampling_rate=params.sampling_rate,
            max_file_bytes=int(params.max_file_mb * 2**20),
            rotate_seconds=params.rotate_seconds,
            max_total_bytes=int(params.max_total_mb * 2**20),
            retention_seconds=params.retention_hours * 3600.0,
            queue_records=params.queue_records,
        )


class RequestLog:
    """Sampled calls to rotated TFRecord files of ``PredictionLog`` records, off the request
    path. ``counts`` says what happened to every sampled call: ``written``, ``dropped_queue_full``,
    ``dropped_write_error``; and to files: ``files_closed``, ``files_deleted_size``,
    ``files_deleted_retention``."""

    def __init__(
        self,
        settings: LogSettings,
        *,
        clock: Callable[[], float] = time.time,
        sample: Callable[[], float] = random.random,
    ) -> None:
        self.settings, self.clock, self.sample = settings, clock, sample
        self.counts: Counter[str] = Counter()
        self.last_error = ""
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=settings.queue_records)
        self._file: Any = None
        self._path: Path | None = None
        self._opened = 0.0
        self._sequence = 0
        self._writer_id = secrets.token_hex(4)  # a restarted container has the same PID
        self._messages = apis(API_MODULES + LOG_MODULES)
        self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)
        self._thread.start()

    def offer(self, kind: str, request: bytes, response: bytes) -> bool:
        """Log one answered call (serialized request and response) if it is sampled; whether it
        was queued. Never raises and never blocks: a full queue drops the record."""
        if self.sample() >= self.settings.sampling_rate:
            return False
        try:
            self._queue.put_nowait((kind, request, response, self.clock()))
        except queue.Full:
            self.counts["dropped_queue_full"] += 1
            return False
        return True

    def flush(self) -> None:
        """Wait until every queued record is written (or dropped)."""
        self._queue.join()

    def close(self) -> None:
        """Write what is queued, close the open file (it becomes readable) and stop."""
        self._queue.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=min(1.0, self.settings.rotate_seconds))
            except queue.Empty:
                self._maintain()
                continue
            try:
                if item is _STOP:
                    self._close_file()
                    return
                self._write(*item)
            finally:
                self._queue.task_done()

    def _record(self, kind: str, request: bytes, response: bytes, when: float) -> bytes:
        m = self._messages
        if kind == "predict":
            call = m.predict_pb2.PredictRequest.FromString(request)
            answer = m.predict_pb2.PredictResponse.FromString(response)
            body = {"predict_log": m.prediction_log_pb2.PredictLog(request=call, response=answer)}
        else:
            call = m.classification_pb2.ClassificationRequest.FromString(request)
            answer = m.classification_pb2.ClassificationResponse.FromString(response)
            body = {"classify_log": m.prediction_log_pb2.ClassifyLog(request=call, response=answer)}
        metadata = m.logging_pb2.LogMetadata(timestamp_secs=int(when))
        metadata.model_spec.CopyFrom(answer.model_spec)  # the version that answered
        metadata.sampling_config.sampling_rate = self.settings.sampling_rate
        return m.prediction_log_pb2.PredictionLog(log_metadata=metadata, **body).SerializeToString()

    def _write(self, kind: str, request: bytes, response: bytes, when: float) -> None:
        try:
            frame = tfrecord_frame(self._record(kind, request, response, when))
            self._rotate_if_old()
            if self._file is None:
                self._open()
            self._file.write(frame)
            self._file.flush()
            self.counts["written"] += 1
        except Exception as error:  # a full disk, a gone folder, a bad message: drop, go on
            self.counts["dropped_write_error"] += 1
            if str(error) != self.last_error:
                log.warning("request log: record dropped: %s", error)
            self.last_error = str(error)
            self._discard_file()
            return
        if self._file.tell() >= self.settings.max_file_bytes:
            self._close_file()

    def _open(self) -> None:
        self.settings.directory.mkdir(parents=True, exist_ok=True)
        self._sequence += 1
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self.clock()))
        name = f"requests-{stamp}-{self._writer_id}-{self._sequence:06d}{OPEN_SUFFIX}"
        self._path = self.settings.directory / name
        self._file = open(self._path, "ab")  # noqa: SIM115 (kept open across records)
        self._opened = self.clock()

    def _close_file(self) -> None:
        if self._file is None or self._path is None:
            return
        try:
            self._file.close()
            self._path.rename(self._path.with_name(self._path.name.removesuffix(".open")))
            self.counts["files_closed"] += 1
        except OSError as error:
            log.warning("request log: could not close %s: %s", self._path, error)
        self._file = self._path = None
        self._bound()

    def _discard_file(self) -> None:
        """After a failed write the open file may end in a partial record: close it as it is
        (readers stop at the bad record) and start a new one next time."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
            self._path = None

    def _rotate_if_old(self) -> None:
        if self._file is not None and self.clock() - self._opened >= self.settings.rotate_seconds:
            self._close_file()  # applies the bound

    def _maintain(self) -> None:
        """When idle: rotate an open file past its age; apply retention and the size bound
        (which also run whenever a file is closed, not on every record)."""
        if self._file is not None and self.clock() - self._opened >= self.settings.rotate_seconds:
            self._close_file()
        else:
            self._bound()

    def _bound(self) -> None:
        try:
            closed = sorted(
                closed_logs(self.settings.directory, recursive=False),
                key=lambda p: p.stat().st_mtime,
            )
            now = self.clock()
            for path in closed:
                if now - path.stat().st_mtime > self.settings.retention_seconds:
                    path.unlink()
                    self.counts["files_deleted_retention"] += 1
            closed = [p for p in closed if p.exists()]
            total = sum(p.stat().st_size for p in closed)
            if self._file is not None:
                total += self._file.tell()
            while closed and total > self.settings.max_total_bytes:
                oldest = closed.pop(0)
                total -= oldest.stat().st_size
                oldest.unlink()
                self.counts["files_deleted_size"] += 1
        except OSError as error:
            log.warning("request log: could not apply the size bound or retention: %s", error)


def closed_logs(directory: Path, recursive: bool = True) -> list[Path]:
    """The closed log files under ``directory`` (every pod's folder when ``recursive``)."""
    if not directory.is_dir():
        return []
    pattern = f"**/*{SUFFIX}" if recursive else f"*{SUFFIX}"
    return sorted(directory.glob(pattern))


def read_logs(directory: Path, skip: Iterable[str] = ()) -> Iterator[tuple[Path, Any]]:
    """Every ``PredictionLog`` in the closed files under ``directory`` (oldest file first),
    except files whose path relative to ``directory`` is in ``skip``."""
    m = apis(API_MODULES + LOG_MODULES)
    skipped = set(skip)
    for path in closed_logs(directory):
        if str(path.relative_to(directory)) in skipped:
            continue
        for data in read_tfrecords(path):
            yield path, m.prediction_log_pb2.PredictionLog.FromString(data)
