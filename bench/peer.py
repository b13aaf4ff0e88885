"""Peer check (issue 29): TRL's SDFTTrainer and `unisd train --preset sd` on the same rows and settings.

    .venv-trl/bin/python -m bench peer --steps 12 --out bench/results/peer      (needs trl==1.16.0)

Both train SmolLM2-135M on the demo's training sums in unisd's data order (TRL's shuffling off), with one
sample per prompt, a frozen teacher shown the demonstration through unisd's teacher wording, forward KL over
the full vocabulary at the sampling temperature, AdamW with 10% warmup and cosine decay. Two comparisons:

- the first step's loss on identical completions: both sample with top-k 1 (greedy), so from the same
  weights they train on the same completions and their losses should agree;
- scores after --steps steps sampled at --temperature, with `unisd.evaluate` on the held-out sums (95%
  intervals, paired tests against the base), and each run's truncated share per step.

TRL is driven through its public configuration only; its per-step numbers come from its own log history.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path
from typing import Any

from bench import provenance
from unisd import config as cfg
from unisd import demo, evaluate, models, stats
from unisd.data.prompts import TEACHER_TEMPLATE, demonstration
from unisd.train import prepare, train


def arguments(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench peer", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12, help="training steps of the side-by-side runs (0: only the "
                                                         "first-step comparison)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--temperature", type=float, default=0.7, help="sampling and loss temperature of both")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--eval-limit", type=int, default=200)
    p.add_argument("--base-eval", default="", help="a results.json of the base on the same items and settings "
                                                     "(e.g. the recipe study's) to reuse instead of scoring it again")
    p.add_argument("--work", default="runs/peer")
    p.add_argument("--out", default="bench/results/peer")
    return p.parse_args(argv)


def ours(args: argparse.Namespace, folder: Path, steps: int, top_k: int) -> cfg.TrainConfig:
    return cfg.resolve("sd", (), {}, model=demo.MODEL, data="demo", out=str(folder), max_steps=steps,
                       batch_size=args.batch_size, lr=args.lr, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, loss_temperature=args.temperature, top_k=top_k,
                       save_every=0, log_samples=1)


def rows_in_order(config: cfg.TrainConfig) -> list[dict[str, Any]]:
    """The examples unisd's run of `config` consumes, in its order, as TRL SDFT rows."""
    run = prepare(config, echo=lambda m: None)
    examples = [run.examples[i] for i in run.order()]
    return [{"prompt": [{"role": "user", "content": e.prompt}], "privileged_context": demonstration(e)}
            for e in examples]


def trl_sdft(args: argparse.Namespace, rows: list[dict[str, Any]], folder: Path, steps: int,
             top_k: int) -> list[dict[str, Any]]:
    """Train with TRL's SDFTTrainer; the model is saved in `folder`; returns its log history."""
    from datasets import Dataset
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    model, tokenizer = models.load_model(demo.MODEL), models.load_tokenizer(demo.MODEL)
    settings = SDFTConfig(
        output_dir=str(folder), max_steps=steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, num_generations=1, max_completion_length=args.max_new_tokens,
        temperature=args.temperature, top_p=1.0, top_k=top_k, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=int(0.1 * steps), weight_decay=0.0, max_grad_norm=1.0, shuffle_dataset=False,
        distillation_mode="full_logits", distillation_alpha=0.0, teacher_model_kind="base",
        teacher_prompt_template=TEACHER_TEMPLATE.replace("{demonstration}", "{privileged_context}"),
        num_loss_tokens_to_skip=0, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        logging_steps=1, seed=42, dataloader_num_workers=0)
    trainer = SDFTTrainer(model=model, args=settings, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(folder))
    tokenizer.save_pretrained(str(folder))
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def our_log(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def first_step(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Step-1 loss of both on greedy (top-k 1) completions from the same initial weights."""
    config = ours(args, work / "first-unisd", 1, top_k=1)
    train(config, overwrite=True, echo=lambda m: None)
    mine = our_log(work / "first-unisd")[0]
    theirs = trl_sdft(args, rows_in_order(config), work / "first-trl", 1, top_k=1)[0]
    return {"unisd_sd": {"loss": mine["loss"], "completion_length": mine["completion_length"],
                         "truncated": mine["truncated"]},
            "trl_sdft": {"loss": theirs["loss"], "completion_length": theirs.get("completions/mean_length"),
                         "truncated": theirs.get("completions/clipped_ratio")},
            "loss_difference": theirs["loss"] - mine["loss"]}


def side_by_side(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    config = ours(args, work / "unisd-sd", args.steps, top_k=0)
    train(config, overwrite=True, echo=lambda m: print(m, flush=True))
    trl_log = trl_sdft(args, rows_in_order(config), work / "trl-sdft", args.steps, top_k=0)
    trained = {"unisd-sd": str(work / "unisd-sd"), "trl-sdft": str(work / "trl-sdft")}
    base = json.loads(Path(args.base_eval).read_text()) if args.base_eval else None
    scored = evaluate.evaluate(trained if base else {"base": demo.MODEL, **trained}, [demo.TASK], work / "eval",
                               args.eval_limit, batch_size=16)
    combined = evaluate.merge([base, scored]) if base else scored
    mine = our_log(work / "unisd-sd")
    task = demo.TASK
    runs = {}
    for name, loss, truncated in (("unisd-sd", [r["loss"] for r in mine], [r["truncated"] for r in mine]),
                                  ("trl-sdft", [r["loss"] for r in trl_log],
                                   [r.get("completions/clipped_ratio") for r in trl_log])):
        runs[name] = {"score": combined["scores"][name][task], "ci95": combined["ci95"][name][task],
                      "n": len(combined["items"][name][task]),
                      "vs_base": combined["paired"].get(name, {}).get("base", {}).get(task),
                      "identical_share": combined["answers"][name][task]["top_share"],
                      "loss_per_step": loss, "truncated_per_step": truncated}
    runs["base"] = {"score": combined["scores"]["base"][task], "ci95": combined["ci95"]["base"][task],
                    "n": len(combined["items"]["base"][task]),
                    "identical_share": combined["answers"]["base"][task]["top_share"]}
    theirs, mine_items = combined["items"]["trl-sdft"][task], combined["items"]["unisd-sd"][task]
    shared = [doc for doc in theirs if doc in mine_items]
    versus = stats.paired([theirs[d] for d in shared], [mine_items[d] for d in shared]).as_json(scale=100.0)
    return {"runs": runs, "trl_vs_unisd": versus}


def table(result: dict[str, Any]) -> str:
    first = result["first_step"]
    lines = [f"# Peer check: TRL {result['versions'].get('trl', '?')} SDFTTrainer vs unisd `sd`", "",
             f"Command: `{result['command']}` (commit {result['git_sha'][:12]}, {result['machine'].get('cpu', '')}); "
             f"{result['settings']}.", "",
             "First step on identical (greedy) completions:", "",
             "| | loss | mean completion length | truncated share |", "|---|---|---|---|"]
    for name in ("unisd_sd", "trl_sdft"):
        row = first[name]
        lines.append(f"| {name} | {row['loss']:.5f} | {row['completion_length']} | {row['truncated']} |")
    lines += ["", f"TRL - unisd: {first['loss_difference']:+.2e}", ""]
    if result["after_training"] is None:
        return "\n".join(lines + ["Not trained further (--steps 0)."]) + "\n"
    lines += [f"After {result['steps']} steps at temperature {result['temperature']}:", "",
              "| run | score | vs base | identical | truncated per step |", "|---|---|---|---|---|"]
    for name, row in result["after_training"]["runs"].items():
        low, high = row["ci95"]
        v = row.get("vs_base")
        paired = f"{v['difference']:+.1f} [{v['ci95'][0]:+.1f}, {v['ci95'][1]:+.1f}], p={v['p_value']:.2g}" if v else ""
        truncated = " ".join("-" if t is None or math.isnan(t) else f"{t:.2f}" for t in row.get("truncated_per_step", []))
        lines.append(f"| {name} | {row['score']:.1f} [{low:.1f}, {high:.1f}] (n={row['n']}) | {paired} | "
                     f"{row['identical_share']:.0f}% | {truncated} |")
    v = result["after_training"]["trl_vs_unisd"]
    lines += ["", f"TRL - unisd after training, paired on {v['n']} items: {v['difference']:+.1f} points "
                  f"[{v['ci95'][0]:+.1f}, {v['ci95'][1]:+.1f}], p={v['p_value']:.2g}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    args = arguments(argv)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    result = {"description": ("TRL 1.16's SDFTTrainer against unisd's sd preset on the same demo rows and settings: first-step "
                             "loss on identical (greedy) completions, and scores after training where run."),
              "task": demo.TASK, "model": demo.MODEL, "steps": args.steps, "temperature": args.temperature,
              "settings": (f"{args.steps} steps of {args.batch_size} prompts, lr {args.lr:g}, 1 sample per prompt, "
                           f"max {args.max_new_tokens} new tokens, temperature {args.temperature:g} (sampling and "
                           "loss), forward KL over the full vocabulary, frozen teacher, unisd's teacher wording, "
                           "transformers sampling, fp32"),
              "first_step": first_step(args, work),
              "after_training": side_by_side(args, work) if args.steps else None}
    out = Path(args.out)
    written = provenance.write(out / "results.json", result, ["peer", *argv])
    (out / "table.md").write_text(table(json.loads(written.read_text())))
    print((out / "table.md").read_text())
    return 0
