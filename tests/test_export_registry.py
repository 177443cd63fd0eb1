"""evaluate, export and push on a tiny model that really learns (3 classes of class-pattern PNGs,
Lite0 ImageNet weights at 64 px, frozen phase only).

- the SavedModel's bytes signature gives the Keras model's probabilities on PNG and JPEG input;
- its int8 TFLite model agrees with it at top-1 on the test split, and the parity report says so;
- the TF Serving warmup file parses as PredictionLog records that run against the SavedModel;
- the blessing gate, against a real MLflow registry (SQLite) and a real serving folder: a
  sabotaged candidate on top of a good champion is refused, a better one is promoted and pushed
  as the next version.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TinyProject, build_tiny_project, class_pattern, encode_image, read_csv_rows

pytestmark = pytest.mark.slow

IMAGE_SIZE = 64
CLASSES = {"a": 40, "b": 40, "c": 40}  # ingest 20% val, 40% test: 48 test images
MODEL = {"backbone": "efficientnet_lite0", "weights": "imagenet", "image_size": IMAGE_SIZE}
TRAIN = {"seed": 42, "batch_size": 16, "epochs": 4, "learning_rate": 0.001}
MODEL_NAME = "tiny"
TOLERANCE = 1e-5
"""Largest allowed difference between a served probability and the Keras model's."""


class Exported:
    def __init__(self, project: TinyProject, outputs: Any, report: dict, labels: list[str]):
        self.project, self.outputs, self.report, self.labels = project, outputs, report, labels
        self.saved_model = outputs.saved_model(MODEL_NAME)


def _evaluate(project: TinyProject, model_dir: Path, root: Path, champion: Any = None, **gate):
    from components import evaluate
    from imgpipe.params import EvaluateParams, ModelParams

    outputs = evaluate.EvaluateOutputs(
        root / "evaluate", root / "evaluate.json", root / "confusion.csv", root / "calibration.csv"
    )
    params = EvaluateParams(misclassified_examples=4, **gate)
    result = evaluate.run(
        model_dir, project.ingest, outputs, ModelParams(**MODEL), params, champion
    )
    return outputs, result


def _export(project: TinyProject, model_dir: Path, evaluation: Path, root: Path, **export_params):
    from components import export
    from imgpipe.params import ExportParams, ModelParams, ServingParams

    outputs = export.ExportOutputs(root / "export", root / "export.json")
    params = ExportParams(warmup_images=3, representative_images=48, **export_params)
    report = export.run(
        model_dir,
        project.ingest,
        evaluation,
        outputs,
        ModelParams(**MODEL),
        ServingParams(model_name=MODEL_NAME, model_base_path=str(root / "models")),
        params,
        progress=False,
    )
    return outputs, report


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Exported:
    from imgpipe.labels import read_labels

    root = tmp_path_factory.mktemp("export")
    project = build_tiny_project(
        root, CLASSES, IMAGE_SIZE, MODEL, TRAIN, val_fraction=0.2, test_fraction=0.4
    )
    evaluated, _ = _evaluate(project, project.train, root)
    outputs, report = _export(project, project.train, evaluated.metrics, root)
    return Exported(project, outputs, report, read_labels(project.ingest / "labels.txt"))


def test_bytes_signature_gives_the_keras_probabilities_on_png_and_jpeg(exported):
    """Guards train/serve skew: decoding and resizing inside the graph is the training path,
    so the served probabilities equal the Keras model's on the decoded image (within
    TOLERANCE), for lossless and lossy formats and images of another size than the model's;
    the uint8 tensor signature agrees, and garbage bytes are an InvalidArgumentError."""
    import keras
    import tensorflow as tf

    from components.export import SavedModelClassifier
    from imgpipe.datasets import decode_and_resize

    served = SavedModelClassifier(exported.saved_model)
    model = keras.models.load_model(exported.project.train / "model.keras", compile=False)
    pixels = [class_pattern(i % 3, (90, 70), seed=900 + i) for i in range(6)]
    by_format = {}
    for fmt in ("PNG", "JPEG"):
        encoded = [encode_image(p, fmt) for p in pixels]
        got = served.predict_bytes(encoded)
        decoded = tf.stack([decode_and_resize(b, IMAGE_SIZE) for b in encoded])
        want = model(decoded, training=False).numpy()
        np.testing.assert_allclose(got, want, atol=TOLERANCE, err_msg=fmt)
        assert got.shape == (len(pixels), len(exported.labels))
        by_format[fmt] = got
    # The model is not a constant: the class patterns get different answers.
    assert len(set(by_format["PNG"].argmax(axis=1))) == 3

    tensors = served.predict_images(np.stack(pixels))  # PNG is lossless: same pixels
    np.testing.assert_allclose(tensors["probabilities"], by_format["PNG"], atol=TOLERANCE)
    top = tensors["probabilities"].argmax(axis=1)
    assert list(tensors["class_index"]) == list(top)
    assert [n.decode() for n in tensors["class_name"]] == [exported.labels[i] for i in top]

    with pytest.raises(tf.errors.InvalidArgumentError):
        served.predict_bytes([b"this is not an image"])


def test_int8_tflite_agrees_with_the_saved_model_and_the_report_says_so(exported):
    """Guards the edge artifacts: over the whole test split the int8 model's top-1 agrees with
    the SavedModel on at least 97% of images and the float model on all of them; the report's
    figures are recomputed here independently; labels and model card ship alongside."""
    from components.export import TFLITE, TFLiteClassifier
    from imgpipe.labels import read_labels
    from imgpipe.tfrecords import read_split

    parity = exported.report["parity"]
    test = read_split(exported.project.ingest / "shards")
    assert parity["images"] == len(test.labels) == 48
    assert parity["tflite_int8"]["top1_agreement"] >= 0.97, parity
    assert parity["tflite_float32"]["top1_agreement"] == 1.0, parity
    assert parity["tflite_float32"]["max_abs_probability_diff"] < 1e-4, parity
    assert json.loads(exported.outputs.report.read_text()) == exported.report

    # Recompute the int8 agreement from the files the report describes.
    from components.export import SavedModelClassifier
    from imgpipe.datasets import decode_and_resize

    reference = SavedModelClassifier(exported.saved_model).predict_bytes(test.encoded).argmax(1)
    int8 = TFLiteClassifier(exported.outputs.directory / TFLITE / "model_int8.tflite")
    assert int8.input["dtype"] == np.uint8  # full integer, uint8 in and out
    top = [int8(decode_and_resize(b, IMAGE_SIZE).numpy()).argmax() for b in test.encoded]
    agreement = float(np.mean(np.array(top) == reference))
    assert agreement == pytest.approx(parity["tflite_int8"]["top1_agreement"], abs=1e-6)
    accuracy = float(np.mean(np.array(top) == test.labels))
    assert accuracy == pytest.approx(parity["tflite_int8"]["accuracy"], abs=1e-6)

    tflite = exported.outputs.directory / TFLITE
    assert read_labels(tflite / "labels.txt") == exported.labels
    sizes = exported.report["sizes_mb"]
    assert sizes["tflite_int8"] < sizes["tflite_float32"] / 2.5  # int8 weights: ~4x smaller
    card = (exported.outputs.directory / "model_card.md").read_text()
    for expected in ("## Data", "Licence: unknown", "## Test metrics", "## Limits", "int8"):
        assert expected in card, expected


def test_warmup_file_holds_real_requests_that_run_against_the_saved_model(exported):
    """Guards TF Serving warmup: the file parses as PredictionLog records, each a Predict on
    serving_default for this model with real validation images, and each runs."""
    import tensorflow as tf

    from components.export import BYTES_INPUT, WARMUP, read_warmup

    assert (exported.saved_model / WARMUP).is_file()
    records = read_warmup(exported.saved_model)
    assert len(records) == 3
    val_hashes = {
        r["sha256"]
        for r in read_csv_rows(exported.project.ingest / "manifest.csv")
        if r["split"] == "val"
    }
    loaded = tf.saved_model.load(str(exported.saved_model))
    import hashlib

    for record in records:
        assert record.WhichOneof("log_type") == "predict_log"
        request = record.predict_log.request
        assert request.model_spec.name == MODEL_NAME
        assert request.model_spec.signature_name == "serving_default"
        assert list(request.inputs) == [BYTES_INPUT]
        images = tf.make_ndarray(request.inputs[BYTES_INPUT])
        assert images.shape == (1,)
        assert hashlib.sha256(images[0]).hexdigest() in val_hashes
        outputs = loaded.signatures["serving_default"](**{BYTES_INPUT: tf.constant(images)})
        probabilities = outputs["probabilities"].numpy()
        assert probabilities.shape == (1, len(exported.labels))
        assert probabilities.sum() == pytest.approx(1.0, abs=1e-5)


def _variant(source: Path, target: Path, edit: Callable[[np.ndarray, np.ndarray], tuple]) -> Path:
    """A copy of the model with its output layer's (kernel, bias) edited."""
    import keras

    from components.train import MODEL
    from imgpipe.training import HEAD_NAME

    model = keras.models.load_model(source / MODEL, compile=False)
    dense = [layer for layer in model.get_layer(HEAD_NAME).layers if layer.weights][-1]
    kernel, bias = dense.get_weights()
    dense.set_weights(list(edit(kernel, bias)))
    target.mkdir(parents=True)
    model.save(target / MODEL)
    return target


def test_gate_refuses_a_sabotaged_candidate_and_promotes_a_better_one(
    exported, tmp_path, monkeypatch
):
    """Guards the promotion gate, end to end against a real MLflow registry and serving folder:

    1. a champion that never predicts class c (accuracy about 2/3) is blessed on the absolute
       floors alone, registered and pushed as serving version 1;
    2. a sabotaged candidate (its class outputs shuffled) is registered as challenger only:
       not blessed, champion unchanged, nothing pushed;
    3. the unmodified model (better than the champion) is promoted and pushed as version 2;
    4. a blessing decided against an older champion is refused at push time;
    5. the champion can be fetched from the registry into a serving base path.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from imgpipe import registry
    from imgpipe.params import ServingParams
    from imgpipe.tracking import stage_run

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "gate")
    mlflow.set_tracking_uri(uri)
    serving = ServingParams(model_name=MODEL_NAME, model_base_path=str(tmp_path / "models"))
    gate = {"min_accuracy": 0.5, "min_balanced_accuracy": 0.5, "max_regression": 0.01}
    client = MlflowClient(uri)
    project = exported.project

    def candidate(name: str, edit: Callable) -> tuple[dict, dict]:
        root = tmp_path / name
        model_dir = _variant(project.train, root / "model", edit)
        evaluated, result = _evaluate(
            project, model_dir, root, registry.champion(MODEL_NAME), **gate
        )
        exported_to, _ = _export(project, model_dir, evaluated.metrics, root, int8=False)
        blessing = registry.read_blessing(evaluated.directory / "blessing.json")
        with stage_run("push"):
            pushed = registry.register(
                exported_to.directory,
                exported_to.saved_model(MODEL_NAME),
                blessing,
                serving,
                root / "push.json",
            )
        return result, pushed

    def never_c(kernel, bias):
        return kernel, np.where(np.arange(len(bias)) == 2, -100.0, bias)

    first, pushed = candidate("champion", never_c)
    assert first["blessed"] and first["champion"] is None
    assert 0.5 <= first["test"]["accuracy"] < 0.8, first["test"]
    assert pushed["version"] == 1 and pushed["serving_version"] == 1
    assert registry.champion(MODEL_NAME).version == 1
    assert registry.serving_versions(tmp_path / "models", MODEL_NAME) == [1]

    def shuffled(kernel, bias):
        order = [1, 2, 0]  # no class keeps its own output
        return kernel[:, order], bias[order]

    second, pushed = candidate("sabotaged", shuffled)
    assert not second["blessed"]
    failed = {c["check"] for c in second["blessing"]["checks"] if not c["passed"]}
    assert {"min_accuracy", "no_regression_accuracy"} <= failed, second["blessing"]
    assert second["champion"]["version"] == 1
    assert second["champion"]["accuracy"] == pytest.approx(first["test"]["accuracy"], abs=1e-4)
    assert pushed["version"] == 2 and pushed["pushed_to"] is None
    assert pushed["aliases"] == ["challenger"]
    assert registry.champion(MODEL_NAME).version == 1
    assert int(client.get_model_version_by_alias(MODEL_NAME, "challenger").version) == 2
    assert client.get_model_version(MODEL_NAME, "2").tags["blessed"] == "false"
    assert registry.serving_versions(tmp_path / "models", MODEL_NAME) == [1]

    third, pushed = candidate("better", lambda kernel, bias: (kernel, bias))
    assert third["blessed"], third["blessing"]
    assert third["test"]["accuracy"] > first["test"]["accuracy"]
    assert pushed["version"] == 3 and pushed["serving_version"] == 2
    assert registry.champion(MODEL_NAME).version == 3
    assert registry.serving_versions(tmp_path / "models", MODEL_NAME) == [1, 2]
    pushed_model = tmp_path / "models" / MODEL_NAME / "2"
    assert (pushed_model / "saved_model.pb").is_file()
    assert (pushed_model / "assets.extra" / "tf_serving_warmup_requests").is_file()
    assert client.get_model_version(MODEL_NAME, "3").tags["serving_version"] == "2"
    # The registry holds the deployable files, downloadable by alias.
    files = mlflow.artifacts.download_artifacts(
        f"models:/{MODEL_NAME}@champion", dst_path=str(tmp_path / "download")
    )
    assert (Path(files) / "saved_model" / "saved_model.pb").is_file()
    assert (Path(files) / "tflite" / "model_float32.tflite").is_file()
    assert (Path(files) / "model_card.md").is_file()

    # 4. A blessing decided before the champion moved is stale.
    stale = registry.read_blessing(tmp_path / "champion" / "evaluate" / "blessing.json")
    with stage_run("push"), pytest.raises(registry.PushError, match="rerun evaluate"):
        registry.register(
            tmp_path / "better" / "export",
            tmp_path / "better" / "export" / "serving" / MODEL_NAME / "1",
            stale,
            serving,
            tmp_path / "stale.json",
        )
    assert registry.serving_versions(tmp_path / "models", MODEL_NAME) == [1, 2]
    assert len(client.search_model_versions(f"name = '{MODEL_NAME}'")) == 3

    # 5. What the serving pod's init container does: the champion, as its serving version.
    fetched = registry.fetch(MODEL_NAME, "champion", tmp_path / "pod-models")
    assert fetched == tmp_path / "pod-models" / MODEL_NAME / "2"
    assert (fetched / "saved_model.pb").is_file()
    assert (fetched / "assets.extra" / "tf_serving_warmup_requests").is_file()
    shutil.rmtree(tmp_path / "download")
