"""The TF Serving gRPC contract, the local server's hot swap, and a bounded load test.

The contract tests take the server from the environment, so the same suite checks the local
stand-in in CI and a real ``tensorflow/serving`` wherever one is reachable:

    IMGPIPE_SERVING_ADDRESS=host:8500 IMGPIPE_SERVING_MODEL=elpv_defects \
        pytest tests/test_serving.py -k Contract

Without ``IMGPIPE_SERVING_ADDRESS`` a local server is started here (127.0.0.1, a free port) on two
versions of a small exported classifier, with batching on, and stopped by its PID with SIGTERM;
it must exit cleanly. ``IMGPIPE_SERVING_MAX_MESSAGE_BYTES`` is the server's message cap (16 MiB,
the local default; pass ``--grpc_channel_arguments=grpc.max_receive_message_length=...`` to
TF Serving for the same cap).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import class_pattern, encode_image, export_classifier

from serving.process import ServerProcess, model_config

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[1]
LABELS = ("crack", "finger", "intact")
LOCAL_MODEL = "contract"
EXTERNAL = os.environ.get("IMGPIPE_SERVING_ADDRESS")
MODEL = os.environ.get("IMGPIPE_SERVING_MODEL", LOCAL_MODEL)
MAX_MESSAGE_BYTES = int(os.environ.get("IMGPIPE_SERVING_MAX_MESSAGE_BYTES", 16 * 1024 * 1024))
TOLERANCE = 1e-5


def _images(count: int, fmt: str = "PNG", size: tuple[int, int] = (48, 40)) -> list[bytes]:
    return [encode_image(class_pattern(i % 3, size, seed=500 + i), fmt) for i in range(count)]


class LocalServer(ServerProcess):
    """The local server on a base path this test owns: two versions, policy latest 2, label
    ``stable`` -> 1, batching on, REST and Prometheus on."""

    def __init__(self, root: Path) -> None:
        self.root, self.base = root, root / "models" / LOCAL_MODEL
        self.config = config = model_config(
            root / "models.config",
            LOCAL_MODEL,
            f"/models/{LOCAL_MODEL}",
            "model_version_policy { latest { num_versions: 2 } } "
            "version_labels { key: 'stable' value: 1 } ",
        )
        super().__init__(
            [
                "--model_config_file",
                str(config),
                "--mount",
                f"{root / 'models'}:/models",
                "--file_system_poll_wait_seconds",
                "0.2",
                "--enable_batching",
                "--batching_parameters_file",
                str(PROJECT / "serving" / "batching.config"),
                "--monitoring_config_file",
                str(PROJECT / "serving" / "monitoring.config"),
            ],
            root,
            rest=True,
        )


def _export_version(base: Path, version: int) -> Path:
    return export_classifier(
        base / str(version), LOCAL_MODEL, LABELS, seed=version, warmup=_images(2)
    )


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> LocalServer:
    root = tmp_path_factory.mktemp("serving")
    for version in (1, 2):
        _export_version(root / "models" / LOCAL_MODEL, version)
    server = LocalServer(root)
    yield server
    code = server.stop()
    assert code == 0, f"server exited {code} on SIGTERM:\n{server.output()}"


@pytest.fixture(scope="module")
def address(request) -> str:
    if EXTERNAL:
        return EXTERNAL
    return request.getfixturevalue("local").address


@pytest.fixture(scope="module")
def client(address):
    from serving.client import ServingClient

    with ServingClient(address, timeout=30, retries=5) as c:
        deadline = time.monotonic() + 120
        while not any(state == "AVAILABLE" for _, state in c.status(MODEL)):
            assert time.monotonic() < deadline, c.status(MODEL)
            time.sleep(0.2)
        yield c


def _available(client) -> list[int]:
    return sorted(v for v, state in client.status(MODEL) if state == "AVAILABLE")


def _error(call) -> grpc.StatusCode:
    from serving.client import ServingClientError

    with pytest.raises(ServingClientError) as info:
        call()
    return info.value.code


class TestContract:
    """What any TF Serving must answer for a model exported by the pipeline."""

    def test_metadata_describes_the_exported_signatures(self, client):
        from tensorflow.core.framework import types_pb2

        signatures = client.metadata(MODEL).signature_def
        assert {"serving_default", "serving_images", "classify"} <= set(signatures)
        default = signatures["serving_default"]
        assert default.method_name == "tensorflow/serving/predict"
        assert default.inputs["image_bytes"].dtype == types_pb2.DT_STRING
        assert {"probabilities", "class_index", "class_name", "class_names"} <= set(default.outputs)
        images = signatures["serving_images"].inputs["images"]
        assert images.dtype == types_pb2.DT_UINT8 and len(images.tensor_shape.dim) == 4
        assert signatures["classify"].method_name == "tensorflow/serving/classify"

    def test_status_lists_available_versions(self, client):
        assert _available(client), client.status(MODEL)
        if not EXTERNAL:
            assert _available(client) == [1, 2]

    def test_predict_with_png_and_jpeg_bytes(self, client):
        for fmt in ("PNG", "JPEG"):
            out = client.predict_bytes(_images(5, fmt), model=MODEL)
            probs = out["probabilities"]
            assert probs.shape[0] == 5 and probs.dtype == np.float32
            np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
            top = probs.argmax(axis=1)
            assert list(out["class_index"]) == list(top)
            names = out["class_names"]
            assert [n.decode() for n in out["class_name"]] == [
                names[i, j].decode() for i, j in enumerate(top)
            ]
            assert int(out["model_version"]) == _available(client)[-1]  # latest by default

    def test_predict_with_uint8_tensors_matches_bytes(self, client):
        pixels = np.stack([class_pattern(i % 3, (48, 40), seed=500 + i) for i in range(4)])
        tensors = client.predict({"images": pixels}, model=MODEL, signature="serving_images")
        from_bytes = client.predict_bytes(_images(4), model=MODEL)  # PNG: the same pixels
        np.testing.assert_allclose(
            tensors["probabilities"], from_bytes["probabilities"], atol=TOLERANCE
        )

    def test_version_pinning(self, client):
        images = _images(3)
        answers = {}
        for version in _available(client):
            out = client.predict_bytes(images, model=MODEL, version=version)
            assert int(out["model_version"]) == version
            answers[version] = out["probabilities"]
        if len(answers) > 1 and not EXTERNAL:
            first, second = answers.values()
            assert not np.allclose(first, second)  # two different models really answered
        if not EXTERNAL:
            from tensorflow_serving.apis import predict_pb2

            request = predict_pb2.PredictRequest()
            request.model_spec.name, request.model_spec.version_label = MODEL, "stable"
            import tensorflow as tf

            request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(images))
            response = client.call(client.predictions.Predict, request, "Predict(label)")
            assert response.model_spec.version.value == 1

    def test_classify_signature(self, client):
        from tensorflow_serving.apis import classification_pb2

        request = classification_pb2.ClassificationRequest()
        request.model_spec.name, request.model_spec.signature_name = MODEL, "classify"
        for image in _images(3):
            example = request.input.example_list.examples.add()
            example.features.feature["image/encoded"].bytes_list.value.append(image)
        response = client.call(client.predictions.Classify, request, "Classify")
        predicted = client.predict_bytes(_images(3), model=MODEL)
        assert len(response.result.classifications) == 3
        for row, classification in enumerate(response.result.classifications):
            scores = {c.label: c.score for c in classification.classes}
            names = [n.decode() for n in predicted["class_names"][row]]
            assert list(scores) == names
            np.testing.assert_allclose(
                [scores[n] for n in names], predicted["probabilities"][row], atol=TOLERANCE
            )
        request.model_spec.signature_name = "serving_default"  # a predict signature
        code = _error(lambda: client.call(client.predictions.Classify, request, "Classify"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT

    @pytest.mark.parametrize(
        ("case", "expected"),
        [
            ("not an image", grpc.StatusCode.INVALID_ARGUMENT),
            ("wrong dtype", grpc.StatusCode.INVALID_ARGUMENT),
            ("wrong shape", grpc.StatusCode.INVALID_ARGUMENT),
            ("unknown input", grpc.StatusCode.INVALID_ARGUMENT),
            ("unknown signature", grpc.StatusCode.FAILED_PRECONDITION),
            ("unknown model", grpc.StatusCode.NOT_FOUND),
            ("unknown version", grpc.StatusCode.NOT_FOUND),
            ("oversized", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ],
    )
    def test_bad_requests_get_clear_errors(self, client, case, expected):
        calls = {
            "not an image": lambda: client.predict_bytes([b"GIF89a but not really"], model=MODEL),
            "wrong dtype": lambda: client.predict(
                {"image_bytes": np.zeros((1,), np.float32)}, model=MODEL
            ),
            "wrong shape": lambda: client.predict(
                {"images": np.zeros((8, 8, 3), np.uint8)}, model=MODEL, signature="serving_images"
            ),
            "unknown input": lambda: client.predict(
                {"pixels": np.zeros((1, 8, 8, 3), np.uint8)}, model=MODEL
            ),
            "unknown signature": lambda: client.predict(
                {"image_bytes": np.array(_images(1), dtype=object)}, model=MODEL, signature="nope"
            ),
            "unknown model": lambda: client.predict_bytes(_images(1), model="no_such_model"),
            "unknown version": lambda: client.predict_bytes(_images(1), model=MODEL, version=999),
            "oversized": lambda: client.predict_bytes(
                [b"\0" * (MAX_MESSAGE_BYTES + 1024)], model=MODEL
            ),
        }
        from serving.client import ServingClientError

        with pytest.raises(ServingClientError) as info:
            calls[case]()
        assert info.value.code == expected, str(info.value)
        assert str(info.value).strip(), "the error must say what went wrong"

    def test_concurrent_clients_get_the_same_answers(self, client, address):
        from serving.client import ServingClient

        images = _images(6)
        expected = [client.predict_bytes([im], model=MODEL)["probabilities"][0] for im in images]

        def worker(index: int) -> list[np.ndarray]:
            with ServingClient(address, timeout=60) as own:
                return [
                    own.predict_bytes([images[(index + i) % 6]], model=MODEL)["probabilities"][0]
                    for i in range(12)
                ]

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(worker, range(8)))
        for index, answers in enumerate(results):
            for i, got in enumerate(answers):
                np.testing.assert_allclose(got, expected[(index + i) % 6], atol=TOLERANCE)


@pytest.mark.skipif(bool(EXTERNAL), reason="needs the local server's base path")
def test_hot_swap_fails_no_request_and_serves_the_new_version(local, tmp_path):
    """Guards the hot swap: while a client loop keeps predicting, version 3 is pushed into the
    base path (one rename, like the push stage); no request fails, and once the swap is seen
    every answer comes from version 3; version 1 is unloaded (policy: latest 2)."""
    from components.registry import push_to_serving
    from serving.client import ServingClient, ServingClientError

    staged = _export_version(tmp_path / "staging", 3)
    stop = threading.Event()
    seen: list[int] = []
    failures: list[str] = []

    def loop() -> None:
        with ServingClient(local.address, timeout=60, retries=0) as own:
            while not stop.is_set():
                try:
                    out = own.predict_bytes(_images(2), model=LOCAL_MODEL)
                    seen.append(int(out["model_version"]))
                except ServingClientError as exc:
                    failures.append(str(exc))

    threads = [threading.Thread(target=loop) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    pushed = push_to_serving(staged, local.root / "models", LOCAL_MODEL)
    assert pushed.name == "3"
    deadline = time.monotonic() + 120
    while 3 not in seen[-5:] and time.monotonic() < deadline:
        time.sleep(0.1)
    swapped_at = len(seen)
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not failures, failures[:3]
    assert seen[0] == 2 and 3 in seen, (seen[:3], seen[-3:])
    first_new = seen.index(3)
    assert set(seen[swapped_at:]) == {3}, "answers after the swap must all be version 3"
    assert first_new > 0
    with ServingClient(local.address) as own:
        deadline = time.monotonic() + 30
        while (states := dict(own.status(LOCAL_MODEL)))[1] != "END":
            assert time.monotonic() < deadline, f"version 1 was never unloaded: {states}"
            time.sleep(0.1)
    assert states[3] == "AVAILABLE" and states[2] == "AVAILABLE", states


@pytest.mark.skipif(bool(EXTERNAL), reason="bounded load on the local server")
def test_bounded_load_on_loopback(local, record_property):
    """A bounded load: 8 clients x 25 single-image requests over loopback, no errors; reports
    p50/p99 latency and throughput (bench/ holds the comparisons)."""
    from serving.client import ServingClient

    image = _images(1)

    def worker(_: int) -> list[float]:
        latencies = []
        with ServingClient(local.address, timeout=60) as own:
            for _ in range(25):
                started = time.perf_counter()
                own.predict_bytes(image, model=LOCAL_MODEL)
                latencies.append(time.perf_counter() - started)
        return latencies

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        latencies = [x for chunk in pool.map(worker, range(8)) for x in chunk]
    elapsed = time.perf_counter() - started
    report = {
        "requests": len(latencies),
        "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 2),
        "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 2),
        "requests_per_second": round(len(latencies) / elapsed, 1),
    }
    record_property("load", json.dumps(report))
    print(f"\nlocal server load (8 clients, batching on): {report}")
    assert report["requests"] == 200


@pytest.mark.skipif(bool(EXTERNAL), reason="changes the local server's config")
def test_reload_config_adds_and_removes_models(local):
    """Guards HandleReloadConfigRequest: a new config adds a model (loaded before the call
    returns), a broken one is refused with a reason and changes nothing, and the original
    config removes the added model again."""
    from tensorflow_serving.apis import model_management_pb2

    from serving.client import ServingClient
    from serving.config import read_model_config

    original = read_model_config(local.config)
    changed = type(original)()
    changed.CopyFrom(original)
    alias = changed.model_config_list.config.add()
    alias.CopyFrom(original.model_config_list.config[0])
    alias.name = "alias"
    alias.ClearField("version_labels")
    alias.model_version_policy.all.SetInParent()

    def reload(config) -> object:
        request = model_management_pb2.ReloadConfigRequest(config=config)
        return client.call(client.models.HandleReloadConfigRequest, request, "reload")

    with ServingClient(local.address, timeout=120) as client:
        try:
            assert reload(changed).status.error_code == 0
            served = sorted(int(p.name) for p in local.base.iterdir() if p.name.isdigit())
            assert client.status("alias") == [(v, "AVAILABLE") for v in served]
            out = client.predict_bytes(_images(1), model="alias")
            assert int(out["model_version"]) == served[-1]

            broken = model_management_pb2.ReloadConfigRequest().config
            broken.model_config_list.config.add(name="no_base_path")
            answer = reload(broken)
            assert answer.status.error_code == 3 and "base_path" in answer.status.error_message
            assert client.status("alias")  # unchanged
        finally:
            assert reload(original).status.error_code == 0
        code = _error(lambda: client.predict_bytes(_images(1), model="alias"))
        assert code == grpc.StatusCode.NOT_FOUND


def test_serving_configs_parse_and_reject_typos(tmp_path):
    """Guards the shared configs: the committed files parse with TF Serving's schemas, and a
    misspelt field is an error that names the file."""
    from serving import config

    models = config.read_model_config(config.MODEL_CONFIG)
    (model,) = models.model_config_list.config
    assert model.base_path.startswith("/models/")
    assert model.model_version_policy.latest.num_versions == 2
    settings = config.batching_settings(config.read_batching_parameters(config.BATCHING_CONFIG))
    assert settings["max_batch_size"] == 32 and settings["batch_timeout_s"] == 0.002
    monitoring = config.read_monitoring_config(config.MONITORING_CONFIG)
    assert monitoring.prometheus_config.enable
    bad = tmp_path / "batching.config"
    bad.write_text("max_batch_sise { value: 8 }\n")
    with pytest.raises(config.ConfigError, match=r"batching\.config.*max_batch_sise"):
        config.read_batching_parameters(bad)


def test_version_policy_like_tf_serving():
    from tensorflow_serving.config import model_server_config_pb2

    from serving.config import versions_to_serve

    policy = model_server_config_pb2.ModelConfig().model_version_policy
    assert versions_to_serve([3, 1, 2], policy) == [3]  # default: latest 1
    policy.latest.num_versions = 2
    assert versions_to_serve([3, 1, 2], policy) == [2, 3]
    policy.all.SetInParent()
    assert versions_to_serve([3, 1, 2], policy) == [1, 2, 3]
    policy.specific.versions.extend([1, 7])
    assert versions_to_serve([3, 1, 2], policy) == [1]


def test_a_version_whose_warmup_fails_never_becomes_available(tmp_path):
    """Guards warmup-before-AVAILABLE and availability: under the default policy (latest 1)
    a new version whose warmup request cannot run is reported END with the reason, and the
    previous version keeps serving instead of being unloaded for it."""
    from tensorflow_serving.config import model_server_config_pb2

    from serving.manager import ModelManager
    from serving.warmup import write_warmup

    base = tmp_path / LOCAL_MODEL
    _export_version(base, 1)
    config = model_server_config_pb2.ModelServerConfig()
    config.model_config_list.config.add(name=LOCAL_MODEL, base_path=str(base))
    manager = ModelManager(config, poll_seconds=0)
    try:
        assert sorted(manager.models[LOCAL_MODEL].versions) == [1]
        staged = export_classifier(tmp_path / "staging" / "2", LOCAL_MODEL, LABELS, seed=2)
        write_warmup(staged, LOCAL_MODEL, [b"not an image"])
        staged.rename(base / "2")
        manager.poll()
        states = dict(manager.states(LOCAL_MODEL))
        assert states[1].state == 30  # AVAILABLE
        assert states[2].state == 50 and "failed to load" in states[2].error, states[2]
        assert sorted(manager.models[LOCAL_MODEL].versions) == [1]
    finally:
        manager.stop()


def _http(method: str, url: str, body: object = None) -> tuple[int, object]:
    import urllib.error
    import urllib.request

    data = (
        None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    )
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            raw, status = response.read(), response.status
            kind = response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as error:
        raw, status, kind = error.read(), error.code, error.headers.get("Content-Type", "")
    return status, json.loads(raw) if "json" in kind else raw.decode()


@pytest.mark.skipif(bool(EXTERNAL), reason="REST checks run on the local server")
class TestRest:
    """TF Serving's REST predict API: row and columnar formats, b64 binaries, versions."""

    def test_row_and_columnar_predict_match_grpc(self, local, client):
        import base64

        images = _images(3)
        b64 = [{"b64": base64.b64encode(im).decode()} for im in images]
        expected = client.predict_bytes(images, model=LOCAL_MODEL)["probabilities"]
        url = f"{local.rest}/v1/models/{LOCAL_MODEL}:predict"

        status, rows = _http("POST", url, {"instances": b64})
        assert status == 200, rows
        assert len(rows["predictions"]) == 3
        np.testing.assert_allclose(
            [r["probabilities"] for r in rows["predictions"]], expected, atol=TOLERANCE
        )
        assert rows["predictions"][0]["class_name"] in LABELS

        status, columns = _http(
            "POST", url, {"signature_name": "serving_default", "inputs": {"image_bytes": b64}}
        )
        assert status == 200, columns
        np.testing.assert_allclose(columns["outputs"]["probabilities"], expected, atol=TOLERANCE)

        pixels = class_pattern(0, (48, 40), seed=500).tolist()
        status, tensors = _http(
            "POST", url, {"signature_name": "serving_images", "instances": [pixels]}
        )
        assert status == 200, tensors
        np.testing.assert_allclose(
            tensors["predictions"][0]["probabilities"], expected[0], atol=TOLERANCE
        )

    def test_versions_status_metadata_and_metrics(self, local):
        import base64

        status, model = _http("GET", f"{local.rest}/v1/models/{LOCAL_MODEL}")
        assert status == 200
        states = {int(s["version"]): s["state"] for s in model["model_version_status"]}
        available = sorted(v for v, state in states.items() if state == "AVAILABLE")
        assert available, states
        image = {"b64": base64.b64encode(_images(1)[0]).decode()}
        for version in available:
            status, pinned = _http(
                "POST",
                f"{local.rest}/v1/models/{LOCAL_MODEL}/versions/{version}:predict",
                {"instances": [image]},
            )
            assert status == 200, pinned
        status, metadata = _http("GET", f"{local.rest}/v1/models/{LOCAL_MODEL}/metadata")
        assert status == 200
        assert "serving_default" in metadata["metadata"]["signature_def"]["signatureDef"]
        status, text = _http("GET", f"{local.rest}/monitoring/prometheus/metrics")
        assert status == 200 and "imgpipe_serving_requests_total" in text, text

    @pytest.mark.parametrize(
        ("path", "body", "expected"),
        [
            (f"/v1/models/{LOCAL_MODEL}:predict", b"{not json", 400),
            (f"/v1/models/{LOCAL_MODEL}:predict", {"instances": [], "inputs": []}, 400),
            (f"/v1/models/{LOCAL_MODEL}:predict", {"instances": [{"b64": "!!"}]}, 400),
            (f"/v1/models/{LOCAL_MODEL}:predict", {"instances": ["not an image"]}, 400),
            ("/v1/models/nope:predict", {"instances": ["x"]}, 404),
            (f"/v1/models/{LOCAL_MODEL}/versions/99:predict", {"instances": ["x"]}, 404),
        ],
    )
    def test_bad_rest_requests(self, local, path, body, expected):
        status, answer = _http("POST", f"{local.rest}{path}", body)
        assert status == expected, answer
        assert answer["error"], answer
