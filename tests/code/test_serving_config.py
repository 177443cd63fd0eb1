"""The serving config files TF Serving itself reads (serving/*.config), the model config
rendered from params.yaml, and TF Serving's version policy: parsed with TF Serving's own
schemas, no server started."""

from __future__ import annotations

from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]


def _params(path: Path, serving: str) -> Path:
    path.write_text(f"train:\n  epochs: 1\n{serving}")
    return path


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


def test_committed_model_config_serves_the_params_model_name():
    """Guards the one home of the model name: serving/models.config (what the real
    tensorflow/serving container reads) serves params.yaml's serving.model_name."""
    from serving import config

    name = config.served_model_name(PROJECT / "params.yaml")
    (model,) = config.read_model_config(config.MODEL_CONFIG).model_config_list.config
    assert (model.name, model.base_path) == (name, f"/models/{name}"), (
        f"serving/models.config serves {model.name!r} at {model.base_path}; params.yaml "
        f"serving.model_name is {name!r}: change the file to match"
    )


def test_model_config_rendered_for_params_errors_name_the_key(tmp_path):
    """``python -m serving.config`` names the missing section or key, exits 2, writes nothing."""
    import subprocess
    import sys

    out = tmp_path / "models.config"
    for serving, says in [
        ("", "no 'serving' section"),
        ("serving:\n  model_base_path: models\n", "serving.model_name is missing"),
        ("serving:\n  model_name: a/b\n", "serving.model_name must name a folder"),
    ]:
        params = _params(tmp_path / "params.yaml", serving)
        result = subprocess.run(
            [sys.executable, "-m", "serving.config", "--params", str(params), "--out", str(out)],
            cwd=PROJECT,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 2 and says in result.stderr, result.stderr
        assert not out.exists()


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
