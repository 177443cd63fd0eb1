"""Read a legacy (non-zip) PyTorch ``state_dict`` file into NumPy arrays, without torch.

The unpickler is restricted: it resolves only the four globals a state dict of float/long
tensors needs (``OrderedDict``, ``_rebuild_tensor_v2`` and two storage types) and refuses
everything else, so a malicious file cannot run code. The legacy layout (torch/serialization.py,
``_legacy_load``): magic number, protocol version, system info, the pickled object whose
storages are persistent ids, the list of storage keys, then each storage as an int64 element
count followed by its raw little-endian bytes.
"""

from __future__ import annotations

import collections
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from imgpipe.core.errors import InputError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "LongStorage": np.int64,
    "DoubleStorage": np.float64,
    "IntStorage": np.int32,
    "HalfStorage": np.float16,
}


class UnsafePickleError(pickle.UnpicklingError):
    """The file asks for a global that a plain tensor state dict never needs."""


class _Storage:
    def __init__(self, dtype: type, key: str, numel: int) -> None:
        self.dtype, self.key, self.numel = np.dtype(dtype), key, numel
        self.data: np.ndarray | None = None


class _TensorRef:
    def __init__(
        self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]
    ) -> None:
        self.storage, self.offset, self.size, self.stride = (
            storage,
            offset,
            tuple(size),
            tuple(stride),
        )

    def to_numpy(self) -> np.ndarray:
        base = self.storage.data
        assert base is not None
        # as_strided does no bounds checks: a view reaching past its storage would read (and
        # return) whatever memory follows the buffer, or crash.
        fits = (
            len(self.size) == len(self.stride)
            and self.offset >= 0
            and all(n >= 0 for n in self.size)
            and all(s >= 0 for s in self.stride)
        )
        if fits and all(self.size):
            last = self.offset + sum(
                (n - 1) * s for n, s in zip(self.size, self.stride, strict=True)
            )
            fits = last < len(base)
        if not fits:
            raise InputError(
                f"tensor view (offset {self.offset}, size {self.size}, stride {self.stride}) "
                f"does not fit in its storage {self.storage.key} of {len(base)} elements"
            )
        item = base.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[self.offset :], shape=self.size, strides=tuple(s * item for s in self.stride)
        )
        return np.array(view)  # a contiguous copy, detached from the storage buffer


def _storage_type(name: str) -> Any:
    return ("storage_type", name)


def _rebuild_tensor_v2(
    storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...], *_: Any
) -> _TensorRef:
    return _TensorRef(storage, offset, size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _storage_type(name)
        raise UnsafePickleError(f"refusing to load global {module}.{name} from a weights file")

    def persistent_load(self, pid: Any) -> _Storage:
        kind, storage_type, key, _location, numel, view = pid
        if kind != "storage" or view is not None:
            raise UnsafePickleError(f"unsupported persistent id {pid!r}")
        if key not in self.storages:
            self.storages[key] = _Storage(_STORAGE_DTYPES[storage_type[1]], key, numel)
        return self.storages[key]


def _plain_load(f: BinaryIO) -> Any:
    return _RestrictedUnpickler(f).load()


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Load a legacy PyTorch state dict as ``{name: ndarray}``.

    >>> weights = load_state_dict("efficientnet-lite0-57934424.pth")
    >>> weights["_conv_stem.weight"].shape
    (32, 3, 3, 3)
    """
    with open(path, "rb") as f:
        if _plain_load(f) != LEGACY_MAGIC:
            raise InputError(
                f"{path}: not a legacy PyTorch file (zip-format files are not supported)"
            )
        if _plain_load(f) != LEGACY_PROTOCOL:
            raise InputError(f"{path}: unsupported PyTorch protocol version")
        sys_info = _plain_load(f)
        if not sys_info.get("little_endian", True):
            raise InputError(f"{path}: big-endian weights are not supported")
        unpickler = _RestrictedUnpickler(f)
        state = unpickler.load()
        keys = _plain_load(f)
        for key in keys:
            storage = unpickler.storages[key]
            count = int(np.frombuffer(f.read(8), dtype="<i8")[0])
            raw = f.read(count * storage.dtype.itemsize)
            if count != storage.numel or len(raw) != count * storage.dtype.itemsize:
                raise InputError(f"{path}: storage {key} is truncated")
            storage.data = np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<"))
    if not isinstance(state, dict):
        raise InputError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {name: ref.to_numpy() for name, ref in state.items() if isinstance(ref, _TensorRef)}


__all__ = ["UnsafePickleError", "load_state_dict"]
