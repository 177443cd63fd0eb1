"""Fast tests of the Fashion-MNIST converter on tiny idx files made here: the Debian package is
not needed."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from commands import main
from imgpipe.data import fashion_mnist_data as fm


def _write_idx(path: Path, array: np.ndarray, *, compress: bool = True) -> None:
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _fake_source(root: Path, labels: dict[str, list[int]], *, compress: bool = True) -> Path:
    root.mkdir()
    for which, values in labels.items():
        y = np.array(values, dtype=np.uint8)
        # Each image's pixels encode its index, so the tests can tell which one was written.
        x = np.stack([np.full((28, 28), i, dtype=np.uint8) for i in range(len(y))])
        suffix = ".gz" if compress else ""
        _write_idx(root / f"{which}-images-idx3-ubyte{suffix}", x, compress=compress)
        _write_idx(root / f"{which}-labels-idx1-ubyte{suffix}", y, compress=compress)
    return root


def _layout(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*.png")}


def test_t10k_as_class_folders_with_a_stratified_subset(tmp_path):
    source = _fake_source(tmp_path / "src", {"t10k": [5, 0, 5, 9, 5, 0]}, compress=False)
    out = tmp_path / "data"
    assert fm.run(out, source=source, per_class=2, progress=False) == 5
    assert _layout(out) == {
        "sandal/t10k_00000.png",
        "sandal/t10k_00002.png",  # the first two sandals in file order; the third is left out
        "tshirt_top/t10k_00001.png",
        "tshirt_top/t10k_00005.png",
        "ankle_boot/t10k_00003.png",
    }
    assert {p.name for p in out.iterdir()} == set(fm.CLASSES)  # every class folder, even empty
    with Image.open(out / "sandal/t10k_00002.png") as image:
        assert (image.mode, image.size) == ("L", (28, 28))
        assert np.asarray(image).max() == 2


def test_both_sets_keep_the_official_split_and_replace_only_with_force(tmp_path):
    source = _fake_source(tmp_path / "src", {"train": [1, 8, 1], "t10k": [8, 7]})
    out = tmp_path / "data"
    assert fm.run(out, source=source, sets=("train", "t10k"), progress=False) == 5
    assert _layout(out) == {
        "train/trouser/train_00000.png",
        "train/trouser/train_00002.png",
        "train/bag/train_00001.png",
        "test/bag/t10k_00000.png",
        "test/sneaker/t10k_00001.png",
    }
    with pytest.raises(FileExistsError, match="--force"):
        fm.run(out, source=source, progress=False)
    assert fm.run(out, source=source, force=True, progress=False) == 2
    assert _layout(out) == {"bag/t10k_00000.png", "sneaker/t10k_00001.png"}


def test_missing_package_names_it_and_the_install_command(tmp_path, capsys):
    code = main(["fashion-mnist-data", str(tmp_path / "data"), "--source", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert "dataset-fashion-mnist" in err and "apt-get install dataset-fashion-mnist" in err
    assert not (tmp_path / "data").exists()


def test_cli_writes_the_subset(tmp_path):
    source = _fake_source(tmp_path / "src", {"train": [3, 3, 3], "t10k": [3, 4]})
    out = tmp_path / "data"
    argv = ["fashion-mnist-data", str(out), "--source", str(source), "--sets", "train,t10k"]
    assert main([*argv, "--per-class", "1"]) == 0
    assert _layout(out) == {
        "train/dress/train_00000.png",
        "test/dress/t10k_00000.png",
        "test/coat/t10k_00001.png",
    }


def test_bad_input_is_a_clear_error(tmp_path):
    (tmp_path / "junk").write_bytes(b"\x00\x00\x0c\x03" + b"\x00" * 12)
    with pytest.raises(ValueError, match="not an unsigned-byte idx file"):
        fm.read_idx(tmp_path / "junk")
    source = _fake_source(tmp_path / "src", {"t10k": [0, 1]})
    with pytest.raises(ValueError, match="sets must be"):
        fm.run(tmp_path / "data", source=source, sets=("test",), progress=False)
    with pytest.raises(ValueError, match="per_class"):
        fm.run(tmp_path / "data", source=source, per_class=0, progress=False)
    assert not (tmp_path / "data").exists()
