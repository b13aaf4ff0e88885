"""Score several checkpoints with lm-eval under identical settings, plus the paper's retention metrics.

    unisd eval --model base=smollm2-135m --model sd=runs/sd --tasks unisd_cose --limit 100 --out eval/

Every checkpoint gets the same tasks, chat template, greedy decoding, seeds and limit. PPL_ret is the
base model's perplexity on each checkpoint's own greedy completions; PPL_fit is the checkpoint's
perplexity on the gold demonstrations (both pooled over tokens, per benchmark, as in Tables 2 and 5).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from unisd import models
from unisd.data import Example
from unisd.data.prompts import demonstration

PRIMARY = ("full_acc", "pass@1", "acc", "exact_match")  # the headline metric of a task, first found wins
SEED = 1234


class EvalError(ValueError):
    """Bad evaluation input (model spec, task name); one line for the CLI."""


def tasks_path() -> Path:
    import unisd_tasks

    return Path(unisd_tasks.__file__).parent


def parse_models(specs: Iterable[str]) -> dict[str, str]:
    """["base=smollm2-135m", "runs/sd"] -> {"base": "smollm2-135m", "sd": "runs/sd"}."""
    named: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name or spec, spec
        if not name or not path:
            raise EvalError(f"--model {spec!r}: expected NAME=PATH")
        if name in named:
            raise EvalError(f"--model name '{name}' is used twice")
        named[name] = path
    return named


def primary_metric(task_result: dict[str, Any]) -> tuple[str, float] | None:
    """(metric, value) of a task's headline metric from an lm-eval results entry."""
    for metric in PRIMARY:
        for key, value in task_result.items():
            if key.split(",")[0] == metric and "_stderr" not in key and isinstance(value, (int, float)):
                return metric, float(value)
    return None


def scores(results: dict[str, Any]) -> dict[str, float]:
    """Task -> headline score in percent, leaf tasks only (groups are recomputed as Overall)."""
    groups = set(results.get("group_subtasks", {}))
    out: dict[str, float] = {}
    for task, entry in results["results"].items():
        found = primary_metric(entry)
        if task not in groups and found is not None:
            out[task] = 100.0 * found[1]
    return out


def run_lm_eval(path: str, tasks: list[str], limit: int | None, include: list[str], batch_size: int,
                max_gen_toks: int | None = None) -> dict[str, Any]:
    """One in-process lm-eval run with the settings every checkpoint shares."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    cuda = torch.cuda.is_available()
    model_args = f"pretrained={models.resolve(path)},dtype={'bfloat16' if cuda else 'float32'}"
    manager = TaskManager(include_path=[str(tasks_path()), *include], include_defaults=False)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise EvalError(f"unknown task(s) {', '.join(missing)} (unisd tasks: "
                        f"{', '.join(sorted(n for n in manager.all_tasks if n.startswith('unisd')))})")
    return simple_evaluate(model="hf", model_args=model_args, tasks=tasks, task_manager=manager, limit=limit,
                           apply_chat_template=True, confirm_run_unsafe_code=True, log_samples=True,
                           device="cuda" if cuda else "cpu", batch_size=batch_size, random_seed=SEED,
                           gen_kwargs=f"max_gen_toks={max_gen_toks}" if max_gen_toks else None,
                           numpy_random_seed=SEED, torch_random_seed=SEED, fewshot_random_seed=SEED)


@dataclass(frozen=True)
class Scored:
    """A (context, continuation) pair to score: context is the chat-rendered prompt text."""

    context: str
    continuation: str


def _context_of(sample: dict[str, Any]) -> str:
    """The exact prompt string lm-eval sent for a generate_until sample."""
    args = sample["arguments"]
    if isinstance(args, dict):
        return args["gen_args_0"]["arg_0"]
    return args[0][0]


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokenizer: Any, pairs: list[Scored], batch_size: int = 4) -> float:
    """exp(-sum log p(continuation tokens | context) / number of continuation tokens), pooled over pairs."""
    total_logp, total_tokens = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(pairs), batch_size):
        for pair in pairs[i:i + batch_size]:
            ctx = tokenizer(pair.context, add_special_tokens=False)["input_ids"]
            cont = tokenizer(pair.continuation, add_special_tokens=False)["input_ids"]
            if not cont:
                continue
            ids = torch.tensor([ctx + cont], device=device)
            logits = model(input_ids=ids).logits[0, len(ctx) - 1:-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, ids[0, len(ctx):, None])[:, 0]
            total_logp += float(logp.sum())
            total_tokens += len(cont)
    return math.exp(-total_logp / total_tokens) if total_tokens else float("nan")


def retention(samples: dict[str, list[dict[str, Any]]], checkpoint: str, base: str) -> dict[str, dict[str, float]]:
    """Per task: PPL_ret (base model on the checkpoint's completions), PPL_fit (checkpoint on gold demos)."""
    tokenizer = models.load_tokenizer(checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    own = models.load_model(checkpoint).to(device).eval()
    ref = own if base == checkpoint else models.load_model(base).to(device).eval()
    out: dict[str, dict[str, float]] = {}
    for task, rows in samples.items():
        if not rows or not isinstance(rows[0]["resps"][0][0], str):
            continue  # log-likelihood tasks have no completion to score
        completions = [Scored(_context_of(r), r["resps"][0][0]) for r in rows]
        gold = [Scored(_context_of(r), demonstration(Example(r["doc"]["prompt"], r["doc"]["answer"],
                                                             r["doc"].get("rationale", ""))))
                for r in rows if "prompt" in r["doc"] and "answer" in r["doc"]]
        out[task] = {"ppl_ret": perplexity(ref, tokenizer, completions),
                     "ppl_fit": perplexity(own, tokenizer, gold) if gold else float("nan")}
    return out


def evaluate(checkpoints: dict[str, str], tasks: list[str], out: Path, limit: int | None = None,
             include: list[str] | None = None, base: str | None = None, batch_size: int = 4,
             echo: Callable[[str], None] = print, max_gen_toks: int | None = None) -> dict[str, Any]:
    """Score every checkpoint, write out/<name>/results.json, out/results.json, out/table.md, out/scores.png."""
    from unisd import report

    out.mkdir(parents=True, exist_ok=True)
    combined: dict[str, Any] = {"tasks": tasks, "limit": limit, "seed": SEED, "max_gen_toks": max_gen_toks,
                                "scores": {}, "retention": {}}
    for name, path in checkpoints.items():
        echo(f"evaluating {name} ({path}) on {', '.join(tasks)}")
        result = run_lm_eval(path, tasks, limit, include or [], batch_size, max_gen_toks)
        samples = result.pop("samples", {})
        folder = out / name
        folder.mkdir(exist_ok=True)
        (folder / "results.json").write_text(json.dumps(result, indent=2, default=str))
        with (folder / "samples.jsonl").open("w") as f:
            for task, rows in samples.items():
                for r in rows:
                    f.write(json.dumps({"task": task, **r}, default=str) + "\n")
        combined["scores"][name] = scores(result)
        if base is not None:
            combined["retention"][name] = retention(samples, path, base)
        (out / "results.json").write_text(json.dumps(combined, indent=2))
    report.write_comparison(combined, out)
    return combined
