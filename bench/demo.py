"""The Quickstart's demo, timed and kept: `unisd demo` run as it ships, its scores and its time in one JSON.

    python -m bench demo --work runs/demo --out bench/results/demo

The demo is the first thing a user runs, so what it prints is a claim: this keeps the run that backs it
(per-item scores are in the combined evaluation it stores), the seconds it took on this CPU (issue 30's
ten-minute target), and UniSD*'s per-step log, where a collapse would show as the truncated share rising.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from bench import provenance
from unisd import demo, hardware


def arguments(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="runs/demo", help="the demo's output folder (replaced)")
    p.add_argument("--out", default="bench/results/demo")
    return p.parse_args(argv)


def training_log(metrics: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def main(argv: list[str]) -> int:
    args = arguments(argv)
    work, out = Path(args.work), Path(args.out)
    started = time.time()
    paths = demo.run(work, overwrite=True, echo=lambda m: print(m, flush=True))
    seconds = time.time() - started
    combined = json.loads(paths["results"].read_text())
    logs = {run: training_log(paths[run] / "metrics.jsonl") for run in demo.RUNS}
    result = {
        "description": "unisd demo as the Quickstart runs it: scores of base, SFT and UniSD* with 95% intervals and "
                       "paired tests, the sentence it ends with, its wall time and each run's training log.",
        "model": demo.MODEL, "task": demo.TASK, "steps": demo.STEPS, "lr": demo.LR, "backend": demo.backend(),
        "precision": "bf16 mixed" if hardware.fast_bf16_cpu() else "fp32 (no native bf16 on this CPU)",
        "seconds": seconds,
        "training_s": {run: sum(row["step_time_s"] for row in log) for run, log in logs.items()},
        "truncated_per_step": {run: [row["truncated"] for row in log if "truncated" in row] for run, log in logs.items()},
        "verdict": demo.verdict(combined), "scale_finding": demo.SCALE_FINDING,
        "scores": combined["scores"], "ci95": combined["ci95"], "paired": combined.get("paired", {}),
        "answers": combined.get("answers", {}), "retention": combined.get("retention", {}),
    }
    provenance.write(out / "results.json", result, ["demo", *argv])
    shutil.copy(paths["table"], out / "table.md")
    shutil.copy(paths["metrics"], out / "unisd-star-metrics.jsonl")
    print(f"wrote {out / 'results.json'} ({seconds:.0f} s)")
    return 0
