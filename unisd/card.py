"""The model card (README.md) of a trained folder: Hub front matter, how it was trained, and, once
`unisd eval` has scored it, its results with 95% intervals.

The front matter is huggingface_hub's ModelCardData, so the Hub reads `base_model`, `datasets` and
`license`; each is written only where it is known, never guessed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from huggingface_hub import ModelCard, ModelCardData

# embedded aliases: the Hub model they were quantized from, and its license
ALIAS_SOURCES = {"smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
RESULTS_HEADING = "## Evaluation"


def lineage(model: str) -> tuple[Any, Any]:
    """(base_model, license) of the model a run started from, where they are known."""
    if model in ALIAS_SOURCES:
        return ALIAS_SOURCES[model]
    if model.endswith(".gguf"):
        return None, None
    folder = Path(model)
    if folder.exists():  # a local folder: what its own card says (a unisd folder names its Hub ancestor)
        readme = folder / "README.md"
        has_meta = readme.is_file() and readme.read_text().startswith("---\n")
        data = ModelCard.load(readme).data if has_meta else ModelCardData()
        return data.base_model, data.license
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model, "README.md")  # a Hub id: its card if the Hub cache holds it
    return model, ModelCard.load(cached).data.license if isinstance(cached, str) else None


def render(record: Mapping[str, Any], name: str) -> str:
    """The card of a folder whose unisd.json is `record`; the results section says it is not yet scored."""
    from unisd.data.benchmarks import hub_dataset

    config = record["config"]
    base_model, license_ = lineage(config["model"])
    dataset = hub_dataset(config["data"])
    plugins = config["plugins"]
    meta = ModelCardData(base_model=base_model, library_name="transformers", license=license_,
                         datasets=[dataset] if dataset else None,
                         tags=["unisd", "self-distillation", *plugins, *(["lora"] if config["lora"] else [])])
    options = {p: v["options"] for p, v in record.get("plugins", {}).items()}
    rows = [("base model", f"`{config['model']}`"), ("data", f"`{config['data']}` ({record['examples']} examples)"),
            ("preset", config["preset"] or "none"), ("plugins", ", ".join(plugins) or "none (plain self-distillation)"),
            ("optimizer steps", f"{record['steps']} (batch {config['batch_size']} x grad-accum {config['grad_accum']})"),
            ("learning rate", f"{config['lr']} (AdamW, cosine, {config['warmup_ratio']:.0%} warmup)"),
            ("divergence", f"{config['divergence']} at temperature {config['loss_temperature']}"),
            ("completions", f"up to {config['max_new_tokens']} tokens, sampled at temperature {config['temperature']}"),
            ("weights", "LoRA merged" if config["lora"] else "all trained"), ("seed", str(config["seed"]))]
    body = (f"# {name}\n\n`{config['model']}` self-distilled with unisd {record.get('unisd_version', '')}: the "
            "student samples its own answer, and the same model, shown the gold answer, scores it token by token.\n\n"
            "## Training\n\n| setting | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows) +
            (f"\nPlugin options:\n\n```json\n{json.dumps(options, indent=2)}\n```\n" if options else "") +
            "\nThe full resolved configuration is in `unisd.json`; per-step metrics in `metrics.jsonl`.\n\n"
            f"{RESULTS_HEADING}\n\nNot scored yet: `unisd eval --model {name}=<this folder> --tasks ...` writes the "
            "results here. With lm-eval directly:\n\n```\nlm_eval --model hf --model_args pretrained=<this folder> "
            "--include_path \"$(unisd tasks-path)\" --tasks unisd --apply_chat_template --confirm_run_unsafe_code\n```\n")
    return f"---\n{meta.to_yaml()}\n---\n\n{body}"


def write_results(folder: Path, results: Mapping[str, Any], name: str) -> None:
    """(Re)write the card's results section from an `unisd eval` results.json in which `folder` is `name`."""
    readme = folder / "README.md"
    scores, intervals = results["scores"][name], results.get("ci95", {}).get(name, {})
    lines = [f"| {task} | {score:.1f} | " + ("[{:.1f}, {:.1f}]".format(*intervals[task]) if task in intervals else "-")
             + " |" for task, score in scores.items()]
    overall = results.get("overall_ci95", {}).get(name)
    limit = results.get("limit")
    section = (f"{RESULTS_HEADING}\n\nScored by `unisd eval` with lm-eval"
               f"{f' on the first {limit} documents of each task' if limit else ''}; scores in percent, "
               "95% intervals over the documents.\n\n| task | score | 95% interval |\n|---|---|---|\n"
               + "\n".join(lines) + "\n"
               + ("\nOverall 95% interval: [{:.1f}, {:.1f}].\n".format(*overall) if overall else ""))
    text = readme.read_text()
    head = text.split(f"\n{RESULTS_HEADING}\n", 1)[0]
    readme.write_text(f"{head}\n{section}")
