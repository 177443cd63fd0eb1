"""The request log: sampled Predict and Classify calls, with their responses, as TF Serving's own
``tensorflow.serving.PredictionLog`` records (the warmup file's format) in rotated TFRecord files.

TF Serving keeps no request log of its own (tensorflow/serving#2223), so the logging sidecar
(``serving/sidecar.py``) hands each sampled call to a ``RequestLog``. The request path only
draws the sample and queues the raw bytes; a writer thread builds the record and writes it. A
full queue, a full disk or any failed write drops the record, counts it and never fails the
request; the queue is bounded in bytes (``queue_mb``), not in records. A file is written as
``*.tfrecord.open`` (owner-only: it holds user images), locked while its writer holds it, and
renamed ``*.tfrecord`` when it is closed (past ``max_file_mb`` or ``rotate_seconds``, or after a
failed write): readers (``imgpipe monitor``) take closed files only. A ``.open`` file that no
writer holds (its process was killed) is salvaged by the next writer anywhere under the log root:
cut after its last whole record and closed. Retention (``retention_hours``) and the size bound
(``max_total_mb``: the oldest closed files go first, open files count) apply to the whole log root
(``directory``): every pod's folder, also those of pods a rollout replaced, one writer at a time
(a lock file in the root). Neither side loads TensorFlow: TFRecord framing is written here with
``google-crc32c``.

    log = RequestLog(LogSettings.from_params(params["request_log"]))
    log.offer("predict", request_bytes, response_bytes)  # never raises, never blocks
    log.close()
    for path, record in read_logs(Path("outputs/request_logs")):  # PredictionLog protos
        ...
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
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
BOUND_LOCK = ".bound.lock"
"""In the log root: held by the one writer applying retention and the bound at a time."""
RECORD_OVERHEAD = 512
"""Bytes counted per queued record beyond its request and response (the queue's own objects),
so that a flood of tiny calls is bounded too."""


def _masked_crc(data: bytes) -> bytes:
    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF)


def tfrecord_frame(record: bytes) -> bytes:
    """One TFRecord: length, its masked CRC32C, the data, its masked CRC32C."""
    length = struct.pack("<Q", len(record))
    return length + _masked_crc(length) + record + _masked_crc(record)


def whole_records_end(path: Path) -> int:
    """The byte offset just after the last whole, checksummed record of a TFRecord file: what
    is left of it once a cut-off or corrupt tail is removed."""
    end = 0
    with open(path, "rb") as file:
        while len(header := file.read(12)) == 12 and _masked_crc(header[:8]) == header[8:]:
            (length,) = struct.unpack("<Q", header[:8])
            data, crc = file.read(length), file.read(4)
            if len(data) < length or _masked_crc(data) != crc:
                break
            end += 16 + length
    return end


def _salvage(path: Path) -> int:
    """Close an open log file its writer left (killed, or after a failed write): cut it after
    its last whole record and rename it closed. Returns the bytes cut off."""
    size = path.stat().st_size
    end = whole_records_end(path)
    if end < size:
        os.truncate(path, end)
    path.chmod(0o600)  # it holds user images (an older writer may have used the umask)
    path.rename(path.with_name(path.name.removesuffix(".open")))
    return size - end


def _unheld(path: Path) -> bool:
    """Whether no writer holds ``path`` (its lock is free); False if it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)  # releases the lock taken here
    return True


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
    """Where and how much to log (params.yaml's ``request_log`` section, the folders resolved)."""

    directory: Path
    """The log root: retention and the size bound apply to everything under it."""
    sampling_rate: float
    max_file_bytes: int
    rotate_seconds: float
    max_total_bytes: int
    retention_seconds: float
    queue_bytes: int
    folder: str = ""
    """This writer's folder under the root (a pod's name); empty: the root itself."""

    @property
    def own_directory(self) -> Path:
        return self.directory / self.folder if self.folder else self.directory

    @classmethod
    def from_params(
        cls, params: Any, directory: Path | None = None, folder: str = ""
    ) -> LogSettings:
        """From a ``RequestLogParams``; ``directory`` replaces the params' log root, ``folder``
        is this writer's folder under it (a pod's, on the shared volume)."""
        return cls(
            directory=Path(directory or params.directory),
            sampling_rate=params.sampling_rate,
            max_file_bytes=int(params.max_file_mb * 2**20),
            rotate_seconds=params.rotate_seconds,
            max_total_bytes=int(params.max_total_mb * 2**20),
            retention_seconds=params.retention_hours * 3600.0,
            queue_bytes=int(params.queue_mb * 2**20),
            folder=folder,
        )


class RequestLog:
    """Sampled calls to rotated TFRecord files of ``PredictionLog`` records, off the request
    path. ``counts`` says what happened to every sampled call: ``written``, ``dropped_queue_full``,
    ``dropped_write_error``; and to files: ``files_closed``, ``files_deleted_size``,
    ``files_deleted_retention``, ``files_salvaged`` (left open by a killed writer) and
    ``bytes_cut`` (their unfinished last records)."""

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
        self._queue: queue.Queue[Any] = queue.Queue()
        self._queued_bytes = 0
        self._queued_lock = threading.Lock()
        self._file: Any = None
        self._path: Path | None = None
        self._opened = 0.0
        self._sequence = 0
        self._writer_id = secrets.token_hex(4)  # a restarted container has the same PID
        self._messages = apis(API_MODULES + LOG_MODULES)
        self._bound()  # salvages what writers killed before this one left open
        self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)
        self._thread.start()

    def offer(self, kind: str, request: bytes, response: bytes) -> bool:
        """Log one answered call (serialized request and response) if it is sampled; whether it
        was queued. Never raises and never blocks: a full queue drops the record."""
        if self.sample() >= self.settings.sampling_rate:
            return False
        size = len(request) + len(response) + RECORD_OVERHEAD
        with self._queued_lock:
            if self._queued_bytes + size > self.settings.queue_bytes:
                self.counts["dropped_queue_full"] += 1
                return False
            self._queued_bytes += size
        self._queue.put_nowait((kind, request, response, self.clock()))
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
                    self._close_file(last=True)
                    return
                self._write(*item)
            finally:
                if item is not _STOP:
                    with self._queued_lock:
                        self._queued_bytes -= len(item[1]) + len(item[2]) + RECORD_OVERHEAD
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
        directory = self.settings.own_directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._sequence += 1
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self.clock()))
        name = f"requests-{stamp}-{self._writer_id}-{self._sequence:06d}{OPEN_SUFFIX}"
        self._path = directory / name
        # Created under a name no other writer looks at, locked, then renamed: a file that is
        # seen as open is already held (else another writer's bound pass could find it free in
        # between, take it for a dead writer's and close it under this writer's hands).
        fresh = directory / f".{name}.new"
        try:
            fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except FileNotFoundError:  # another writer removed the folder while it was empty
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held while open: a free lock means its writer died
            os.rename(fresh, self._path)  # the folder is not empty now: no writer removes it
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                fresh.unlink()
            raise
        self._file = os.fdopen(fd, "ab")
        self._opened = self.clock()

    def _close_file(self, last: bool = False) -> None:
        """Close the open file (readable from now on) and apply the bound; ``last``: this
        writer stops, so its pass waits for another writer's instead of leaving it undone."""
        if self._file is None or self._path is None:
            if last:
                self._bound(wait=True)
            return
        try:
            self._file.close()
            self._path.rename(self._path.with_name(self._path.name.removesuffix(".open")))
            self.counts["files_closed"] += 1
        except OSError as error:
            log.warning("request log: could not close %s: %s", self._path, error)
        self._file = self._path = None
        self._bound(wait=last)

    def _discard_file(self) -> None:
        """After a failed write the open file may end in a partial record: close it, cut it
        after its last whole record and rename it closed (readable), and start a new one next
        time."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            if self._path is not None:
                with contextlib.suppress(OSError):
                    self.counts["bytes_cut"] += _salvage(self._path)
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

    def _bound(self, wait: bool = False) -> None:
        """Over the whole log root, by one writer at a time (others skip this pass, and make
        it at their next file or idle second; a writer that stops ``wait``s its turn, as no
        later pass of its own would count its last file): salvage open files no writer holds,
        delete closed files past retention, then the oldest closed files until everything
        (open files included) fits ``max_total_bytes``; remove emptied folders of other
        writers."""
        root = self.settings.directory
        try:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            lock = os.open(root / BOUND_LOCK, os.O_WRONLY | os.O_CREAT, 0o600)
        except OSError as error:
            log.warning("request log: could not apply the size bound or retention: %s", error)
            return
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return  # another writer is at it
            self._bound_locked(root)
        finally:
            os.close(lock)

    def _bound_locked(self, root: Path) -> None:
        for path in sorted(root.glob(f"**/*{OPEN_SUFFIX}")):
            if path != self._path and _unheld(path):
                try:
                    self.counts["bytes_cut"] += _salvage(path)
                    self.counts["files_salvaged"] += 1
                except OSError as error:
                    log.warning("request log: could not salvage %s: %s", path, error)
        now = self.clock()
        closed = []
        for path in closed_logs(root):
            with contextlib.suppress(FileNotFoundError):
                stat = path.stat()
                if now - stat.st_mtime > self.settings.retention_seconds:
                    self._delete(path, "files_deleted_retention")
                else:
                    closed.append((stat.st_mtime, stat.st_size, path))
        closed.sort()
        total = sum(size for _, size, _ in closed)
        for path in root.glob(f"**/*{OPEN_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        while closed and total > self.settings.max_total_bytes:
            _, size, oldest = closed.pop(0)
            total -= size
            self._delete(oldest, "files_deleted_size")
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            if folder != self.settings.own_directory:
                with contextlib.suppress(OSError):  # not empty, or gone
                    folder.rmdir()

    def _delete(self, path: Path, count: str) -> None:
        try:
            path.unlink()
            self.counts[count] += 1
        except FileNotFoundError:
            pass  # a reader or an older writer got there first
        except OSError as error:
            log.warning("request log: could not delete %s: %s", path, error)


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
