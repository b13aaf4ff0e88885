"""Score several checkpoints with lm-eval under identical settings, plus the paper's retention metrics.

    unisd eval --model base=smollm2-135m --model sd=runs/sd --tasks unisd_cose --limit 100 --out eval/

Every checkpoint gets the same tasks, chat template, greedy decoding, seeds and limit. PPL_ret is the
base model's perplexity on each checkpoint's own greedy completions; PPL_fit is the checkpoint's
perplexity on the gold demonstrations (both pooled over tokens, per benchmark, as in Tables 2 and 5).
Each item's score (from lm-eval's logged samples) is kept, so every score gets a 95% interval, every
run a paired test against the base (and UniSD* against the best baseline), and every multiple-choice
task a check that the answers have not collapsed to one option (unisd.stats holds the math).
"""
from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from unisd import engine, models, quiet, stats
from unisd.callable_module import make_callable
from unisd.data import Example
from unisd.data.prompts import demonstration
from unisd.data.scoring import extract_letter, is_multiple_choice
from unisd.shared_engine import SharedEngine

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


def run_lm_eval(path: Any, tasks: list[str], limit: int | None, include: list[str], batch_size: int,
                max_gen_toks: int | None = None, backend: str = "hf",
                template_kwargs: dict[str, Any] | None = None, shared: SharedEngine | None = None) -> dict[str, Any]:
    """One in-process lm-eval run with the settings every checkpoint shares.

    `backend` is lm-eval's model type: `hf` (transformers) or `vllm` (lm-eval's own vLLM model, which
    schedules the whole generation batch itself: --batch-size does not apply there). `template_kwargs` are the
    chat template's variables (lm-eval's `chat_template_args`, hf only), as training rendered its prompts.
    `path` may also be an lm-eval model object already holding the weights (`unisd.midrun`, `start_vllm`).
    `shared`: under vllm, the engine of the checkpoints scored before this one, reused where it can be
    (`unisd.shared_engine`) and left running; without it the engine started here is shut down after.
    """
    from lm_eval import simple_evaluate

    quiet.lm_eval()
    manager = task_manager(tasks, include)
    started = None  # an engine made here for this run alone, shut down after it
    if backend == "vllm" and isinstance(path, str):
        if shared is not None:
            path = shared.holding(path, local_folder(path))
        else:
            path = started = start_vllm(path, template_kwargs)
    device, batch = "cuda" if torch.cuda.is_available() else "cpu", "auto" if backend == "vllm" else batch_size
    # an lm-eval model already holding the weights (unisd.midrun, start_vllm) comes with its own settings
    model, args = (path, None) if not isinstance(path, str) else (backend, model_args(path, backend, template_kwargs))
    try:
        return simple_evaluate(model=model, model_args=args, tasks=tasks, task_manager=manager, limit=limit,
                               apply_chat_template=True, confirm_run_unsafe_code=True, log_samples=True,
                               device=device, batch_size=batch, random_seed=SEED,
                               gen_kwargs=f"max_gen_toks={max_gen_toks}" if max_gen_toks else None,
                               numpy_random_seed=SEED, torch_random_seed=SEED, fewshot_random_seed=SEED)
    finally:
        if started is not None:
            engine.shut_down(started.model)


def task_manager(tasks: list[str], include: list[str]) -> Any:
    """lm-eval's index of unisd's tasks and `include`'s; an EvalError names the tasks it does not hold."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(tasks_path()), *include], include_defaults=False)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise EvalError(f"unknown task(s) {', '.join(missing)} (unisd tasks: "
                        f"{', '.join(sorted(n for n in manager.all_tasks if n.startswith('unisd')))})")
    return manager


def local_folder(path: str) -> Path | None:
    """Where a model spec's files are on this machine (an alias's converted copy), or None (a Hub id)."""
    folder = Path(models.resolve(path))
    return folder if folder.is_dir() else None


def model_args(path: str, backend: str, template_kwargs: dict[str, Any] | None) -> str | dict[str, Any]:
    """lm-eval's model arguments for `path`: the settings every checkpoint is scored with."""
    cuda = torch.cuda.is_available()
    args = f"pretrained={models.resolve(path)},dtype={'bfloat16' if cuda else 'float32'}"
    if backend == "vllm":  # the engine's KV cache as in training (vLLM-CPU would otherwise claim 90% of memory);
        # on CPU without graph compilation: one evaluation never earns back the compilation's time
        args += f",seed={SEED},kv_cache_memory_bytes={2 * 2**30},enforce_eager={not cuda}"
    if template_kwargs:  # a dict cannot travel in the k=v string
        return {**dict(pair.split("=", 1) for pair in args.split(",")), "chat_template_args": dict(template_kwargs)}
    return args


def start_vllm(path: str, template_kwargs: dict[str, Any] | None = None) -> Any:
    """lm-eval's vLLM model of `path`; whoever starts it shuts its engine down (unisd.engine.shut_down)."""
    from lm_eval.api.registry import get_model

    engine.lm_eval_backend()
    args = model_args(path, "vllm", template_kwargs)
    made = get_model("vllm")
    create = made.create_from_arg_obj if isinstance(args, dict) else made.create_from_arg_string
    return create(args, {"batch_size": "auto", "max_batch_size": None,
                         "device": "cuda" if torch.cuda.is_available() else "cpu"})


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
def document_logprobs(model: torch.nn.Module, tokenizer: Any, pairs: list[Scored]) -> tuple[list[float], list[int]]:
    """Per pair: sum of log p(continuation tokens | context), and the number of those tokens."""
    logps, counts = [], []
    device = next(model.parameters()).device
    for pair in pairs:
        ctx = tokenizer(pair.context, add_special_tokens=False)["input_ids"]
        cont = tokenizer(pair.continuation, add_special_tokens=False)["input_ids"]
        if not cont:
            continue
        ids = torch.tensor([ctx + cont], device=device)
        # the head only where a continuation token is predicted: over the context it would be a third of the work
        logits = model(input_ids=ids, logits_to_keep=len(cont) + 1).logits[0, :-1].float()
        logps.append(float(torch.log_softmax(logits, -1).gather(-1, ids[0, len(ctx):, None]).sum()))
        counts.append(len(cont))
    return logps, counts


def _perplexity(model: torch.nn.Module, tokenizer: Any, pairs: list[Scored]) -> dict[str, Any]:
    """Pooled perplexity exp(-sum log p / tokens) over pairs, with its bootstrap interval over documents."""
    logps, counts = document_logprobs(model, tokenizer, pairs)
    return {"ppl": stats.pooled_perplexity(logps, counts), "ci95": list(stats.perplexity_ci(logps, counts))}


def retention(samples: dict[str, list[dict[str, Any]]], checkpoint: str, base: str,
              documents: int | None = None) -> dict[str, dict[str, Any]]:
    """Per task: PPL_ret (base model on the checkpoint's completions), PPL_fit (checkpoint on gold demos),
    over the first `documents` scored items of each task (all by default).

    Each comes with `<name>_ci95`, a bootstrap interval over the documents.
    """
    tokenizer = models.load_tokenizer(checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    own = models.load_model(checkpoint).to(device).eval()
    ref = own if base == checkpoint else models.load_model(base).to(device).eval()
    nan = {"ppl": float("nan"), "ci95": [float("nan"), float("nan")]}
    out: dict[str, dict[str, Any]] = {}
    for task, rows in samples.items():
        if not rows or not isinstance(rows[0]["resps"][0][0], str):
            continue  # log-likelihood tasks have no completion to score
        rows = rows[:documents]
        completions = [Scored(_context_of(r), r["resps"][0][0]) for r in rows]
        gold = [Scored(_context_of(r), demonstration(Example(r["doc"]["prompt"], r["doc"]["answer"],
                                                             r["doc"].get("rationale", ""))))
                for r in rows if "prompt" in r["doc"] and "answer" in r["doc"]]
        ret = _perplexity(ref, tokenizer, completions)
        fit = _perplexity(own, tokenizer, gold) if gold else nan
        out[task] = {"ppl_ret": ret["ppl"], "ppl_fit": fit["ppl"], "ppl_ret_ci95": ret["ci95"],
                     "ppl_fit_ci95": fit["ci95"]}
    return out


def generation_limits(result: dict[str, Any]) -> dict[str, int]:
    """Task -> the max_gen_toks it actually ran with (its YAML's, or the --max-gen-toks cap)."""
    return {task: int(c["generation_kwargs"]["max_gen_toks"]) for task, c in result.get("configs", {}).items()
            if "max_gen_toks" in (c.get("generation_kwargs") or {})}


def _one_per_doc(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first logged sample of each document (a task with several filters logs one per filter), by doc_id."""
    seen: dict[int, dict[str, Any]] = {}
    for r in rows:
        seen.setdefault(int(r["doc_id"]), r)
    return [seen[k] for k in sorted(seen)]


def item_scores(samples: dict[str, list[dict[str, Any]]], result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Task -> {doc_id: that item's headline metric}, from lm-eval's logged samples (log_samples)."""
    out: dict[str, dict[str, float]] = {}
    for task, rows in samples.items():
        found = primary_metric(result["results"].get(task, {}))
        if found is not None:
            out[task] = {str(r["doc_id"]): float(r[found[0]]) for r in _one_per_doc(rows) if found[0] in r}
    return out


def _answer_and_gold(row: dict[str, Any]) -> tuple[str | None, str | None]:
    """(what the model answered, the gold option or None): an option for multiple choice, else its text."""
    if not isinstance(row["resps"][0][0], str):  # lm-eval multiple_choice: the highest log-likelihood
        lls = [float(resp[0]) for resp in row["filtered_resps"]]
        return str(lls.index(max(lls))), str(row["target"])
    text = row["resps"][0][0]
    meta = row["doc"].get("meta")
    meta = json.loads(meta) if isinstance(meta, str) else {}
    if is_multiple_choice(meta):
        return extract_letter(text, int(meta["n_options"])), meta["gold"]
    return " ".join(text.split()), None


def answer_spread(samples: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per task: how concentrated the answers are, so a checkpoint that always says the same is seen.

    Multiple choice: `top_answer` and its `top_share` (percent of items), the `constant_baseline` (best
    score of always giving one option on these items) and its `constant_answer`; other tasks: the share of
    the most frequent identical output. `collapsed` per stats.collapsed (>= 90% of >= 10 items).
    """
    out: dict[str, dict[str, Any]] = {}
    for task, rows in samples.items():
        pairs = [_answer_and_gold(r) for r in _one_per_doc(rows)]
        if not pairs:
            continue
        answers, golds = [a for a, _ in pairs], [g for _, g in pairs]
        top, share = stats.most_frequent(answers)
        entry: dict[str, Any] = {"n": len(answers), "top_share": 100.0 * share,
                                 "collapsed": stats.collapsed(share, len(answers))}
        if all(g is not None for g in golds):
            constant, best = stats.constant_answer_baseline([str(g) for g in golds])
            entry |= {"top_answer": top, "constant_answer": constant, "constant_baseline": 100.0 * best}
        out[task] = entry
    return out


def run_info(path: str) -> dict[str, Any]:
    """What a trained run's unisd.json says about it: its preset and data order (absent for a base model)."""
    record = Path(path) / "unisd.json"
    if not record.is_file():
        return {}
    saved = json.loads(record.read_text())
    return {"preset": saved.get("config", {}).get("preset", ""),
            "order_sha256": saved.get("data", {}).get("order_sha256")}


def order_warning(runs: dict[str, dict[str, Any]]) -> str | None:
    """One `warning:` line when the compared runs were trained on different data orders (None if not)."""
    orders = {name: info["order_sha256"] for name, info in runs.items() if info.get("order_sha256")}
    if len(set(orders.values())) < 2:
        return None
    listed = ", ".join(f"{name} {digest[:8]}" for name, digest in orders.items())
    return (f"warning: these runs were trained on different data orders ({listed}); "
            "their differences mix method and data")


def _aligned(items: dict[str, float], other: dict[str, float]) -> tuple[list[float], list[float]]:
    shared = [d for d in items if d in other]
    return [items[d] for d in shared], [other[d] for d in shared]


def comparisons(combined: dict[str, Any]) -> list[tuple[str, str]]:
    """(run, reference) pairs to test: each run against the base, each UniSD* run against the best baseline.

    The base is the run named `base`, else the first run. A run is UniSD* when its unisd.json preset is
    `unisd-star`, a baseline when it is any other preset; the best baseline has the highest Overall.
    """
    from unisd.report import overall

    names = list(combined["scores"])
    if not names:
        return []
    base = "base" if "base" in names else names[0]
    pairs = [(n, base) for n in names if n != base]
    presets = {n: combined.get("runs", {}).get(n, {}).get("preset", "") for n in names}
    baselines = [n for n in names if presets[n] and presets[n] != "unisd-star"]
    if baselines:
        tasks = combined.get("tasks") or list(combined["scores"][names[0]])
        best = max(baselines, key=lambda n: overall(combined["scores"][n], _leaf(combined, tasks)))
        pairs += [(n, best) for n in names if presets[n] == "unisd-star" and best != base]
    return pairs


def _leaf(combined: dict[str, Any], tasks: list[str]) -> list[str]:
    found = list(dict.fromkeys(t for row in combined["scores"].values() for t in row))
    return [t for t in found if t in tasks] or found


def overall_intervals(items: dict[str, dict[str, dict[str, float]]]) -> dict[str, list[float]]:
    """Run -> 95% interval of its Overall (mean of task scores), items resampled within each task.

    A run scored on one task has that task's own interval (its Overall is that score).
    """
    arrays = {(run, task): np.array(list(v.values())) for run, per_task in items.items()
              for task, v in per_task.items() if v}
    runs = {r for r, _ in arrays}

    def overall(idx: dict[tuple[str, str], np.ndarray]) -> dict[str, float]:
        return {run: 100.0 * float(np.mean([a[idx[(r, t)]].mean() for (r, t), a in arrays.items() if r == run]))
                for run in runs}

    found = stats.bootstrap_intervals(overall, {k: len(a) for k, a in arrays.items()}) if arrays else {}
    single = {r: a for (r, _), a in arrays.items() if sum(run == r for run, _ in arrays) == 1}
    found |= {r: stats.mean_ci(a) for r, a in single.items()}
    return {run: [100.0 * x for x in ci] if run in single else list(ci) for run, ci in found.items()}


def add_uncertainty(combined: dict[str, Any]) -> dict[str, Any]:
    """Fill `ci95` (nesting of `scores`, [low, high] in points), `overall_ci95` (run -> [low, high]) and
    `paired` (run -> reference -> task -> difference, ci95, p_value, n, test)."""
    items = combined.get("items", {})
    combined["ci95"] = {run: {task: [100.0 * x for x in stats.mean_ci(list(values.values()))]
                              for task, values in per_task.items() if values}
                        for run, per_task in items.items()}
    combined["overall_ci95"] = overall_intervals(items)
    paired: dict[str, dict[str, dict[str, Any]]] = {}
    for run, reference in comparisons(combined):
        for task, values in items.get(run, {}).items():
            a, b = _aligned(values, items.get(reference, {}).get(task, {}))
            if a:
                test = stats.paired(a, b).as_json(scale=100.0)
                paired.setdefault(run, {}).setdefault(reference, {})[task] = test
    combined["paired"] = paired
    return combined


PER_RUN = ("scores", "retention", "answers", "items", "runs")


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine several results.json dicts, run by run and task by task (a later file wins a clash).

    Intervals and paired tests are recomputed from the merged items (add_uncertainty).
    """
    merged: dict[str, Any] = {"tasks": [], "gen_toks": {}, **{key: {} for key in PER_RUN}}
    caps = {r.get("max_gen_toks") for r in results}
    merged["max_gen_toks"] = caps.pop() if len(caps) == 1 else None
    for r in results:
        merged["tasks"] += [t for t in r.get("tasks", []) if t not in merged["tasks"]]
        merged["gen_toks"].update(r.get("gen_toks", {}))
        for key in PER_RUN:
            for run, per_task in r.get(key, {}).items():
                merged[key].setdefault(run, {}).update(per_task)
    return add_uncertainty(merged)


def group_seeds(combined: dict[str, Any], groups: dict[str, list[str]]) -> dict[str, Any]:
    """Runs that are seeds of one configuration as one row: its score the mean over its seeds, and every interval
    and paired test counting seeds and items (`unisd.seeds`); seed k of one group is paired with seed k of another.

    groups: row name -> the runs (names in `combined`) that are its seeds, in seed order.
    """
    from unisd.seeds import Seeded

    items = combined.get("items", {})
    members = [r for runs in groups.values() for r in runs]
    unknown = [r for r in members if r not in items]
    if unknown:
        raise EvalError(f"--seeds names {unknown[0]}, which no results file scored per item "
                        f"(runs: {', '.join(items) or 'none'})")
    repeated = sorted({r for r in members if members.count(r) > 1})
    clash = [g for g in groups if g in items and g not in members]
    if repeated or clash:
        raise EvalError(f"--seeds: {(repeated or clash)[0]} is {'in two groups' if repeated else 'already a run'}")
    rest = [r for r in combined["scores"] if r not in members]
    grouped = dict(combined)
    grouped["scores"] = {r: combined["scores"][r] for r in rest}
    for name, runs in groups.items():
        tasks = [t for t in combined["scores"][runs[0]] if all(t in combined["scores"][r] for r in runs)]
        grouped["scores"][name] = {t: sum(combined["scores"][r][t] for r in runs) / len(runs) for t in tasks}
    grouped["runs"] = {r: combined.get("runs", {}).get(r, {}) for r in rest} | {
        name: combined.get("runs", {}).get(runs[0], {}) for name, runs in groups.items()}
    seeded = {r: [items[r]] for r in rest if r in items} | {name: [items[r] for r in runs] for name, runs in groups.items()}
    grouped |= Seeded(seeded).intervals(comparisons(grouped))
    grouped["seed_groups"] = groups
    return grouped


def evaluate(checkpoints: dict[str, str], tasks: list[str], out: str | Path, limit: int | None = None,
             include: list[str] | None = None, base: str | None = None, batch_size: int = 4,
             echo: Callable[[str], None] = print, max_gen_toks: int | None = None,
             backend: str = "hf", retention_documents: int | None = None,
             template_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score every checkpoint, write out/<name>/results.json, out/results.json, out/table.md, out/scores.png.

    `checkpoints` maps a name to a model (a run's folder, a Hub id); `tasks` are lm-eval tasks or groups (unisd's
    own: `unisd tasks-path`). Returns the combined results: scores, 95% intervals (ci95), paired tests, answers.

    With `base`, retention is measured on each task's first `retention_documents` items (all by default):
    on a CPU its two full forwards per item can cost more than the generation itself.
    """
    from unisd import card, report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    combined: dict[str, Any] = {"tasks": tasks, "limit": limit, "seed": SEED, "max_gen_toks": max_gen_toks,
                                "chat_template_kwargs": template_kwargs or {},
                                "gen_toks": {}, "runs": {n: run_info(p) for n, p in checkpoints.items()},
                                "scores": {}, "ci95": {}, "paired": {}, "answers": {}, "retention": {},
                                "items": {}, "retention_documents": retention_documents}
    warning = order_warning(combined["runs"])
    if warning:
        echo(warning)
    shared = SharedEngine(functools.partial(start_vllm, template_kwargs=template_kwargs))
    completions: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with contextlib.closing(shared):
        for name, path in checkpoints.items():
            echo(f"evaluating {name} ({path}) on {', '.join(tasks)}")
            result = run_lm_eval(path, tasks, limit, include or [], batch_size, max_gen_toks, backend,
                                 template_kwargs, shared if backend == "vllm" else None)
            samples = result.pop("samples", {})
            folder = out / name
            folder.mkdir(exist_ok=True)
            (folder / "results.json").write_text(json.dumps(result, indent=2, default=str))
            with (folder / "samples.jsonl").open("w") as f:
                for task, rows in samples.items():
                    for r in rows:
                        f.write(json.dumps({"task": task, **r}, default=str) + "\n")
            combined["scores"][name] = scores(result)
            combined["items"][name] = item_scores(samples, result)
            combined["answers"][name] = answer_spread(samples)
            combined["gen_toks"] |= generation_limits(result)
            completions[name] = samples
            add_uncertainty(combined)
            (out / "results.json").write_text(json.dumps(combined, indent=2))
    if base is not None:  # once the engine is shut down: its memory is the two models' now
        for name, path in checkpoints.items():
            echo(f"retention of {name}: PPL_ret, PPL_fit")
            combined["retention"][name] = retention(completions[name], path, base, retention_documents)
        (out / "results.json").write_text(json.dumps(combined, indent=2))
    report.write_comparison(combined, out)
    for name, path in checkpoints.items():  # a run folder's model card shows its own scores
        if (Path(path) / "unisd.json").is_file():
            card.write_results(Path(path), combined, name)
    return combined


make_callable(__name__)  # the library's `from unisd import evaluate; evaluate(...)` is `evaluate` above
