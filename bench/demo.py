"""The Quickstart's demo, timed and kept: `unisd demo` run as it ships, its scores and its time in one JSON.

    python -m bench demo --work runs/demo --out bench/results/demo
    python -m bench demo --quickstart --out bench/results/demo     # a fresh clone, `python3 dev.py demo`, bare PATH

With --quickstart the command is the README's first one, run as a newcomer runs it: a clone of this commit
in a temporary folder, no tox environment yet, a PATH of /usr/bin:/bin and an empty HOME (no pip, Hugging Face
or unisd cache: the GGUF conversion and contrast's negatives are computed afresh); the time then includes
building the environment, and `environment_s` is that part (the whole, less the demo's own "done in" line).
Packages still come from wherever this machine's pip configuration points.

The demo is the first thing a user runs, so what it prints is a claim: this keeps the run that backs it
(per-item scores are in the combined evaluation it stores), the seconds it took on this CPU (issue 30's
ten-minute target), and UniSD*'s per-step log, where a collapse would show as the truncated share rising.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import provenance
from unisd import demo


def arguments(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="runs/demo", help="the demo's output folder (replaced)")
    p.add_argument("--out", default="bench/results/demo")
    p.add_argument("--quickstart", action="store_true",
                   help="clone this commit into a temporary folder and time `python3 dev.py demo` there, environment included")
    return p.parse_args(argv)


def quickstart(echo: Any) -> tuple[dict[str, Path], float]:
    """(the demo's paths, the whole command's seconds): the README's first command in a fresh clone of HEAD with a
    bare PATH and an empty HOME, so the time includes building its tox environment and filling every cache; every
    line it prints goes to `echo`."""
    clone = Path(tempfile.mkdtemp(prefix="unisd-quickstart-")) / "unisd"
    subprocess.run(["git", "clone", "-q", str(provenance.ROOT), str(clone)], check=True)
    home = clone.parent / "home"
    home.mkdir()
    kept = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "UNISD_CACHE", "HF_HOME")}
    env = kept | {"PATH": "/usr/bin:/bin", "HOME": str(home)}
    started = time.time()
    run = subprocess.Popen(["python3", "dev.py", "demo"], cwd=clone, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    assert run.stdout is not None
    for line in run.stdout:
        echo(line.rstrip("\n"))
    if run.wait() != 0:
        raise SystemExit(f"error: `python3 dev.py demo` failed in {clone} (status {run.returncode})")
    out = clone / "runs" / "demo"
    paths = {"sft": out / "sft", "unisd-star": out / "unisd-star", "metrics": out / "unisd-star" / "metrics.jsonl",
             "table": out / "table.md", "results": out / "eval" / "results.json"}
    return paths, time.time() - started


def said(lines: list[str], pattern: str) -> str:
    """The first group of the last printed line that matches `pattern` ("" when none does)."""
    found = [m.group(1) for line in lines if (m := re.match(pattern, line))]
    return found[-1] if found else ""


def training_log(metrics: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def main(argv: list[str]) -> int:
    args = arguments(argv)
    work, out = Path(args.work), Path(args.out)
    lines: list[str] = []

    def echo(message: str) -> None:
        print(message, flush=True)
        lines.extend(message.splitlines())

    if args.quickstart:
        paths, seconds = quickstart(echo)
    else:
        started = time.time()
        paths = demo.run(work, overwrite=True, echo=echo)
        seconds = time.time() - started
    demo_seconds = float(said(lines, r"done in (\d+) s") or "nan")
    combined = json.loads(paths["results"].read_text())
    logs = {run: training_log(paths[run] / "metrics.jsonl") for run in demo.RUNS}
    result = {
        "description": "unisd demo as the Quickstart runs it: scores of base, SFT and UniSD* with 95% intervals and "
                       "paired tests, the sentence it ends with, its wall time and each run's training log.",
        "model": demo.MODEL, "task": demo.TASK, "steps": demo.STEPS, "lr": demo.LR,
        "backend": said(lines, r"sampling backend: (.*)"), "precision": said(lines, r"precision: (.*)"),
        "seconds": seconds, "demo_s": demo_seconds, "environment_s": seconds - demo_seconds,
        "quickstart": "python3 dev.py demo in a fresh clone, bare PATH" if args.quickstart else "unisd demo in-process",
        "torch_index": os.environ.get("UNISD_TORCH_INDEX", "https://download.pytorch.org/whl/cpu"),
        "training_s": {run: sum(row["step_time_s"] for row in log) for run, log in logs.items()},
        "truncated_per_step": {run: [row["truncated"] for row in log if "truncated" in row] for run, log in logs.items()},
        "verdict": demo.verdict(combined), "scale_finding": demo.SCALE_FINDING, "meaning": demo.meaning(combined),
        "scores": combined["scores"], "ci95": combined["ci95"], "paired": combined.get("paired", {}),
        "answers": combined.get("answers", {}), "retention": combined.get("retention", {}),
    }
    provenance.write(out / "results.json", result, ["demo", *argv])
    shutil.copy(paths["table"], out / "table.md")
    shutil.copy(paths["metrics"], out / "unisd-star-metrics.jsonl")
    print(f"wrote {out / 'results.json'} ({seconds:.0f} s)")
    return 0
