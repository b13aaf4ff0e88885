"""The small-scale study of issue 14: base -> sft, sd, gkd, sdft, unisd-star, trained alike, scored with intervals.

On the same data and order, scored in domain and out of domain with 95% intervals, paired tests and retention.

Also measures, per training task, whether the demonstration-conditioned teacher prefers the gold
demonstration over the student's own (wrong) greedy reply, and how much each UniSD* mechanism acted
(from the runs' metrics.jsonl). The trained models land in --runs; the results in --out: per task and arm
a results.json (per-item scores) / table.md / scores.png from `unisd.evaluate`, study.json (probe, activity,
data orders, training time) and study.md (every table).

    UNISD_DATA_DIR=../shared/data python -m bench study --tasks demo,cos_e,mbpp --eval-limit 200
    python -m bench study --tasks demo --methods sft,sd,unisd-star --eval-limit 200   # what fits a CPU

Runs already finished in --runs, and evaluations of exactly the same checkpoints, are reused, so a study
can be grown one task or method at a time. The tables (each arm's table.md and study.md) are then rebuilt
from the per-item scores by `bench.study_tables`, which `python -m bench study_tables` repeats on its own.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import provenance, study_tables
from unisd import config as cfg
from unisd import evaluate, models, stats
from unisd.data import Example, load_data
from unisd.data import scoring as S
from unisd.data.prompts import demonstration, teacher_prompt
from unisd.rollout import eos_ids
from unisd.sequences import Prompt, left_pad, render
from unisd.train import train

IN_DOMAIN = {"demo": "unisd_demo", "cos_e": "unisd_cose", "mbpp": "unisd_mbpp"}
OUT_OF_DOMAIN = ("unisd_humaneval", "unisd_toolalpaca")
ACTIVITY = ("agree/removed", "clip/rate", "contrast/active", "contrast/no_negative", "contrast/share",
            "match/share", "ema/distance")


def arguments(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench study", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default="demo", help="training tasks, comma-separated: demo, cos_e, mbpp")
    p.add_argument("--methods", default="sft,sd,gkd,sdft,unisd-star", help="presets to train from the base")
    p.add_argument("--ood", default=",".join(OUT_OF_DOMAIN), help="out-of-domain lm-eval tasks ('' for none)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-new-tokens", type=int, default=96, help="rollout length of the trained runs")
    p.add_argument("--eval-limit", type=int, default=200, help="items per in-domain task (200: about ±7 points)")
    p.add_argument("--ood-limit", type=int, default=100, help="items per out-of-domain task")
    p.add_argument("--max-gen-toks", type=int, default=None, help="cap on evaluation tokens (default: each task's)")
    p.add_argument("--probe-items", type=int, default=40, help="training items in the teacher-preference probe")
    p.add_argument("--probe-only", action="store_true", help="only the teacher-preference probe: no training")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf",
                   help="sampling engine of the rollouts and the evaluations (vllm: uncompiled, as the demo)")
    p.add_argument("--out", type=Path, default=Path("bench/results/study"), help="results folder")
    p.add_argument("--runs", type=Path, default=Path("runs/study"), help="folder of the trained models")
    return p.parse_args(argv)


def mean_logprob(model: Any, tokenizer: Any, prompt: Prompt, completion: str) -> float:
    """Mean per-token log-probability of `completion` (then end of turn) after the chat-rendered `prompt`."""
    context = render(tokenizer, prompt)
    target = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([context + target])
    with torch.no_grad():
        logits = model(ids).logits[0, len(context) - 1:-1].float().log_softmax(-1)
    return float(logits.gather(-1, torch.tensor(target)[:, None]).mean())


def greedy(model: Any, tokenizer: Any, prompts: list[Prompt], max_new_tokens: int, chunk: int = 20) -> list[str]:
    """Greedy replies, as the evaluation decodes them."""
    texts: list[str] = []
    for i in range(0, len(prompts), chunk):
        ids, attn = left_pad([render(tokenizer, p) for p in prompts[i:i + chunk]], tokenizer.pad_token_id)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=sorted(eos_ids(model, tokenizer)), pad_token_id=tokenizer.pad_token_id)
        texts += tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return texts


def teacher_preference(model_name: str, examples: list[Example], max_new_tokens: int) -> dict[str, Any]:
    """On items the student gets wrong (greedy): how often the teacher prompt, and the student prompt, give
    the gold demonstration a higher mean token log-probability than the student's own reply."""
    tokenizer, model = models.load_tokenizer(model_name), models.load_model(model_name).eval()

    def solves(prompts: list[Prompt]) -> tuple[list[str], list[bool]]:
        texts = greedy(model, tokenizer, prompts, max_new_tokens)
        return texts, [next(iter(S.score(t, e.meta).values())) == 1.0 for e, t in zip(examples, texts)]

    texts, right = solves([e.prompt for e in examples])
    wrong = [(e, t) for (e, t), ok in zip(zip(examples, texts), right) if not ok]
    teacher = [mean_logprob(model, tokenizer, teacher_prompt(e), demonstration(e))
               > mean_logprob(model, tokenizer, teacher_prompt(e), t) for e, t in wrong]
    student = [mean_logprob(model, tokenizer, e.prompt, demonstration(e))
               > mean_logprob(model, tokenizer, e.prompt, t) for e, t in wrong]
    n = len(wrong)
    share = {name: {"share": 100.0 * sum(v) / n if n else float("nan"),
                    "ci95": [100.0 * x for x in stats.proportion_ci(sum(v), n)] if n else [float("nan")] * 2}
             for name, v in (("teacher", teacher), ("student", student))}
    _, solved = solves([teacher_prompt(e) for e in examples])
    base_greedy, teacher_greedy = ({"share": 100.0 * sum(v) / len(v),
                                    "ci95": [100.0 * x for x in stats.proportion_ci(sum(v), len(v))]}
                                   for v in (right, solved))
    return {"items": len(examples), "student_wrong": n, "base_greedy": base_greedy, "teacher_greedy": teacher_greedy,
            **share}


def activity(metrics: Path) -> dict[str, float]:
    """Mean over steps of each mechanism's 'how much did it act' metric that the run logged."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return {k: float(np.mean([r[k] for r in rows if k in r])) for k in ACTIVITY if any(k in r for r in rows)}


def trained(folder: Path) -> bool:
    return (folder / "unisd.json").is_file() and (folder / "model.safetensors").is_file()


def scored(a: argparse.Namespace, checkpoints: dict[str, str], tasks: list[str], out: Path, work: Path, limit: int,
           retention: bool) -> dict[str, Any]:
    """`unisd.evaluate` of these checkpoints, or out/results.json when an earlier call scored exactly them.

    lm-eval's raw outputs and samples stay in `work`; `out` gets only the combined results (per-item scores).
    """
    done = out / "results.json"
    if done.is_file():
        found = json.loads(done.read_text())
        if (set(found["scores"]) == set(checkpoints) and found["tasks"] == tasks and found["limit"] == limit
                and found["max_gen_toks"] == a.max_gen_toks):
            return found
    found = evaluate.evaluate(checkpoints, tasks, work, limit, base=a.model if retention else None, batch_size=16,
                              max_gen_toks=a.max_gen_toks, backend=a.backend)
    out.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(found, indent=2))
    return found


def study_task(a: argparse.Namespace, task: str, methods: list[str], ood: list[str]) -> dict[str, Any]:
    probe = teacher_preference(a.model, load_data(task)[:a.probe_items], a.max_new_tokens)
    if a.probe_only:
        return {"teacher": probe}
    runs = a.runs / task
    checkpoints = {"base": a.model}
    timings: dict[str, float] = {}
    for method in methods:
        folder = runs / method
        if not trained(folder):
            overrides = {"contrast": {"max_new_tokens": str(a.max_new_tokens)}} if method == "unisd-star" else {}
            config = cfg.resolve(method, (), overrides, model=a.model, data=task, out=str(folder), max_steps=a.steps,
                                 batch_size=a.batch_size, lr=a.lr, max_new_tokens=a.max_new_tokens, bf16=True,
                                 seed=a.seed, rollout=a.backend, rollout_eager=True)
            started = time.time()
            train(config, overwrite=True, echo=lambda m: print(m, file=sys.stderr))
            timings[method] = time.time() - started
        checkpoints[method] = str(folder)
    found = scored(a, checkpoints, [IN_DOMAIN[task]], a.out / task / "in-domain", runs / "eval" / "in-domain",
                   a.eval_limit, retention=True)
    if ood:  # retention is an in-domain measure: out of domain only the scores
        scored(a, checkpoints, ood, a.out / task / "out-of-domain", runs / "eval" / "out-of-domain", a.ood_limit,
               retention=False)
    orders = {m: json.loads((runs / m / "unisd.json").read_text()).get("data", {}).get("order_sha256") for m in methods}
    return {"train_s": timings, "orders": orders, "in_domain": found,
            "activity": {m: activity(runs / m / "metrics.jsonl") for m in methods},
            "teacher": probe}


def main(argv: list[str]) -> int:
    a = arguments(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    ood = [t.strip() for t in a.ood.split(",") if t.strip()]
    tasks = {task: study_task(a, task, methods, ood) for task in a.tasks.split(",") if task.strip()}
    command = provenance.record(["study", *argv])["command"]
    earlier = json.loads((a.out / "study.json").read_text()).get("tasks", {}) if (a.out / "study.json").is_file() else {}
    kept = {**earlier, **{t: {"command": command, **{k: v for k, v in f.items() if k != "in_domain"}}
                          for t, f in tasks.items()}}
    description = ("Teacher-preference probe of the base model" if a.probe_only else
                   f"The study base -> {a.methods}: training time, data orders, mechanism activity and the "
                   "teacher-preference probe") + f" ({a.model}); each task's entry names the command that made it."
    provenance.write(a.out / "study.json", {"description": description, "tasks": kept}, ["study", *argv])
    for task in tasks:
        for arm in study_tables.ARMS:
            if (a.out / task / arm / "results.json").is_file() and not a.probe_only:
                study_tables.rebuild(a.out / task / arm / "results.json", ["study", *argv])
    (a.out / "study.md").write_text(study_tables.summary(a.out))
    print((a.out / "study.md").read_text())
    return 0
