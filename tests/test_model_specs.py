"""Every model spec is checked before anything is loaded, scored or written: one `error:` line, exit status 2."""
from __future__ import annotations

import pytest
import transformers
from click.testing import CliRunner

import unisd.evaluate as ev
from unisd.cli import main

MISSING = "nobody-here/no-such-model-7b"  # in no cache, and the tests run offline


@pytest.fixture
def base(tmp_path):
    """A model folder as far as a check can tell without loading weights: its config."""
    folder = tmp_path / "base"
    transformers.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                             num_attention_heads=2).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("spec", ["runs/sd", MISSING])
def test_eval_refuses_a_missing_model_before_scoring_the_first(spec, base, tmp_path, monkeypatch):
    scored: list[str] = []
    monkeypatch.setattr(ev, "run_lm_eval", lambda path, *rest: scored.append(path) or {"results": {}})
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["eval", "--model", f"base={base}", "--model", f"sd={spec}",
                                       "--tasks", "unisd_demo", "--out", "eval"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: model '{spec}' is neither a local folder nor in the Hugging Face cache")
    assert len(result.output.strip().splitlines()) == 1
    assert scored == [] and not (tmp_path / "eval").exists()


def test_eval_refuses_a_missing_retention_base_too(base, tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "run_lm_eval", lambda *args: pytest.fail("scored before the specs were checked"))
    result = CliRunner().invoke(main, ["eval", "--model", f"x={base}", "--retention", "--base", str(tmp_path / "gone"),
                                       "--tasks", "unisd_demo", "--out", str(tmp_path / "eval")])
    assert result.exit_code == 2 and result.output.startswith("error: ")
    assert "no such model folder" in result.output and len(result.output.strip().splitlines()) == 1


def test_a_dry_run_with_an_uncached_hub_id_offline_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["train", "--model", MISSING, "--data", "demo", "--out", str(tmp_path / "run"),
                                       "--dry-run"])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (f"error: model '{MISSING}' is neither a local folder nor in the Hugging Face "
                                     f"cache, and the Hub cannot be reached (offline); check the path, or download "
                                     f"it first: hf download {MISSING}")
