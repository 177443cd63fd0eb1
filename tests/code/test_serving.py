"""The TF Serving gRPC contract, the local server's hot swap, and a bounded load test.

The contract tests take the server from the environment, so the same suite checks the local
stand-in in CI and a real ``tensorflow/serving`` wherever one is reachable:

    IMGPIPE_SERVING_ADDRESS=host:8500 IMGPIPE_SERVING_MODEL=elpv_defects \
        pytest tests/code/test_serving.py -k Contract

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
import re
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ExportClassifier, class_pattern, encode_image

from serving.process import SIDECAR, ServerProcess, model_config

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[2]
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


def _export_version(export_classifier: ExportClassifier, base: Path, version: int) -> Path:
    return export_classifier(
        base / str(version), LOCAL_MODEL, LABELS, seed=version, warmup=_images(2)
    )


@pytest.fixture(scope="module")
def local(tmp_path_factory, export_classifier) -> LocalServer:
    root = tmp_path_factory.mktemp("serving")
    for version in (1, 2):
        _export_version(export_classifier, root / "models" / LOCAL_MODEL, version)
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

    with ServingClient(address, timeout=30, retries=4) as c:
        deadline = time.monotonic() + 120
        while not any(state == "AVAILABLE" for _, state in c.status(MODEL)):
            assert time.monotonic() < deadline, c.status(MODEL)
            time.sleep(0.2)
        yield c


def _claims(width: int, height: int) -> bytes:
    """A small, valid PNG whose header claims ``width`` x ``height`` pixels (a decompression
    bomb's header: decoding it would allocate width * height * 3 bytes)."""
    import struct
    import zlib

    png = bytearray(_images(1)[0])
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(png[24:29])
    png[12:29] = header
    png[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(png)


def test_an_internal_error_is_logged_with_its_trace_and_answered_without_it(caplog):
    """A bug in a handler answers INTERNAL with an incident id; the exception's text (paths,
    data of the request) stays in the server's log, with its trace, under that id."""
    from serving.server import PredictionService

    class Context:
        def abort(self, code, message):
            self.code, self.message = code, message
            raise RuntimeError("aborted")

    class Metrics:
        def record(self, *args):
            self.recorded = args

    def bug(request):
        raise ValueError("/secret/path/of/another/request")

    request, context = (
        type("Request", (), {"model_spec": type("Spec", (), {"name": "m"})})(),
        Context(),
    )
    with pytest.raises(RuntimeError, match="aborted"):
        PredictionService(None, Metrics())._serve("Predict", request, context, bug)
    assert context.code == grpc.StatusCode.INTERNAL
    assert "secret" not in context.message and "incident" in context.message
    incident = context.message.split("incident ")[1].split()[0]
    (logged,) = [r for r in caplog.records if incident in r.getMessage()]
    assert logged.exc_info and "/secret/path" in str(logged.exc_info[1])


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

    def test_status_lists_available_versions(self, client, request):
        assert _available(client), client.status(MODEL)
        if not EXTERNAL:
            base = request.getfixturevalue("local").base
            folders = sorted(int(p.name) for p in base.iterdir() if p.name.isdigit())
            assert _available(client) == folders[-2:]  # policy: latest 2

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
        ("case", "expected", "says"),
        [
            ("not an image", grpc.StatusCode.INVALID_ARGUMENT, r"image"),
            ("wrong dtype", grpc.StatusCode.INVALID_ARGUMENT, r"string"),
            ("wrong shape", grpc.StatusCode.INVALID_ARGUMENT, r"shape|rank"),
            ("unknown input", grpc.StatusCode.INVALID_ARGUMENT, r"pixels"),
            ("unknown signature", grpc.StatusCode.FAILED_PRECONDITION, r"nope"),
            ("unknown model", grpc.StatusCode.NOT_FOUND, r"no_such_model"),
            ("unknown version", grpc.StatusCode.NOT_FOUND, r"999"),
            ("oversized", grpc.StatusCode.RESOURCE_EXHAUSTED, r"larger than max"),
            ("decompression bomb", grpc.StatusCode.INVALID_ARGUMENT, r"max_image_pixels"),
        ],
    )
    def test_bad_requests_get_clear_errors(self, client, case, expected, says):
        """Each bad request gets its status code, and the server's message names what was
        wrong (the input, dtype, signature, model or version); the client's error adds the call,
        the server and the model."""
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
            "decompression bomb": lambda: client.predict_bytes(
                [_claims(20_000, 20_000)], model=MODEL
            ),
        }
        from serving.client import ServingClientError

        with pytest.raises(ServingClientError) as info:
            calls[case]()
        error = info.value
        assert error.code == expected, str(error)
        assert re.search(says, error.details, re.IGNORECASE), error.details
        model = "no_such_model" if case == "unknown model" else MODEL
        assert str(error).startswith(f"Predict(model {model!r}"), str(error)
        assert f" on {client.address} failed: {expected.name}: " in str(error), str(error)

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


@pytest.mark.skipif(bool(EXTERNAL), reason="compares with the local server's SavedModel")
def test_score_through_the_server_gives_the_saved_models_answers(local, client, tmp_path):
    """``imgpipe score --server``: a folder of new images, one not an image, through the
    server, with the probabilities of the SavedModel the server serves as its latest."""
    from imgpipe.export.savedmodel import SavedModelClassifier
    from imgpipe.monitoring import scoring

    folder = tmp_path / "new"
    folder.mkdir()
    images = _images(5)
    for i, data in enumerate(images):
        (folder / f"{i}.png").write_bytes(data)
    (folder / "5.png").write_bytes(b"not an image")
    latest = max(v for v, state in client.status(MODEL) if state == "AVAILABLE")
    rows = scoring.score(
        scoring.discover(folder),
        scoring.server_predictor(client, MODEL),
        max_pixels=10**8,
        batch_size=2,
        progress=False,
    )
    expected = SavedModelClassifier(local.base / str(latest)).predict_bytes(images)
    assert [r.get("error") for r in rows] == [None] * 5 + ["not_an_image"]
    for row, probs in zip(rows, expected, strict=False):
        assert [row[f"p_{c}"] for c in LABELS] == pytest.approx(probs, abs=TOLERANCE)
        assert row["predicted"] == LABELS[int(np.argmax(probs))]


def _sidecar(upstream: str, root: Path, log_dir: Path) -> ServerProcess:
    """The logging sidecar in front of ``upstream``, logging every call into ``log_dir``."""
    import yaml

    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["request_log"].update(directory=str(log_dir), sampling_rate=1.0)
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    args = ["sidecar", "--upstream", upstream, "--params", str(root / "params.yaml")]
    return ServerProcess(args, root, module=SIDECAR, timeout=60)


@pytest.mark.skipif(bool(EXTERNAL), reason="starts a local server")
def test_the_logging_sidecar_passes_calls_through_and_logs_each_answered_one(
    local, client, tmp_path
):
    """Clients of the sidecar get the server's answers and errors unchanged; every answered
    Predict and Classify is in the log as a PredictionLog (TF Serving's record, which
    TensorFlow's own TFRecord reader reads) holding the request sent, the response given and
    the version that answered. With a log folder that cannot be written, every call is still
    answered and the drops are counted."""
    import tensorflow as tf
    from tensorflow_serving.apis import classification_pb2, prediction_log_pb2

    from serving.client import ServingClient
    from serving.request_log import closed_logs, read_logs

    images = [_images(2), _images(3, "JPEG"), _images(1)]
    direct = [client.predict_bytes(batch, model=MODEL) for batch in images]
    with (
        _sidecar(local.address, tmp_path / "sidecar", tmp_path / "logs") as sidecar,
        ServingClient(sidecar.address, timeout=30) as logged,
    ):
        answers = [logged.predict_bytes(batch, model=MODEL) for batch in images]
        request = classification_pb2.ClassificationRequest()
        request.model_spec.name, request.model_spec.signature_name = MODEL, "classify"
        example = request.input.example_list.examples.add()
        example.features.feature["image/encoded"].bytes_list.value.append(images[0][0])
        classified = logged.call(logged.predictions.Classify, request, "Classify")
        assert logged.status(MODEL) == client.status(MODEL)
        assert logged.metadata(MODEL) == client.metadata(MODEL)
        code = _error(lambda: logged.predict_bytes(images[0], model="no_such_model"))
        assert code == grpc.StatusCode.NOT_FOUND  # the server's status, passed through
        assert sidecar.stop() == 0, sidecar.output()
    for ours, theirs in zip(answers, direct, strict=True):
        np.testing.assert_allclose(ours["probabilities"], theirs["probabilities"], atol=TOLERANCE)

    records = [record for _, record in read_logs(tmp_path / "logs")]
    assert [r.WhichOneof("log_type") for r in records] == ["predict_log"] * 3 + ["classify_log"]
    latest = _available(client)[-1]
    for record, batch, answer in zip(records, images, answers, strict=False):
        sent = tf.make_ndarray(record.predict_log.request.inputs["image_bytes"])
        assert list(sent) == batch
        given = tf.make_ndarray(record.predict_log.response.outputs["probabilities"])
        np.testing.assert_array_equal(given, answer["probabilities"])
        assert record.log_metadata.model_spec.version.value == latest
    assert records[-1].classify_log.response == classified
    (path,) = closed_logs(tmp_path / "logs")
    read_by_tf = [
        prediction_log_pb2.PredictionLog.FromString(raw.numpy())
        for raw in tf.data.TFRecordDataset(str(path))
    ]
    assert read_by_tf == records

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the log folder should be")
    with (
        _sidecar(local.address, tmp_path / "failing", blocked) as sidecar,
        ServingClient(sidecar.address, timeout=30) as logged,
    ):
        for batch in images:
            assert logged.predict_bytes(batch, model=MODEL)["probabilities"].shape[0] == len(batch)
        assert sidecar.stop() == 0
    assert "0 records written, 3 dropped" in sidecar.output(), sidecar.output()


def _wait_for(condition, what: str, seconds: float = 120):
    """Poll ``condition()`` until it is truthy; fail naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        assert time.monotonic() < deadline, f"waited {seconds} s for {what}"
        time.sleep(0.05)
    return value


@pytest.mark.skipif(bool(EXTERNAL), reason="needs the local server's base path")
def test_hot_swap_fails_no_request_and_serves_the_new_version(local, tmp_path, export_classifier):
    """Guards the hot swap: while client loops keep predicting, a new version is pushed into
    the base path (one rename, like the push stage); no request fails, every request sent once
    the server reports the new version AVAILABLE is answered by it, and the oldest version is
    unloaded (policy: latest 2). Waits on the server's state, never on a fixed sleep. Removing
    the new version's folder afterwards brings the server back to the versions it had."""
    import shutil

    from components.push import push_to_serving
    from serving.client import ServingClient, ServingClientError

    with ServingClient(local.address, timeout=60) as status_client:
        before = _available(status_client)
        staged = _export_version(export_classifier, tmp_path / "staging", before[-1] + 1)
        stop = threading.Event()
        answers: list[list[tuple[float, int]]] = [[] for _ in range(3)]  # (sent at, version)
        failures: list[str] = []

        def loop(mine: list[tuple[float, int]]) -> None:
            with ServingClient(local.address, timeout=60, retries=0) as own:
                while not stop.is_set():
                    sent = time.monotonic()
                    try:
                        out = own.predict_bytes(_images(2), model=LOCAL_MODEL)
                        mine.append((sent, int(out["model_version"])))
                    except ServingClientError as exc:
                        failures.append(str(exc))

        threads = [threading.Thread(target=loop, args=(mine,)) for mine in answers]
        for thread in threads:
            thread.start()
        pushed = None
        try:
            _wait_for(lambda: all(answers), "every client loop's first answer")
            pushed = push_to_serving(staged, local.root / "models", LOCAL_MODEL)
            new = int(pushed.name)
            assert new == before[-1] + 1
            _wait_for(
                lambda: dict(status_client.status(LOCAL_MODEL)).get(new) == "AVAILABLE",
                f"version {new} to become AVAILABLE",
            )
            swapped = time.monotonic()
            _wait_for(
                lambda: all(sum(sent > swapped for sent, _ in mine) >= 3 for mine in answers),
                "three answers per client loop after the swap",
            )
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
            assert not failures, failures[:3]
            for mine in answers:
                assert mine[0][1] == before[-1], mine[:3]
                after = {version for sent, version in mine if sent > swapped}
                assert after == {new}, f"requests sent after the swap answered by {after}"
            oldest = before[0]
            states = _wait_for(
                lambda: (s := dict(status_client.status(LOCAL_MODEL))).get(oldest) == "END" and s,
                f"version {oldest} to be unloaded",
                seconds=30,
            )
            assert states[new] == "AVAILABLE" and states[before[-1]] == "AVAILABLE", states
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
            if pushed is not None:  # roll back: the other tests see the versions they expect
                removed = pushed.rename(pushed.with_name(f".removed-{pushed.name}"))
                shutil.rmtree(removed)
                _wait_for(
                    lambda: _available(status_client) == before,
                    f"the server back on versions {before}",
                )


@pytest.mark.skipif(bool(EXTERNAL), reason="bounded load on the local server")
def test_bounded_load_on_loopback(local, client, record_property):
    """A bounded load: 8 clients x 25 single-image requests over loopback, pinned to the latest
    version; no request fails and every answer equals the SavedModel's own, called in this
    process. Reports p50/p99 latency and throughput (bench/ holds the comparisons)."""
    import tensorflow as tf

    from serving.client import ServingClient, ServingClientError

    version = _available(client)[-1]
    image = _images(1)
    signature = tf.saved_model.load(str(local.base / str(version))).signatures["serving_default"]
    expected = signature(image_bytes=tf.constant(image))["probabilities"].numpy()[0]
    failures: list[str] = []

    def worker(_: int) -> tuple[list[float], list[np.ndarray]]:
        latencies, answers = [], []
        with ServingClient(local.address, timeout=60) as own:
            for _ in range(25):
                started = time.perf_counter()
                try:
                    out = own.predict_bytes(image, model=LOCAL_MODEL, version=version)
                except ServingClientError as exc:
                    failures.append(str(exc))
                    continue
                latencies.append(time.perf_counter() - started)
                answers.append(out["probabilities"][0])
        return latencies, answers

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(worker, range(8)))
    elapsed = time.perf_counter() - started
    assert not failures, f"{len(failures)} of 200 requests failed: {failures[:3]}"
    for _, answers in results:
        for answer in answers:
            np.testing.assert_allclose(answer, expected, atol=TOLERANCE)
    latencies = [x for chunk, _ in results for x in chunk]
    report = {
        "requests": len(latencies),
        "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 2),
        "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 2),
        "requests_per_second": round(len(latencies) / elapsed, 1),
    }
    record_property("load", json.dumps(report))
    print(f"\nlocal server load (8 clients, batching on): {report}")


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


def _params(path: Path, serving: str) -> Path:
    path.write_text(f"train:\n  epochs: 1\n{serving}")
    return path


@pytest.mark.skipif(bool(EXTERNAL), reason="starts a local server")
def test_make_serve_config_serves_the_params_model_name(local, tmp_path):
    """What ``make serve`` runs, for a user whose params.yaml says ``model_name: clothing``:
    the rendered config keeps the template's policy and serves ``clothing`` from
    ``models/clothing/``, and a client asking for that name gets answers."""
    import shutil
    import subprocess
    import sys

    from serving import config
    from serving.client import ServingClient

    params = _params(tmp_path / "params.yaml", "serving:\n  model_name: clothing\n")
    rendered = tmp_path / "outputs" / "serving" / "models.config"
    subprocess.run(
        [sys.executable, "-m", "serving.config", "--params", str(params), "--out", str(rendered)],
        cwd=PROJECT,
        check=True,
    )
    (model,) = config.read_model_config(rendered).model_config_list.config
    (template,) = config.read_model_config(config.MODEL_CONFIG).model_config_list.config
    assert (model.name, model.base_path) == ("clothing", "/models/clothing")
    assert model.model_version_policy == template.model_version_policy

    shutil.copytree(local.base / "1", tmp_path / "models" / "clothing" / "1")
    args = ["--model_config_file", str(rendered), "--mount", f"{tmp_path / 'models'}:/models"]
    with (
        ServerProcess(args, tmp_path / "server") as server,
        ServingClient(server.address, timeout=60) as client,
    ):
        assert client.status("clothing") == [(1, "AVAILABLE")]
        out = client.predict_bytes(_images(2), model=config.served_model_name(params))
        assert int(out["model_version"]) == 1 and out["probabilities"].shape == (2, len(LABELS))


def test_a_version_whose_warmup_fails_never_becomes_available(tmp_path, export_classifier):
    """Guards warmup-before-AVAILABLE and availability: under the default policy (latest 1)
    a new version whose warmup request cannot run is reported END with the reason, and the
    previous version keeps serving instead of being unloaded for it."""
    from tensorflow_serving.config import model_server_config_pb2

    from serving.manager import ModelManager
    from serving.warmup import write_warmup

    base = tmp_path / LOCAL_MODEL
    _export_version(export_classifier, base, 1)
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

        from prometheus_client.parser import text_string_to_metric_families

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
        assert status == 200, text
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
        rest_ok = (("api", "RestPredict"), ("code", "OK"), ("model", LOCAL_MODEL))
        assert samples[("imgpipe_serving_requests_total", rest_ok)] >= len(available), text
        latency = (("api", "RestPredict"), ("model", LOCAL_MODEL))
        assert samples[("imgpipe_serving_latency_seconds_count", latency)] >= len(available)
        assert samples[("imgpipe_serving_latency_seconds_sum", latency)] > 0

    @pytest.mark.parametrize(
        ("path", "body", "expected", "says"),
        [
            (f"/v1/models/{LOCAL_MODEL}:predict", b"{not json", 400, "not JSON"),
            (
                f"/v1/models/{LOCAL_MODEL}:predict",
                {"instances": [], "inputs": []},
                400,
                "exactly one of 'instances'",
            ),
            (f"/v1/models/{LOCAL_MODEL}:predict", {"instances": [{"b64": "!!"}]}, 400, "base64"),
            (f"/v1/models/{LOCAL_MODEL}:predict", {"instances": ["not an image"]}, 400, "image"),
            (
                f"/v1/models/{LOCAL_MODEL}:predict",
                {"inputs": {"pixels": ["x"]}},
                400,
                "unexpected ['pixels']",
            ),
            ("/v1/models/nope:predict", {"instances": ["x"]}, 404, "'nope'"),
            (
                f"/v1/models/{LOCAL_MODEL}/versions/99:predict",
                {"instances": ["x"]},
                404,
                f"Specific({LOCAL_MODEL}, 99)",
            ),
            (f"/v1/models/{LOCAL_MODEL}/predict", {"instances": ["x"]}, 404, "Not Found"),
        ],
    )
    def test_bad_rest_requests(self, local, path, body, expected, says):
        status, answer = _http("POST", f"{local.rest}{path}", body)
        assert status == expected, answer
        assert says in answer["error"], answer

    def test_rest_body_over_the_message_cap_is_refused(self, local):
        """A body declared larger than the message cap gets 413 before it is read."""
        import http.client
        from urllib.parse import urlsplit

        url = urlsplit(local.rest)
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        try:
            connection.putrequest("POST", f"/v1/models/{LOCAL_MODEL}:predict")
            connection.putheader("Content-Type", "application/json")
            connection.putheader("Content-Length", str(MAX_MESSAGE_BYTES + 1))
            connection.endheaders()
            response = connection.getresponse()
            assert response.status == 413, response.read()
            assert b"Too Large" in response.read()
        finally:
            connection.close()
