"""Other libraries' noise is silenced where it starts, and `unisd --verbose` brings it back."""
from __future__ import annotations

import os
import subprocess
import sys
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


@pytest.mark.parametrize("verbose", [False, True])
def test_vllm_lines_logged_before_it_configures_logging_and_torch_cpp_warnings_are_silenced(verbose):
    # vLLM logs the Triton line at import, before its handlers exist, so only its logger's own level stops it;
    # torch reads TORCH_CPP_LOG_LEVEL once at import, so it must be set before torch is imported
    script = ("import logging, os, sys\nfrom unisd import quiet\n"
              f"quiet.apply({verbose})\n"
              "logging.getLogger('vllm.triton_utils.importing').warning('Triton is installed')\n"
              "print(os.environ.get('TORCH_CPP_LOG_LEVEL'), 'torch' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_LOGGING_LEVEL", "TORCH_CPP_LOG_LEVEL")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert ("Triton is installed" in done.stderr) == verbose
    assert done.stdout.split() == (["None", "False"] if verbose else ["ERROR", "False"])


@pytest.mark.parametrize("verbose", [False, True])
def test_lm_eval_advice_for_its_own_command_line_is_dropped_unless_verbose(verbose, caplog):
    import logging

    quiet.apply(not verbose)
    quiet.apply(verbose)  # applying twice leaves one filter, or none
    with caplog.at_level(logging.WARNING):
        logging.getLogger("lm_eval.api.task").warning("unisd_demo: Custom kwargs can be passed to `--metadata` in console")
        logging.getLogger("lm_eval.models.vllm_causallms").warning("The `device` argument is ignored by the vLLM backend.")
        logging.getLogger("lm_eval.evaluator").warning("generation_kwargs: {'max_gen_toks': 96} specified through cli")
        logging.getLogger("lm_eval.evaluator").warning("a real problem")
    assert [r.getMessage()[:14] for r in caplog.records] == (
        ["unisd_demo: Cu", "The `device` a", "generation_kwa", "a real problem"] if verbose else ["a real problem"])
