"""Other libraries' noise is silenced where it starts, and `unisd --verbose` brings it back."""
from __future__ import annotations

import subprocess
import warnings

import pytest
import transformers

from unisd import quiet


@pytest.fixture(autouse=True)
def _restore(monkeypatch):
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    monkeypatch.setattr(quiet, "verbose", False)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        yield


def _model() -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("verbose", [False, True])
def test_the_gradient_checkpointing_deprecation_is_silenced_unless_verbose(verbose):
    quiet.apply(verbose)
    model = _model()
    with warnings.catch_warnings(record=True) as caught:
        assert model.is_gradient_checkpointing is False  # what peft reads when it wraps a model for LoRA
    assert any("is_gradient_checkpointing" in str(w.message) for w in caught) == verbose


@pytest.mark.parametrize("verbose", [False, True])
def test_vllm_logs_errors_only_unless_verbose(verbose):
    quiet.apply(verbose)
    import os

    assert os.environ["VLLM_LOGGING_LEVEL"] == ("INFO" if verbose else "ERROR")


@pytest.mark.parametrize("verbose", [False, True])
def test_lm_eval_outside_a_git_repository_says_nothing_unless_verbose(verbose, tmp_path, monkeypatch, capfd):
    if subprocess.run(["git", "--version"], capture_output=True).returncode != 0:
        pytest.skip("git is not installed")
    import lm_eval.evaluator
    import lm_eval.loggers.utils

    # lm-eval's own lookup, whatever an earlier evaluation in this process left in its place
    monkeypatch.setattr(lm_eval.evaluator, "get_git_commit_hash", lm_eval.loggers.utils.get_git_commit_hash)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.chdir(tmp_path)
    quiet.apply(verbose)
    quiet.lm_eval()
    capfd.readouterr()
    assert lm_eval.evaluator.get_git_commit_hash() is None
    assert ("not a git repository" in capfd.readouterr().err) == verbose


@pytest.mark.parametrize("flags", [[], ["--verbose"]])
def test_the_command_line_quiets_every_command_unless_verbose(flags):
    from click.testing import CliRunner

    from unisd.cli import main

    result = CliRunner().invoke(main, [*flags, "presets"])
    assert result.exit_code == 0, result.output
    assert quiet.verbose == bool(flags)
