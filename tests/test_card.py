"""The final folder's model card: Hub front matter huggingface_hub parses, the training settings, eval results."""
from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard

from unisd import card
from unisd.config import TrainConfig


def _record(model: str, data: str, **settings) -> dict:
    config = TrainConfig(model=model, data=data, out="runs/x", **settings).to_json()
    return {"unisd_version": "0.1.0", "config": config, "steps": 12, "examples": 40,
            "plugins": {p: {"options": {"k": 3}} for p in config["plugins"]}}


def test_a_hub_model_on_a_benchmark_names_both_in_the_front_matter(tmp_path):
    text = card.render(_record("Qwen/Qwen2.5-0.5B-Instruct", "mbpp", plugins=("ema", "agree"), lora=True), "mbpp-star")
    data = ModelCard(text).data
    assert data.base_model == "Qwen/Qwen2.5-0.5B-Instruct"
    assert data.library_name == "transformers"
    assert data.tags == ["unisd", "self-distillation", "ema", "agree", "lora"]
    assert data.datasets == ["google-research-datasets/mbpp"]
    assert data.license is None  # not in the Hub cache here: not guessed
    assert "| optimizer steps | 12 (batch 4 x grad-accum 1) |" in text
    assert "| learning rate | 2e-05 (AdamW, cosine, 10% warmup) |" in text
    assert "](http" not in text  # no links at all, so none invented


def test_the_embedded_alias_names_its_source_and_license_and_a_jsonl_names_no_dataset():
    data = ModelCard(card.render(_record("smollm2-135m", "train.jsonl"), "x")).data
    assert (data.base_model, data.license, data.datasets) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0", None)


def test_a_local_folder_passes_on_what_its_own_card_says(tmp_path):
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "README.md").write_text("---\nbase_model: org/original\nlicense: mit\n---\n# parent\n")
    data = ModelCard(card.render(_record(str(parent), "demo"), "child")).data
    assert (data.base_model, data.license) == ("org/original", "mit")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "README.md").write_text("# a card without front matter\n")
    data = ModelCard(card.render(_record(str(bare), "demo"), "child")).data
    assert (data.base_model, data.license) == (None, None)


def test_eval_results_replace_the_section_and_keep_the_front_matter(tmp_path):
    (tmp_path / "README.md").write_text(card.render(_record("smollm2-135m", "cos_e"), "sd"))
    results = {"limit": 40, "scores": {"base": {"unisd_cose": 20.0}, "sd": {"unisd_cose": 32.5, "unisd_mbpp": 10.0}},
               "ci95": {"sd": {"unisd_cose": [18.2, 47.6]}}, "overall_ci95": {"sd": [15.04, 30.96]}}
    card.write_results(tmp_path, results, "sd")
    card.write_results(tmp_path, results, "sd")  # rewriting replaces, never appends
    text = (tmp_path / "README.md").read_text()
    assert text.count(card.RESULTS_HEADING) == 1 and "Not scored yet" not in text
    assert "| unisd_cose | 32.5 | [18.2, 47.6] |\n| unisd_mbpp | 10.0 | - |" in text
    assert "first 40 documents" in text and "Overall 95% interval: [15.0, 31.0]." in text
    assert ModelCard.load(tmp_path / "README.md").data.datasets == ["Salesforce/cos_e"]
    assert "| base model | `smollm2-135m` |" in text


def test_a_trained_folder_has_the_card(tmp_path, tiny_model, tiny_data):
    from unisd.train import train

    out = train(TrainConfig(model=str(tiny_model), data=str(tiny_data), out=str(tmp_path / "run"), max_steps=1,
                            batch_size=2, max_new_tokens=4), echo=lambda m: None)
    data = ModelCard.load(Path(out) / "README.md").data
    assert data.library_name == "transformers" and data.tags == ["unisd", "self-distillation"]
    assert data.base_model is None  # the tiny model is a local folder without a card
