"""One optimizer step of plain SD, UniSD* (K 3) and SFT, with TRL's SDFT step as the anchor: time, phases, peak memory.

    python -m bench step [--quick] [--precision fp32 bf16] [--batch 4 8] [--completion 64 256] [--rounds 2]

On smollm2-135m with ~128-token prompts. Every sampled completion is exactly --completion tokens (a bench
plugin answers the trainer's `completions` hook with EOS suppressed until then; TRL gets min_new_tokens);
SFT trains on the gold demonstration, so its completion is that demonstration. Within a cell (precision,
batch, completion) the cases run round-robin (A, B, C, A, B, C ...), each built afresh, one warm-up step
then one measured step, and medians over the rounds are reported: the machine is shared and noisy, so
only ratios from one run mean anything. Phases are the trainer's own per-step metrics (rollout_s,
forward_s, backward_s, optimizer_s, after_step_s, step_time_s); TRL's step is timed by a callback, whole.
Peak memory is the highest RSS (sampled every 5 ms) during the measured step, above the RSS before the
case was built: models, optimizer state and activations all count.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from bench import provenance

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PAGE = os.sysconf("SC_PAGE_SIZE")
PHASES = ("rollout_s", "forward_s", "backward_s", "optimizer_s", "after_step_s", "step_time_s")
CASES = ("sd", "unisd-star", "sft", "trl-sdft")
WORDS = ("the river carries small stones past the mill while farmers count sheep near the old bridge and "
         "children watch clouds over green hills ").split()


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS(contextlib.AbstractContextManager):
    """The highest RSS while inside, sampled in a thread."""

    def __enter__(self) -> "PeakRSS":
        self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.005)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def make_rows(n: int, prompt_tokens: int, tokenizer: Any) -> list[dict[str, str]]:
    """n plain-JSONL sums whose rendered student prompt is about prompt_tokens tokens long."""
    from unisd.sequences import render

    rows = []
    for i in range(n):
        a, b = 3 + i, 11 + 2 * i
        question = f"What is {a} plus {b}? Answer with the number."
        words = 8
        while True:
            story = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(words))
            text = f"Context {i}: {story}.\n{question}"
            missing = prompt_tokens - len(render(tokenizer, text))
            if missing <= 0:
                break
            words += max(1, missing // 2)
        rows.append({"prompt": text, "answer": str(a + b), "rationale": f"{a} + {b} = {a + b}."})
    return rows


def data_file(folder: Path, batch: int, prompt_tokens: int, tokenizer: Any) -> tuple[list[dict[str, str]], Path]:
    """The rows of a cell (a few more than one batch, so agree finds other examples) and the JSONL file holding them."""
    rows = make_rows(max(12, batch + 4), prompt_tokens, tokenizer)
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows, data


def fixed_length_plugin(tokens: int) -> Any:
    """A plugin whose `completions` hook samples like the trainer, with EOS suppressed until `tokens`."""
    from unisd.api import Plugin
    from unisd.sequences import render

    class FixedLength(Plugin):
        name = "fixed-length"

        def completions(self, batch: Any, run: Any) -> Any:
            c = run.config
            prompts = [render(run.tokenizer, p) for p in batch.prompts["student"]]
            return run.policy.sample(prompts, c.max_new_tokens, c.temperature, c.top_p, top_k=c.top_k,
                                     min_new_tokens=tokens)

    return FixedLength()


def prepared(preset: str, data: Path, out: Path, model: str, batch: int, completion: int, bf16: bool,
             **settings: Any) -> Any:
    """A prepared unisd run (`unisd.train.prepare`) of `preset` whose sampled completions are exactly `completion`
    tokens; `settings` are further TrainConfig fields (rollout="vllm")."""
    from unisd import config as cfg
    from unisd.hooks import Hooks
    from unisd.train import prepare

    config = cfg.resolve(preset, (), {}, model=model, data=str(data), out=str(out), max_steps=1000,
                         batch_size=batch, max_new_tokens=completion, max_prompt_tokens=4096, bf16=bf16, **settings)
    run = prepare(config, echo=lambda m: None)
    if preset != "sft":  # sft's completions are the gold demonstrations
        run.hooks = Hooks([fixed_length_plugin(completion), *run.hooks.plugins])
    return run


def ours(preset: str, data: Path, out: Path, model: str, batch: int, completion: int, bf16: bool) -> Callable[[], dict]:
    """A prepared unisd run of `preset`; the returned call does one step and gives its metrics."""
    from unisd.train import step

    run = prepared(preset, data, out, model, batch, completion, bf16)
    return lambda: step(run)


def trl_sdft(rows: list[dict[str, str]], out: Path, model_name: str, batch: int, completion: int,
             bf16: bool) -> Callable[[], dict]:
    """TRL's SDFTTrainer on the same model, prompts, demonstrations and shapes (frozen initial teacher,
    full-vocabulary divergence); the returned call runs a warm-up and a measured step and gives the latter's time."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from unisd import models
    from unisd.data import Example
    from unisd.data.prompts import demonstration

    model = models.load_model(model_name)
    tokenizer = models.load_tokenizer(model_name)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                             "privileged_context": demonstration(Example(r["prompt"], r["answer"], r["rationale"]))}
                            for r in rows])
    args = SDFTConfig(output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                      num_generations=1, max_completion_length=completion, max_steps=2, temperature=1.0, top_p=1.0,
                      top_k=0, distillation_mode="full_logits", distillation_alpha=0.5, teacher_model_kind="base",
                      learning_rate=2e-5, use_cpu=True, bf16=bf16, report_to="none", save_strategy="no",
                      logging_steps=10_000, disable_dropout=True, dataloader_num_workers=0, seed=42,
                      max_grad_norm=1.0, generation_kwargs={"min_new_tokens": completion})
    times: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            times.append(time.perf_counter() - self.t0)

    trainer = SDFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer, callbacks=[StepTimes()])

    def two_steps() -> dict:
        trainer.train()
        return {"step_time_s": times[-1]}

    return two_steps


def measure(build: Callable[[], Callable[[], dict]], warm_up: bool) -> dict[str, Any]:
    """Build a case, run a warm-up step (ours) and one measured step: its metrics and peak memory."""
    gc.collect()
    baseline = rss()
    step = build()
    if warm_up:
        step()  # allocates AdamW state; first touch of memory
    with PeakRSS() as peak:
        metrics = step()
    del step
    gc.collect()
    return {**{k: float(metrics[k]) for k in PHASES if k in metrics},
            "completion_tokens": float(metrics.get("completion_tokens", 0.0)),
            "peak_mb": (peak.peak - baseline) / 2**20}


def cell(precision: str, batch: int, completion: int, cases: list[str], rounds: int, model: str,
         tmp: Path, tokenizer: Any) -> dict[str, Any]:
    rows, data = data_file(tmp, batch, 128, tokenizer)
    bf16 = precision == "bf16"
    builders = {c: (lambda c=c: trl_sdft(rows, tmp / c, model, batch, completion, bf16)) if c == "trl-sdft" else
                (lambda c=c: ours(c, data, tmp / c, model, batch, completion, bf16)) for c in cases}
    runs: dict[str, list[dict]] = {c: [] for c in cases}
    for r in range(rounds):
        for c in cases:
            m = measure(builders[c], warm_up=c != "trl-sdft")
            runs[c].append(m)
            print(f"  [{precision} B{batch} T{completion} round {r}] {c:11s} step {m['step_time_s']:6.2f} s  "
                  f"peak {m['peak_mb']:6.0f} MB", flush=True)
    medians = {c: {k: statistics.median(m[k] for m in ms) for k in ms[0]} for c, ms in runs.items()}
    return {"precision": precision, "batch": batch, "completion": completion, "medians": medians,
            "ratios": ratios(medians), "runs": runs}


def ratios(medians: dict[str, dict[str, float]]) -> dict[str, float]:
    """The issue's targets: UniSD*/SD and SFT/SD step time, TRL/SD (speedup), UniSD*/SD peak memory."""
    found: dict[str, float] = {}
    sd = medians.get("sd")
    if sd is None:
        return found
    for case, name in (("unisd-star", "unisd-star/sd"), ("sft", "sft/sd"), ("trl-sdft", "trl-sdft/sd")):
        if case in medians:
            found[f"{name} step"] = medians[case]["step_time_s"] / sd["step_time_s"]
    if "unisd-star" in medians:
        found["unisd-star/sd peak"] = medians["unisd-star"]["peak_mb"] / sd["peak_mb"]
    return found


def table(cells: list[dict]) -> str:
    """Markdown: one row per cell and case, step time, phases and peak memory (medians)."""
    lines = ["| precision | batch | completion | case | step s | rollout | forward | backward | optimizer | "
             "after_step | peak MB |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        for case, m in c["medians"].items():
            phase = lambda k: f"{m[k]:.2f}" if k in m else ""  # noqa: E731
            lines.append(f"| {c['precision']} | {c['batch']} | {c['completion']} | {case} | {m['step_time_s']:.2f} | "
                         + " | ".join(phase(k) for k in PHASES[:-1]) + f" | {m['peak_mb']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench step", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quick", action="store_true", help="fp32, batch 4, completion 64: a few minutes")
    ap.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--completion", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    ap.add_argument("--rounds", type=int, default=2, help="round-robin passes over the cases (medians)")
    ap.add_argument("--out", default="bench/results/step.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.precision, args.batch, args.completion = ["fp32"], [4], [64]
    if args.rounds < 1 or min(args.batch) < 1 or min(args.completion) < 1:
        ap.error("--rounds, --batch and --completion must be at least 1")
    cases = list(args.cases)
    try:
        import trl  # noqa: F401
    except ImportError:
        cases = [c for c in cases if c != "trl-sdft"]
        print("note: trl is not installed: no TRL anchor (pip install trl)")
    from unisd import models

    torch.manual_seed(0)
    tokenizer = models.load_tokenizer(args.model)
    cells: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precision:
            for batch in args.batch:
                for completion in args.completion:
                    cells.append(cell(precision, batch, completion, cases, args.rounds, args.model, Path(tmp), tokenizer))
                    print(json.dumps(cells[-1]["ratios"]), flush=True)
                    # written after every cell: a grid cut short by the session still keeps what it measured
                    result = {"description": ("One optimizer step of plain SD, UniSD* (K 3), SFT and TRL's SDFT "
                                              "trainer on the same work, round-robin in one process: median step "
                                              "time, its phases and peak memory per cell."),
                              "model": args.model, "prompt_tokens": 128, "rounds": args.rounds,
                              "threads": torch.get_num_threads(), "cells": cells, "table": table(cells)}
                    path = provenance.write(args.out, result, ["step", *argv])
    print(result["table"])
    print(f"wrote {path}")
    return 0
