"""The client's TensorProto codec (serving/tensors.py) against TensorFlow's own, and the
client's promise: sending a request loads no TensorFlow runtime."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import PROJECT

from serving import tensors

ARRAYS = [
    np.array([b"\x89PNG...", b"\xff\xd8jpeg"], dtype=object),
    np.array([["a", "bc"]], dtype=object),
    np.arange(2 * 3 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 3),
    np.array([[0.25, 0.75], [1.0, 0.0]], np.float32),
    np.array([3, -4], np.int64),
    np.array([[1, 2, 3]], np.int32),
    np.array(2.5, np.float64),
    np.array([True, False]),
]


def _request_input():
    return tensors.apis().predict_pb2.PredictRequest().inputs["x"]


@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: f"{a.dtype}{list(a.shape)}")
def test_the_codec_agrees_with_tensorflows(array):
    """What to_proto sends, TensorFlow reads back as the same array; what TensorFlow makes,
    to_ndarray reads as TensorFlow does (bytes for strings)."""
    import tensorflow as tf

    sent = tensors.to_proto(array, _request_input())
    expected = (
        np.vectorize(lambda v: v.encode() if isinstance(v, str) else v, otypes=[object])(array)
        if array.dtype == object
        else array
    )
    np.testing.assert_array_equal(tf.make_ndarray(sent), expected)
    made = tf.make_tensor_proto(array)
    np.testing.assert_array_equal(tensors.to_ndarray(made), tf.make_ndarray(made))
    assert tensors.to_ndarray(made).dtype == tf.make_ndarray(made).dtype


def test_a_repeated_scalar_fills_the_shape_as_tensorflow_does():
    import tensorflow as tf

    filled = tf.make_tensor_proto(0.5, dtype=tf.float32, shape=[2, 3])
    assert not filled.tensor_content  # TF keeps one value, repeated
    np.testing.assert_array_equal(tensors.to_ndarray(filled), np.full((2, 3), 0.5, np.float32))


def test_an_unsupported_dtype_is_refused_naming_it():
    with pytest.raises(ValueError, match="cannot send a complex64 tensor"):
        tensors.to_proto(np.zeros(2, np.complex64), _request_input())


def test_a_client_builds_and_reads_requests_without_tensorflows_runtime():
    """In a fresh process: the client, a Predict request with image bytes, and its parsing, and
    no tensorflow.python module loaded (the runtime takes seconds to import)."""
    code = (
        "import sys, numpy as np\n"
        "from serving.client import ServingClient\n"
        "from serving.tensors import to_proto, to_ndarray\n"
        "client = ServingClient('127.0.0.1:1', timeout=1, retries=0)\n"
        "request = client.apis.predict_pb2.PredictRequest()\n"
        "to_proto(np.array([b'png'], dtype=object), request.inputs['image_bytes'])\n"
        "assert to_ndarray(request.inputs['image_bytes']).tolist() == [b'png']\n"
        "client.close()\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('tensorflow.python'))\n"
        "assert not loaded, loaded[:5]\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
