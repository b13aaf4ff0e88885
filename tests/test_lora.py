"""LoRA knobs: rank, alpha, dropout and target modules reach peft; the run writes the merged model and the adapter."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from unisd.cli import main

PROMPT = "What is two plus two? The answer is 4"


def _train(tiny_model: Path, tiny_data: Path, out: Path, *flags: str) -> CliRunner:
    result = CliRunner().invoke(main, ["train", "--model", str(tiny_model), "--data", str(tiny_data), "--out", str(out),
                                       "--max-steps", "1", "--batch-size", "2", "--lr", "5e-2", "--plugins", "mix",
                                       "-o", "mix.source=gold", "-o", "mix.prob=1", "--lora", *flags])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def rank8_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lora8")
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in [("Two plus two?", "4"),
                                                                                         ("Sky colour?", "blue")]))
    _train(tiny_model, data, folder / "run", "--lora-r", "8", "--lora-alpha", "16", "--lora-dropout", "0")
    return folder / "run"


def _logits(model: torch.nn.Module, folder: Path) -> torch.Tensor:
    ids = AutoTokenizer.from_pretrained(folder)(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_a_rank_8_run_writes_a_rank_8_adapter_beside_the_merged_model(rank8_run: Path, tiny_model: Path) -> None:
    adapter = json.loads((rank8_run / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (8, 16, 0.0)
    assert adapter["base_model_name_or_path"] == str(tiny_model.resolve())
    assert (rank8_run / "adapter" / "adapter_model.safetensors").is_file()
    assert not (rank8_run / "adapter_config.json").exists()  # the folder itself stays a plain model
    assert json.loads((rank8_run / "unisd.json").read_text())["config"]["lora_r"] == 8


def test_the_adapter_on_the_base_model_computes_what_the_merged_model_does(rank8_run: Path, tiny_model: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    before = _logits(base, tiny_model)
    adapted = PeftModel.from_pretrained(base, str(rank8_run / "adapter"))
    merged = AutoModelForCausalLM.from_pretrained(rank8_run, dtype=torch.float32)
    assert {m.r["default"] for m in adapted.modules() if hasattr(m, "lora_A") and "default" in m.r} == {8}
    want = _logits(merged, rank8_run)
    assert not torch.allclose(before, want, atol=1e-3)  # the adapter learned something to compare
    torch.testing.assert_close(_logits(adapted, rank8_run), want, atol=1e-4, rtol=1e-4)


def test_lm_eval_loads_the_adapter_with_peft(rank8_run: Path, tiny_model: Path) -> None:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    request = Instance("loglikelihood", {}, ("What is two plus two?", " The answer is 4"), 0)
    scored = {}
    for name, args in {"adapter": {"pretrained": str(tiny_model), "peft": str(rank8_run / "adapter")},
                       "merged": {"pretrained": str(rank8_run)}, "base": {"pretrained": str(tiny_model)}}.items():
        lm = HFLM(**args, dtype="float32", device="cpu", batch_size=1)
        (scored[name], _), = lm.loglikelihood([request])
    assert scored["adapter"] == pytest.approx(scored["merged"], abs=1e-4)
    assert scored["adapter"] != pytest.approx(scored["base"], abs=1e-4)


def test_lora_targets_choose_the_wrapped_modules(tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    _train(tiny_model, tiny_data, tmp_path / "run", "--lora-r", "2", "--lora-targets", "q_proj, v_proj")
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert json.loads((tmp_path / "run" / "unisd.json").read_text())["config"]["lora_targets"] == "q_proj, v_proj"


@pytest.mark.parametrize("targets, message", [("nope_proj", "--lora-targets nope_proj: Target modules"),
                                              (" , ", "--lora-targets is empty")])
def test_lora_targets_that_match_nothing_are_refused(tiny_model: Path, tiny_data: Path, tmp_path: Path,
                                                     targets: str, message: str) -> None:
    result = CliRunner().invoke(main, ["train", "--model", str(tiny_model), "--data", str(tiny_data),
                                       "--out", str(tmp_path / "run"), "--lora", "--lora-targets", targets])
    assert result.exit_code == 2
    last = result.output.rstrip("\n").split("\n")[-1]  # after transformers' loading bar, if any
    assert last.startswith(f"error: {message}") and result.output.count("error:") == 1, result.output
    assert not (tmp_path / "run").exists()


def test_lora_knobs_are_flags_with_ranges(tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    for flag, value in [("--lora-r", "0"), ("--lora-dropout", "1"), ("--lora-alpha", "0")]:
        result = CliRunner().invoke(main, ["train", "--model", str(tiny_model), "--data", str(tiny_data),
                                           "--out", str(tmp_path / "run"), "--lora", flag, value])
        assert result.exit_code == 2 and f"'{flag}'" in result.output, result.output


def _tiny_gemma3() -> torch.nn.Module:
    """gemma-3-4b's layout (Gemma3ForConditionalGeneration: a SigLIP tower, a projector, a language model), tiny."""
    from transformers import AutoModelForCausalLM, Gemma3Config

    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28,
                  patch_size=14)
    return AutoModelForCausalLM.from_config(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4))


@pytest.mark.parametrize("targets", ["all-linear", "q_proj,fc1"])
def test_lora_on_a_multimodal_checkpoint_wraps_the_language_model_only(targets: str) -> None:
    from unisd import models

    model = _tiny_gemma3()
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    text_linears = {n for n, m in model.model.language_model.named_modules() if isinstance(m, torch.nn.Linear)}
    wrapped = {n.split(".lora_")[0].removeprefix("base_model.model.model.language_model.")
               for n, _ in models.add_lora(model, 4, 8, 0.0, targets).named_parameters() if "lora_" in n}
    assert wrapped and not any("vision" in n or "projector" in n for n in wrapped)
    wanted = {n for n in text_linears if targets == "all-linear" or n.rsplit(".", 1)[-1] == "q_proj"}
    assert wrapped == wanted  # every linear layer of the language model (or the named ones), nothing else
