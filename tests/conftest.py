"""Shared test helpers: small synthetic images written with Pillow and numpy.

Tests import the plain functions (``from conftest import make_class_folders``); pytest puts this
folder on ``sys.path``. Every helper writes real, decodable files unless its name says otherwise,
and images made from different seeds never share bytes, so ingest never sees accidental duplicates.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import socket
import struct
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

GROUPS = ("e2e", "model", "data", "code")
"""The test folders, marked alike (``pytest -m model``): what a failing test says broke. e2e:
the whole pipeline through each orchestrator; model: a tiny model that really trains, and what
it learnt; data: reading, checking, splitting and augmenting images; code: the logic, on
made-up inputs (servers included).

Also the order they run in, longest first: each end-to-end module takes minutes of one worker,
so they start first and the short modules fill the other workers around them (``make test``
hands out whole modules in collection order: ``--dist loadfile --no-loadscope-reorder``).
Started last, as xdist's default order (most tests first) would, one of them alone made the
run's tail."""

LONG_POLES = (
    "model/test_export_registry.py",
    "model/test_training.py",
    "model/test_distribute.py",
    "model/test_ensemble.py",
    "code/test_serving.py",
    "model/test_ordinal.py",
)
"""After the end-to-end modules, the longest of the others, longest first (worker-seconds in
`make test` at 5782bdb on 2 cores: 283, 281, 157, 110, 85, 61; the next is 33): in folder
order, the two longest came last of the model folder and one worker ran on alone at the end
(1,004 s of wall time for 1,850 worker-seconds on 2 workers)."""


def _run_order(item: pytest.Item) -> tuple[int, int]:
    path = Path(str(item.fspath))
    group, name = GROUPS.index(path.parent.name), f"{path.parent.name}/{path.name}"
    if group == 0:
        return (0, 0)
    if name in LONG_POLES:
        return (1, LONG_POLES.index(name))
    return (1 + group, 0)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        group = Path(str(item.fspath)).parent.name
        if group not in GROUPS:
            raise pytest.UsageError(f"{item.nodeid}: a test lives in tests/{{{','.join(GROUPS)}}}/")
        item.add_marker(getattr(pytest.mark, group))
    items.sort(key=_run_order)  # stable: a module's tests keep their order


# Keep TensorFlow's start-up chatter out of the test output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Side by side under pytest-xdist, each worker's TensorFlow (and the stage processes it starts)
# sizes its thread pools to its share of the cores instead of all of them: oversubscribed pools
# only contend (tests/model/test_training.py with test_ensemble.py on 2 cores: 207 s, 215 s
# with TensorFlow's default pools).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(max(1, _share)))
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", str(max(1, _share)))

EXIF_ORIENTATION = 0x0112
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _size(size: int | Sequence[int]) -> tuple[int, int]:
    """``64`` or ``(width, height)`` -> ``(width, height)``."""
    if isinstance(size, int):
        return size, size
    width, height = size
    return int(width), int(height)


def class_pattern(class_index: int, size: int | Sequence[int] = 64, seed: int = 0) -> np.ndarray:
    """An ``HxWx3`` uint8 image whose look depends on ``class_index`` (a learnable signal) and whose
    exact pixels depend on ``seed`` (so no two images are equal).

    Classes differ by stripe orientation and frequency and by colour tint; the seed shifts the
    stripes' phase and adds a little noise.
    """
    width, height = _size(size)
    rng = np.random.default_rng([class_index, seed])
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    angle = np.pi * ((class_index * 0.38) % 1.0)
    period = 6.0 + 3.0 * (class_index % 4)
    phase = rng.uniform(0, 2 * np.pi)
    along = xx * np.cos(angle) + yy * np.sin(angle)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * along / period + phase)
    tint = (
        np.array(
            [
                (class_index * 97) % 256,
                (class_index * 57 + 80) % 256,
                (class_index * 151 + 160) % 256,
            ],
            dtype=np.float64,
        )
        / 255.0
    )
    image = stripes[..., None] * (0.35 + 0.65 * tint) * 255.0
    image += rng.normal(0.0, 6.0, size=image.shape)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def write_image(
    path: str | os.PathLike[str],
    image: Image.Image | np.ndarray,
    format: str | None = None,
    **save_kwargs: Any,
) -> Path:
    """Save ``image`` (a Pillow image or a numpy array) to ``path``, creating parent folders.

    ``format`` defaults to what the suffix says; ``save_kwargs`` go to ``Image.save``
    (``quality=``, ``exif=``, ``transparency=``...).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image.save(path, format=format, **save_kwargs)
    return path


def encode_image(image: Image.Image | np.ndarray, format: str = "PNG", **save_kwargs: Any) -> bytes:
    """The bytes ``write_image`` would write, without touching the disk."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save_kwargs)
    return buffer.getvalue()


def make_png(
    path: str | os.PathLike[str],
    size: int | Sequence[int] = (64, 64),
    color: int | Sequence[int] = (200, 60, 30),
    mode: str = "RGB",
    *,
    seed: int | None = None,
) -> Path:
    """A PNG filled with ``color`` in Pillow ``mode`` (``RGB``, ``L``, ``RGBA``...).

    With ``seed``, a few pixels are perturbed so that images of the same colour still differ.
    """
    width, height = _size(size)
    image = Image.new(mode, (width, height), color if isinstance(color, int) else tuple(color))
    if seed is not None:
        rng = np.random.default_rng(seed)
        for _ in range(4):
            xy = (int(rng.integers(width)), int(rng.integers(height)))
            pixel = image.getpixel(xy)
            if isinstance(pixel, tuple):
                image.putpixel(xy, tuple(int(v) ^ int(rng.integers(1, 256)) for v in pixel))
            else:
                image.putpixel(xy, int(pixel) ^ int(rng.integers(1, 256)))
    return write_image(path, image, format="PNG")


def make_class_folders(
    root: str | os.PathLike[str],
    classes: Mapping[str, int] | None = None,
    size: int | Sequence[int] = 64,
    seed: int = 0,
    ext: str = "png",
    pattern: Callable[..., np.ndarray] | None = None,
) -> dict[str, list[Path]]:
    """Write ``root/<class>/<class>_NNN.<ext>`` images, ``classes[name]`` of each; return the paths.

    Each class gets its own pattern (``pattern(class_index, size, seed=)``, default
    :func:`class_pattern`), each image its own seed, so every file is distinct. ``ext`` is
    ``png`` or ``jpg``.
    """
    pattern = pattern or class_pattern
    root = Path(root)
    classes = {"a": 12, "b": 12} if classes is None else dict(classes)
    fmt = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}[ext.lower()]
    written: dict[str, list[Path]] = {}
    for class_index, (name, count) in enumerate(sorted(classes.items())):
        paths = []
        for i in range(count):
            pixels = pattern(class_index, size, seed=seed * 100_003 + i)
            paths.append(write_image(root / name / f"{name}_{i:03d}.{ext}", pixels, format=fmt))
        (root / name).mkdir(parents=True, exist_ok=True)  # a class with 0 images: empty folder
        written[name] = paths
    return written


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def png_claiming_size(path: str | os.PathLike[str], width: int, height: int) -> Path:
    """A tiny (well under 1 KiB) PNG whose IHDR claims ``width x height`` pixels, with valid CRCs.

    Built from a real 4x4 PNG by rewriting IHDR, so parsers reach their size checks (a
    decompression bomb test) without anything large ever being allocated or written.
    """
    data = encode_image(np.zeros((4, 4, 3), np.uint8), "PNG")
    assert data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + data[24:29]  # keep depth, colour type, methods
    patched = PNG_SIGNATURE + _png_chunk(b"IHDR", ihdr) + data[33:]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(patched)
    return path


def jpeg_with_orientation(
    path: str | os.PathLike[str], pixels: np.ndarray, orientation: int, **save_kwargs: Any
) -> Path:
    """A JPEG of ``pixels`` (stored as-is) carrying EXIF Orientation ``orientation`` (1..8)."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return write_image(path, pixels, format="JPEG", exif=exif.tobytes(), **save_kwargs)


def sha256_of(path: str | os.PathLike[str]) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_digests(root: str | os.PathLike[str]) -> dict[str, str]:
    """Every entry under ``root`` (relative POSIX path) -> the sha256 of a file's bytes,
    ``"dir"`` for a folder, ``"link:<target>"`` for a symlink (not followed)."""
    root = Path(root)
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[rel] = f"link:{os.readlink(path)}"
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = sha256_of(path)
    return out


def read_csv_rows(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows of a UTF-8 CSV report as dicts."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_csv_rows(path: str | os.PathLike[str], rows: Sequence[Mapping[str, str]]) -> None:
    """``rows`` (dicts with the same keys) as a UTF-8 CSV, the keys as its header."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def class_folders(tmp_path: Path) -> tuple[Path, dict[str, list[Path]]]:
    """A fresh folder of two class folders (``a``, ``b``; 12 distinct 64x64 PNGs each)."""
    root = tmp_path / "data"
    return root, make_class_folders(root)


PROJECT = Path(__file__).resolve().parents[1]
"""The repository root, where the project's params.yaml lives."""


def params(name: str, **overrides: Any) -> Any:
    """The typed view of section ``name`` of the project's params.yaml, with ``overrides``
    applied and validated as the pipeline validates it: a misspelt or mistyped override is a
    ``ParamsError``, so a test cannot silently run on the project's value instead of its own.

    >>> params("ingest", val_fraction=0.2, test_fraction=0.2).seed
    42
    """
    from imgpipe.core.params import SECTIONS, load_params, section

    raw = load_params(PROJECT / "params.yaml")
    if name in raw:
        raw[name] = {**raw[name], **overrides}
    return section(SECTIONS[name], name, raw)


@pytest.fixture
def tmp_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """MLflow tracking into tmp_path/mlflow.db (the URI is yielded); afterwards no run is left
    active and the process-wide tracking URI that stage_run set is forgotten, so later tests
    do not write into this test's database."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield uri
    if mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)  # forget the tmp URI that stage_run set globally


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def mlflow_server(
    store: str, env: Mapping[str, str], *args: str, log: Path | None = None
) -> Iterator[str]:
    """MLflow's own server on ``store``, on 127.0.0.1 (``args``: more ``mlflow server`` flags);
    yields its URI once /health answers, and stops it through its process group (its workers
    too)."""
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    output = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", store,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1", *args],
        # No job runner: its three consumer processes import MLflow at every start, for
        # features (prompt optimisation, scorers) no test uses.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **env},
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, f"mlflow server exited {server.returncode}"
                assert time.monotonic() < deadline, "mlflow server not ready in 120 s"
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        if log:
            output.close()  # type: ignore[union-attr]


CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--virtual-time-budget=15000",
)


def rendered_dom(url: str, profile: Path) -> str:
    """The DOM of ``url`` (a page or a ``file://`` path) after headless Chromium rendered it
    (its scripts run, offline); skips where Chromium is not installed (.ci/run installs it)."""
    import shutil
    import subprocess

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("chromium is not on PATH (apt-get install chromium): page not rendered")
        pytest.skip("chromium is not on PATH (apt-get install chromium)")
    argv = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120).stdout


def postgres_bin() -> Path | None:
    """The folder of an installed PostgreSQL server's programs (Debian's
    ``/usr/lib/postgresql/<N>/bin``, or ``initdb`` on PATH); None where there is none."""
    import shutil

    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    installed = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return installed[-1].parent if installed else None


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """PostgreSQL started here for one test: a fresh cluster in a temporary folder, listening
    on 127.0.0.1 only, its user ``mlflow`` with a password (SCRAM) owning the database
    ``mlflow``; yields its SQLAlchemy URI, then stops the server by its PID and removes the
    folder. Run as ``postgres`` when this process is root (PostgreSQL refuses root). Skips
    where no PostgreSQL server is installed (``.ci/run`` installs Debian's)."""
    import secrets
    import shutil
    import signal
    import subprocess
    import tempfile
    import time

    bindir = postgres_bin()
    if bindir is None:
        missing = "no PostgreSQL server installed (Debian: apt-get install postgresql)"
        if os.environ.get("IMGPIPE_REQUIRE_POSTGRES"):
            pytest.fail(f"{missing}, and IMGPIPE_REQUIRE_POSTGRES is set")
        pytest.skip(missing)
    folder = Path(tempfile.mkdtemp(prefix="imgpipe-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        import pwd

        owner = pwd.getpwnam("postgres")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    folder.chmod(0o700)
    password = secrets.token_urlsafe(16)
    secret = folder / "password"
    secret.write_text(password)
    if as_user:
        os.chown(secret, owner.pw_uid, owner.pw_gid)
    data, port = folder / "data", free_port()

    def run(*argv: str) -> None:
        done = subprocess.run(
            [*as_user, *argv],
            capture_output=True,
            text=True,
            env={**os.environ, "PGPASSWORD": password},
        )
        assert done.returncode == 0, f"{argv[0]}: {done.stdout}{done.stderr}"

    run(str(bindir / "initdb"), "-D", str(data), "-U", "mlflow", "-E", "UTF8",
        "--auth=scram-sha-256", f"--pwfile={secret}")  # fmt: skip
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w",
        "-o", f"-h 127.0.0.1 -p {port} -k {folder}", "start")  # fmt: skip
    pid = int((data / "postmaster.pid").read_text().split()[0])
    try:
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow",
            "mlflow")  # fmt: skip
        yield f"postgresql://mlflow:{password}@127.0.0.1:{port}/mlflow"
    finally:
        os.kill(pid, signal.SIGINT)  # PostgreSQL's fast shutdown
        deadline = time.monotonic() + 30
        while (data / "postmaster.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        shutil.rmtree(folder, ignore_errors=True)


class TinyProject:
    """Paths of one tiny project: the stage outputs under ``root`` as dvc.yaml lays them out."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ingest = root / "outputs" / "ingest"
        self.augment = root / "outputs" / "augment"
        self.train = root / "outputs" / "train"
        self.model = self.train / "model.keras"
        self.train_history = root / "metrics" / "train_history.csv"
        self.train_metrics = root / "metrics" / "train.json"
        self.feature_cache = root / "cache"


def build_tiny_project(
    root: Path,
    classes: Mapping[str, int],
    image_size: int,
    model: Mapping[str, Any],
    train_params: Mapping[str, Any],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int = 3,
    pattern: Callable[..., np.ndarray] | None = None,
) -> TinyProject:
    """ingest -> augment (1 view per image) -> train (frozen base) in-process on class-pattern
    PNGs: a small model that really learns, in about 15 s. ``model`` and ``train_params``
    override the project's params.yaml sections of those names."""
    from components import augment, ingest, train

    p = TinyProject(root)
    make_class_folders(root / "data", classes, size=image_size, seed=seed, pattern=pattern)
    model_params = params("model", **model)
    ingest.run(
        source=root / "data",
        out=p.ingest,
        summary=root / "metrics" / "ingest.json",
        data=params("data", source=str(root / "data"), metadata_csv=None),
        ingest=params("ingest", val_fraction=val_fraction, test_fraction=test_fraction),
        validate=params("validate"),
        progress=False,
    )
    augment.run(
        shards=p.ingest / "shards",
        out=p.augment,
        summary=root / "metrics" / "augment.json",
        augment=params("augment", views_per_image=1, preview_images=2),
        model=model_params,
        progress=False,
    )
    train.run(
        augmented=p.augment / "shards",
        dataset=p.ingest,
        out=p.train,
        summary=p.train_metrics,
        history=p.train_history,
        feature_cache=p.feature_cache,
        model=model_params,
        train=params("train", **train_params),
        progress=False,
    )
    return p


def build_classifier(path: Path, labels: Sequence[str], seed: int, image_size: int = 32) -> Path:
    """A Lite0 classifier (ImageNet base, untrained head seeded by ``seed``) exported exactly
    as the export stage exports a trained one: the serving signatures. For serving tests, where
    what matters is the API, not the accuracy. Tests take it through ``export_classifier``."""
    import keras

    from imgpipe.export.savedmodel import write_saved_model
    from imgpipe.model import backbones
    from imgpipe.model.training import assemble, build_head

    keras.utils.set_random_seed(seed)
    base = backbones.create(
        params("model", backbone="efficientnet_lite0", weights="imagenet", image_size=image_size)
    )
    model = assemble(base, build_head(1280, len(labels), 0.0, 0, seed))
    write_saved_model(model, labels, image_size, path, params("serving").max_image_pixels)
    return path


ExportClassifier = Callable[..., Path]
"""``export_classifier(path, model_name, labels, seed, image_size=32, warmup=())``: the
SavedModel of ``build_classifier`` at ``path``, with a warmup file of ``warmup`` requests to
``model_name``; returns ``path``."""


@pytest.fixture(scope="session")
def export_classifier(tmp_path_factory: pytest.TempPathFactory) -> ExportClassifier:
    """``build_classifier`` once per (labels, seed, image size) in the whole run, copied where
    a test asks. Building the model and writing its signatures takes about 11 s here; the
    serving, scoring, TLS and fault tests ask for the same three models eight times. The
    workers of one xdist run share the built ones through their common temp folder, one build
    at a time under a file lock."""
    import fcntl
    import json
    import shutil

    from serving.warmup import write_warmup

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # this run's folder, above each worker's own
    cache = shared / "classifiers"
    cache.mkdir(exist_ok=True)

    def export(
        path: Path,
        model_name: str,
        labels: Sequence[str],
        seed: int,
        image_size: int = 32,
        warmup: Sequence[bytes] = (),
    ) -> Path:
        key = hashlib.sha256(json.dumps([list(labels), seed, image_size]).encode()).hexdigest()
        built = cache / key[:16]
        with open(cache / f"{built.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not built.is_dir():
                staging = cache / f".{built.name}.building"
                shutil.rmtree(staging, ignore_errors=True)
                build_classifier(staging, labels, seed, image_size)
                staging.rename(built)
        shutil.copytree(built, path)
        if warmup:
            write_warmup(path, model_name, warmup)
        return path

    return export
