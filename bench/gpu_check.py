"""Every supported combination on the GPUs of this machine: a pass/fail line and the step times of each.

    bench/gpu_check.sh [--model smollm2-135m] [--steps 4]      # makes its own environment, then runs this
    python -m bench gpu_check [--model M] [--steps 4] [--out bench/results/gpu-check.json]

The project's CPU machines have no GPU, so this is the check a GPU session runs first. On one GPU: full
weights and LoRA, each without and with --bf16, and with --rollout vllm where vLLM is installed. On two or
more GPUs, the same under torchrun with 2 processes: DDP, and --fsdp with --lora, --bf16, --rollout vllm and
an EMA teacher. Each combination trains UniSD*'s plugins for a few steps in a subprocess (a failure is
reported and the next one runs); the step and rollout times are the medians of its metrics.jsonl after the
first step.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import provenance

ONE_GPU = {"full": [], "full-bf16": ["--bf16"], "lora": ["--lora"], "lora-bf16": ["--lora", "--bf16"],
           "vllm": ["--rollout", "vllm"], "lora-bf16-vllm": ["--lora", "--bf16", "--rollout", "vllm"]}
TWO_GPUS = {"ddp": [], "fsdp": ["--fsdp"], "fsdp-lora": ["--fsdp", "--lora"], "fsdp-bf16": ["--fsdp", "--bf16"],
            "fsdp-vllm": ["--fsdp", "--rollout", "vllm"], "fsdp-ema": ["--fsdp", "--plugins", "ema,agree,clip"],
            "fsdp-lora-bf16-vllm": ["--fsdp", "--lora", "--bf16", "--rollout", "vllm"]}


def combinations(gpus: int, vllm: bool) -> dict[str, tuple[int, list[str]]]:
    """name -> (processes, flags) of every combination this machine can run."""
    found = {name: (1, flags) for name, flags in ONE_GPU.items()}
    if gpus >= 2:
        found |= {name: (2, flags) for name, flags in TWO_GPUS.items()}
    return {name: run for name, run in found.items() if vllm or "vllm" not in run[1]}


def check(name: str, processes: int, flags: list[str], model: str, steps: int, folder: Path) -> dict[str, Any]:
    """Train one combination; its outcome, median step and rollout times and the end of its log if it failed."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    plugins = [] if "--plugins" in flags else ["--preset", "unisd-star"]
    args = [sys.executable, *launcher, "-m", "unisd", "train", "--model", model, "--data", "demo", "--out", str(folder),
            "--max-steps", str(steps), "--batch-size", "4", "--max-new-tokens", "128", "--save-every", str(steps),
            *plugins, *flags]
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    found: dict[str, Any] = {"name": name, "processes": processes, "flags": flags, "passed": done.returncode == 0}
    metrics = folder / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()][1:] if metrics.exists() else []
    if rows:
        found |= {"step_time_s": statistics.median(r["step_time_s"] for r in rows),
                  "rollout_s": statistics.median(r["rollout_s"] for r in rows),
                  "losses_finite": all(r["loss"] == r["loss"] for r in rows)}
    found["passed"] = found["passed"] and found.get("losses_finite", False) and (folder / "unisd.json").exists()
    if not found["passed"]:
        found["log_tail"] = done.stderr[-2000:]
    return found


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="the largest model this machine has offline")
    parser.add_argument("--steps", type=int, default=4, help="steps per combination (the first is not timed)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu-check.json"))
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA device: gpu_check runs on a machine with a GPU", file=sys.stderr)
        return 2
    gpus = torch.cuda.device_count()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (processes, flags) in combinations(gpus, importlib.util.find_spec("vllm") is not None).items():
            found = check(name, processes, flags, args.model, args.steps, Path(tmp) / name)
            runs.append(found)
            times = f"step {found['step_time_s']:.2f} s, rollout {found['rollout_s']:.2f} s" if "step_time_s" in found else ""
            print(f"{'PASS' if found['passed'] else 'FAIL'} {name:22s} {times}", flush=True)
    result = {"description": f"Every supported combination on {gpus} x {torch.cuda.get_device_name()}: UniSD* "
                             f"on {args.model}, batch 4, 128 new tokens, median step and rollout times.",
              "gpus": gpus, "model": args.model, "runs": runs}
    print(f"written {provenance.write(args.out, result, ['gpu_check', *argv])}")
    return 0 if all(r["passed"] for r in runs) else 1
