"""How the CLI reports a failure: the project's own errors (bad input, named in the message)
as one line and exit 1; anything else, a bug here or a ValueError from Keras or numpy, with its
traceback. No TensorFlow."""

from __future__ import annotations

import pytest

from commands import main, tracking
from imgpipe.core.errors import InputError


def _failing(exc: Exception):
    def command(args) -> None:
        raise exc

    return command


def test_an_input_error_is_one_line_and_exit_1(monkeypatch, capsys):
    monkeypatch.setattr(
        tracking, "cmd_summary", _failing(InputError("params.yaml: train.epochs 0"))
    )
    assert main(["summary"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "imgpipe summary: error: params.yaml: train.epochs 0"
    assert "Traceback" not in err


def test_any_other_value_error_keeps_its_traceback(monkeypatch):
    """A ValueError that is not ours (Keras raises them for bugs) is not swallowed into a line:
    it propagates, so the interpreter prints where it came from."""
    bug = ValueError("Input 0 of layer dense is incompatible with the layer")
    monkeypatch.setattr(tracking, "cmd_summary", _failing(bug))
    with pytest.raises(ValueError, match="incompatible") as raised:
        main(["summary"])
    assert raised.value is bug


@pytest.mark.parametrize("through", ["train", "fine-tune"])
def test_seeds_refuses_a_stage_before_finetune_whose_figures_would_be_stale(
    tmp_path, monkeypatch, capsys, through
):
    """A recipe's figures are fine-tuning's: through train they would be the workspace's older
    metrics/finetune.json, the same for every seed. Refused before any experiment runs."""
    (tmp_path / "params.yaml").write_text("train: {seed: 42}\nfinetune: {seed: 42}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["seeds", "--seeds", "1", "2", "--through", through]) == 1
    err = capsys.readouterr().err
    assert "--through must be finetune or a later stage" in err and repr(through) in err, err
