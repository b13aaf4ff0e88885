"""The demo task under each source's own recipe (issue 29): SFT, plain SD and UniSD* side by side.

    python -m bench recipes --steps 24 --work runs/recipes --out bench/results/recipes
    python -m bench recipes --runs sft-2e-5,sdft-2e-5 ...    only these recipes (the others' results are kept)

Every run trains SmolLM2-135M on the demo's training split in the same data order, then is scored on the
held-out sums with `unisd.evaluate` (95% intervals, paired tests against the untrained base, PPL_ret on the
first --retention-documents items). Alongside the scores it records what shows a collapse: the share of
samples that hit the length limit at every step (metrics.jsonl) and the share of identical outputs.
Trained runs and their evaluations already in --work are reused, so the study can be grown a run at a time.
"""
from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from bench import provenance
from unisd import config as cfg
from unisd import demo, evaluate, hardware, models
from unisd.train import train

UNISD_STAR = cfg.PRESETS["unisd-star"]
STAR_WITHOUT_EMA = tuple(p for p in UNISD_STAR.plugins if p != "ema")


@dataclass(frozen=True)
class Recipe:
    """One row of the study: a preset (or plugins) with the source's settings, and why those settings."""

    preset: str
    lr: float
    why: str
    plugins: tuple[str, ...] = ()
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)


SDFT = dict(cfg.PRESETS["sdft"].settings)
SDFT_TEACHER = {name: dict(values) for name, values in cfg.PRESETS["sdft"].options.items()}  # EMA 0.99, every step
OPSD = dict(cfg.PRESETS["opsd"].settings)
STAR_OPTIONS = {name: dict(values) for name, values in UNISD_STAR.options.items()}

RECIPES: dict[str, Recipe] = {
    "sft-2e-5": Recipe("sft", 2e-5, "SFT at SDFT's higher learning rate"),
    "sft-5e-6": Recipe("sft", 5e-6, "SFT at SDFT's lower learning rate (OPSD's too)"),
    "sdft-2e-5": Recipe("sdft", 2e-5, "plain SD at SDFT's recipe (the sdft preset): EMA teacher every step at "
                                      "rate 0.01, forward KL, 3 skipped tokens, T 1"),
    "sdft-5e-6": Recipe("sdft", 5e-6, "the same at lr 5e-6"),
    "sd-2e-5": Recipe("sd", 2e-5, "plain SD (the sd preset): frozen teacher, forward KL at T 0.7, no skipped tokens"),
    "opsd-5e-6": Recipe("opsd", 5e-6, "plain SD at OPSD's recipe (the opsd preset): fixed teacher, forward KL, "
                                      "grad-norm cap 0.1, T 1.1 / top-p 0.95 / top-k 20; lr of its issue-17 script"),
    "unisd-star-lora-2e-5": Recipe("unisd-star", 2e-5, "UniSD* at the paper's values, LoRA (r 64, alpha 128)",
                                   settings={"lora": True}),
    "unisd-star-sdft-2e-5": Recipe("unisd-star", 2e-5, "UniSD*'s mechanisms at SDFT's recipe (its EMA schedule, "
                                                       "divergence, sampling and skipped tokens)",
                                   options=SDFT_TEACHER, settings=SDFT),
    "unisd-star-sdft-5e-6": Recipe("unisd-star", 5e-6, "the same at lr 5e-6",
                                   options=SDFT_TEACHER, settings=SDFT),
    "unisd-star-opsd-5e-6": Recipe("", 5e-6, "UniSD*'s mechanisms but the EMA at OPSD's recipe (fixed teacher, "
                                             "its divergence, sampling and grad-norm cap)",
                                   plugins=STAR_WITHOUT_EMA,
                                   options={k: v for k, v in STAR_OPTIONS.items() if k != "ema"}, settings=OPSD),
}
NOT_REPRODUCED = ("OPSD's point-wise clip (each vocabulary entry's summand at 0.05) has no unisd equivalent and is "
                  "left out, as in the opsd preset; UniSD* rows keep their own clip plugin (per-token sum at 10).")
MAX_NEW_TOKENS = 96  # the demo's rollout limit: its worked sums need about 40


def arguments(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench recipes", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=",".join(RECIPES), help="comma-separated recipes to train and score")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps of every run (0: one epoch)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-limit", type=int, default=200, help="held-out sums scored per model")
    p.add_argument("--retention-documents", type=int, default=demo.RETENTION, help="items PPL_ret is measured on")
    p.add_argument("--backend", choices=("hf", "vllm"), default=demo.backend(), help="rollouts and evaluation")
    p.add_argument("--work", default="runs/recipes", help="trained runs and their evaluations")
    p.add_argument("--out", default="bench/results/recipes", help="results.json and table.md")
    args = p.parse_args(argv)
    unknown = [r for r in args.runs.split(",") if r not in RECIPES]
    if unknown:
        p.error(f"unknown recipe {', '.join(unknown)} (recipes: {', '.join(RECIPES)})")
    return args


def configure(name: str, args: argparse.Namespace) -> cfg.TrainConfig:
    recipe = RECIPES[name]
    options = {name: dict(values) for name, values in recipe.options.items()}
    if "contrast" in (UNISD_STAR.plugins if recipe.preset == "unisd-star" else recipe.plugins):
        options.setdefault("contrast", {})["max_new_tokens"] = str(MAX_NEW_TOKENS)  # as the demo: negatives finish
    return cfg.resolve(recipe.preset, recipe.plugins, options, model=demo.MODEL, data="demo",
                       out=str(Path(args.work) / name), max_steps=args.steps, batch_size=args.batch_size,
                       max_new_tokens=MAX_NEW_TOKENS, lr=recipe.lr, bf16=hardware.fast_bf16_cpu(),
                       rollout=args.backend, save_every=0, rollout_eager=args.backend == "vllm", **recipe.settings)


def trained(folder: Path, config: cfg.TrainConfig | None = None) -> bool:
    """Whether `folder` holds a finished run (of exactly `config`, when given)."""
    record = folder / "unisd.json"
    if not (record.is_file() and (folder / "metrics.jsonl").is_file()):
        return False
    return config is None or json.loads(record.read_text())["config"] == json.loads(json.dumps(config.to_json()))


def score(name: str, path: str, args: argparse.Namespace) -> dict[str, Any]:
    """The saved evaluation of one model (scored now if absent), retention against the base included."""
    folder = Path(args.work) / "eval" / name
    if not (folder / "results.json").is_file():
        evaluate.evaluate({name: path}, [demo.TASK], folder, args.eval_limit, base=demo.MODEL, batch_size=16,
                          backend=args.backend, retention_documents=args.retention_documents)
    return json.loads((folder / "results.json").read_text())


def steps_of(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summary(name: str, combined: dict[str, Any], log: list[dict[str, Any]]) -> dict[str, Any]:
    """One row: score, interval, paired test against the base, identical outputs, PPL_ret and the training log."""
    task = demo.TASK
    versus = combined["paired"].get(name, {}).get("base", {}).get(task)
    ret = combined["retention"].get(name, {}).get(task, {})
    return {"score": combined["scores"][name][task], "ci95": combined["ci95"][name][task],
            "n": len(combined["items"][name][task]), "vs_base": versus,
            "identical_share": combined["answers"][name][task]["top_share"],
            "collapsed": combined["answers"][name][task]["collapsed"],
            "ppl_ret": ret.get("ppl_ret"), "ppl_ret_ci95": ret.get("ppl_ret_ci95"),
            "truncated_per_step": [row["truncated"] for row in log],
            "completion_length_per_step": [row.get("completion_length") for row in log],
            "loss_per_step": [row["loss"] for row in log],
            "train_s": sum(row["step_time_s"] for row in log) if log else None}


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    out = Path(args.out)
    score("base", demo.MODEL, args)
    for name in args.runs.split(","):  # each run scored as soon as it is trained: a cut-short study still reports
        config = configure(name, args)
        folder = Path(config.out)
        if not trained(folder, config):
            print(f"training {name}: {RECIPES[name].why}", flush=True)
            shutil.rmtree(Path(args.work) / "eval" / name, ignore_errors=True)
            train(config, overwrite=True, echo=lambda m: print(m, flush=True))
        score(name, str(folder), args)
    names = [n for n in RECIPES if trained(Path(args.work) / n)]
    results = [score(n, demo.MODEL if n == "base" else str(Path(args.work) / n), args) for n in ["base", *names]]
    combined = evaluate.merge(results)
    rows = {"base": summary("base", combined, [])}
    rows |= {n: summary(n, combined, steps_of(Path(args.work) / n)) for n in names}
    saved = {n: json.loads((Path(args.work) / n / "unisd.json").read_text())["config"] for n in names}
    orders = {json.loads((Path(args.work) / n / "unisd.json").read_text())["data"]["order_sha256"] for n in names}
    result = {"description": ("The demo task trained at each source's own recipe (SDFT, OPSD, the paper's UniSD*) and SFT: "
                             "scores with 95% intervals, paired tests against the base, truncated share per step, identical "
                             "outputs, PPL_ret."),
              "task": demo.TASK, "model": demo.MODEL, "model_path": str(models.resolve(demo.MODEL)),
              "precision": "bf16 mixed" if hardware.fast_bf16_cpu() else "fp32 (no native bf16 on this CPU)",
              "backend": args.backend, "eval_limit": args.eval_limit,
              "retention_documents": args.retention_documents, "same_data_order": len(orders) <= 1,
              "recipes": {n: {"why": RECIPES[n].why, "config": saved[n]} for n in names},
              "not_reproduced": NOT_REPRODUCED, "not_run": [n for n in RECIPES if n not in names], "runs": rows}
    provenance.write(out / "results.json", result, ["recipes", *argv])
    (out / "table.md").write_text(table(json.loads((out / "results.json").read_text())))
    return result


def _recipe_cell(config: dict[str, Any]) -> str:
    teacher = ("EMA " + "/".join(str(config["options"]["ema"][k]) for k in ("beta", "every"))
               if "ema" in config["plugins"] else "fixed")
    parts = [f"lr {config['lr']:g}", "LoRA" if config["lora"] else "full", f"teacher {teacher}",
             config["divergence"], f"T {config['temperature']:g}"]
    if config["top_k"] or config["top_p"] < 1:
        parts.append(f"top-p {config['top_p']:g} top-k {config['top_k']}")
    if config["skip_first_tokens"]:
        parts.append(f"skip {config['skip_first_tokens']}")
    if config["max_grad_norm"] != 1.0:
        parts.append(f"grad cap {config['max_grad_norm']:g}")
    return ", ".join(parts)


def _truncated_cell(shares: list[float], batch: int) -> str:
    """Samples that hit the limit at each step, one digit per step (out of the step's batch)."""
    counts = [round(s * batch) for s in shares]
    return "".join(map(str, counts)) if max(counts, default=0) <= 9 else " ".join(map(str, counts))


def table(result: dict[str, Any]) -> str:
    """The markdown table of a results.json `run` wrote (so the table is always the JSON's)."""
    lines = [f"# {result['model']} on the demo task, each source's recipe ({result['precision']}, "
             f"{result['backend']} sampling)", "",
             f"Command: `{result['command']}` (commit {result['git_sha'][:12]}, "
             f"{result['machine'].get('cpu', 'CPU')}). Scores on {result['eval_limit']} held-out sums with 95% "
             f"intervals; paired difference against the base with its 95% interval and p; identical: share of "
             f"the most frequent output; PPL_ret: the base model's perplexity of the run's outputs (first "
             f"{result['retention_documents']} items); truncated: samples of each training step that hit the "
             f"{MAX_NEW_TOKENS}-token limit, one digit per step. Same data order for every run: "
             f"{'yes' if result['same_data_order'] else 'NO'}.", "",
             "| run | recipe | steps | score | vs base | identical | PPL_ret | truncated per step | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in result["runs"].items():
        config = result["recipes"].get(name, {}).get("config")
        low, high = row["ci95"]
        versus = row["vs_base"]
        paired = (f"{versus['difference']:+.1f} [{versus['ci95'][0]:+.1f}, {versus['ci95'][1]:+.1f}], "
                  f"p={versus['p_value']:.2g}") if versus else ""
        ppl = (f"{row['ppl_ret']:.2f} [{row['ppl_ret_ci95'][0]:.2f}, {row['ppl_ret_ci95'][1]:.2f}]"
               if row["ppl_ret"] is not None else "")
        steps = len(row["truncated_per_step"])
        batch = config["batch_size"] * config["grad_accum"] if config else 1
        truncated = _truncated_cell(row["truncated_per_step"], batch) if steps else ""
        seconds = f"{row['train_s']:.0f}" if row["train_s"] is not None else ""
        lines.append(f"| {name} | {_recipe_cell(config) if config else 'untrained'} | {steps or ''} | "
                     f"{row['score']:.1f} [{low:.1f}, {high:.1f}] (n={row['n']}) | {paired} | "
                     f"{row['identical_share']:.0f}% | {ppl} | {truncated} | {seconds} |")
    lines += ["", f"Not reproduced: {result['not_reproduced']}", ""]
    if result.get("not_run"):
        lines += [f"Not run: {', '.join(result['not_run'])}.", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    run(arguments(argv), argv)
    return 0
