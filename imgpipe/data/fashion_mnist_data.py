"""fashion-mnist-data: Fashion-MNIST (Xiao et al. 2017, MIT licence) from Debian's
``dataset-fashion-mnist`` package as a folder of class folders of PNG files.

The package installs the four idx files under ``/usr/share/datasets/fashion-mnist``: 60,000
training and 10,000 test images, 28x28 grayscale, 10 classes. Nothing is downloaded.

``sets=("t10k",)`` (the default) writes ``<class>/t10k_<index>.png``; with both sets the
official split is kept as ``train/<class>/`` and ``test/<class>/``, which ingest keeps (and
carves validation from ``train/``). ``per_class=N`` keeps the first N images of each class of
each set in the file's own order (already shuffled by the authors): stratified, and the same
on every machine. The PNG bytes depend only on the pixels, so the folder is reproducible.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from imgpipe.core.errors import InputError
from imgpipe.core.fileio import atomic_path

PACKAGE = "dataset-fashion-mnist"
INSTALL = f"apt-get install {PACKAGE}"
DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
LICENSE = "MIT (Zalando SE, Xiao et al. 2017)"
# Label index -> class folder (the labels table of the data set's README).
CLASSES = (
    "tshirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
_SPLIT_FOLDER = {"train": "train", "t10k": "test"}  # each set's folder when both are written
SETS = tuple(_SPLIT_FOLDER)
_IMAGES_MAGIC = 0x0803  # unsigned byte, 3 dimensions
_LABELS_MAGIC = 0x0801  # unsigned byte, 1 dimension


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzipped or not) as a uint8 array of the shape its header gives."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise InputError(f"{path}: not an idx file (too short)")
    (magic,) = struct.unpack(">I", data[:4])
    if magic not in (_IMAGES_MAGIC, _LABELS_MAGIC):
        raise InputError(f"{path}: not an unsigned-byte idx file (magic {magic:#010x})")
    ndim = magic & 0xFF
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    if len(body) != int(np.prod(shape)):
        raise InputError(f"{path}: header says {shape}, body holds {len(body)} bytes")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _find(source: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (source / name).is_file():
            return source / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {source}/: install Debian's {PACKAGE} "
        f"(`{INSTALL}`), or pass --source DIR holding the four idx files"
    )


def load(source: Path, which: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) and labels (N,) of one set, ``train`` or ``t10k``."""
    images = read_idx(_find(source, f"{which}-images-idx3-ubyte"))
    labels = read_idx(_find(source, f"{which}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise InputError(
            f"{source}: {which} images {images.shape} do not match labels {labels.shape}"
        )
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise InputError(f"{source}: {which} labels hold {int(labels.max())}, past the 10 classes")
    return images, labels


def select(labels: np.ndarray, per_class: int | None) -> np.ndarray:
    """Indices to keep: all, or the first ``per_class`` of each class in file order."""
    if per_class is None:
        return np.arange(len(labels))
    if per_class < 1:
        raise InputError(f"per_class must be at least 1, got {per_class}")
    keep = [np.flatnonzero(labels == c)[:per_class] for c in range(len(CLASSES))]
    return np.sort(np.concatenate(keep))


def run(
    target: Path,
    *,
    source: Path = DEFAULT_SOURCE,
    sets: Sequence[str] = ("t10k",),
    per_class: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> int:
    """Write Fashion-MNIST to ``target`` as class folders; return the number of images.

    An existing ``target`` is an error unless ``force`` (it is then replaced in one rename).
    """
    target, source = Path(target), Path(source)
    unknown = [s for s in sets if s not in SETS]
    if unknown or not sets or len(set(sets)) != len(sets):
        raise InputError(f"sets must be distinct names among {', '.join(SETS)}; got {list(sets)}")
    if target.exists() and not force:
        raise FileExistsError(f"{target}/ exists; move it away or pass --force to replace it")
    loaded = {which: load(source, which) for which in sets}
    written = 0
    with atomic_path(target) as out:
        for which, (images, labels) in loaded.items():
            base = out / _SPLIT_FOLDER[which] if len(sets) > 1 else out
            for name in CLASSES:
                (base / name).mkdir(parents=True, exist_ok=True)
            for i in tqdm(
                select(labels, per_class),
                desc=f"fashion-mnist-data: {which}",
                unit="img",
                disable=not progress,
            ):
                path = base / CLASSES[labels[i]] / f"{which}_{int(i):05d}.png"
                Image.fromarray(images[i]).save(path, format="PNG")
                written += 1
    layout = "train/ and test/ class folders" if len(sets) > 1 else "class folders"
    print(
        f"fashion-mnist-data: wrote {written} Fashion-MNIST images ({', '.join(sets)}) to "
        f"{target}/ as {layout} (licence: {LICENSE})"
    )
    return written
