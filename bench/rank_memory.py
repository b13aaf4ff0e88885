"""Peak host memory of each rank of a one-step `unisd train`: alone, under DDP (2 ranks) and under --fsdp (2 ranks).

    python -m bench rank_memory [--out bench/results/rank-memory.json]

On a CPU every rank holds its own copy of the model, the teacher and the optimizer state unless FSDP shards
them; this shows how much each layout costs per process. Each rank runs `unisd.cli.main` inside
`bench._rank`, which prints its peak RSS when the run ends.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import provenance

TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
LAYOUTS = {"1 rank": ([], []), "2 ranks, DDP": (TORCHRUN, []), "2 ranks, --fsdp": (TORCHRUN, ["--fsdp"])}


def peak_rss_per_rank(launcher: list[str], train_args: list[str]) -> list[float]:
    """GiB, rank 0 first."""
    done = subprocess.run([sys.executable, *launcher, "-m", "bench._rank", *train_args], cwd=provenance.ROOT,
                          capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise SystemExit(f"error: unisd train {' '.join(train_args)} failed:\n{done.stderr[-2000:]}")
    rows = [json.loads(line[len("RSS "):]) for line in done.stderr.splitlines() if line.startswith("RSS ")]
    return [round(r["peak_rss_gib"], 2) for r in sorted(rows, key=lambda r: r["rank"])]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench rank_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=Path("bench/results/rank-memory.json"))
    args = parser.parse_args(argv)
    run = ["train", "--model", args.model, "--data", "demo", "--overwrite", "--max-steps", "1", "--batch-size", "1",
           "--max-new-tokens", "16"]
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (launcher, extra) in LAYOUTS.items():
            out = Path(tmp) / name.replace(" ", "").replace(",", "-")
            found[name] = peak_rss_per_rank(launcher, [*run, "--out", str(out), *extra])
            print(f"{name}: {found[name]} GiB", flush=True)
    result = {"description": "Peak host memory (RSS, GiB) of each rank of a one-step unisd train run (batch 1, "
                             "16 new tokens) alone, under DDP and under --fsdp, 2 ranks on one CPU machine.",
              "model": args.model, "train_args": run, "peak_rss_gib_per_rank": found}
    print(f"written {provenance.write(args.out, result, ['rank_memory', *argv])}")
    return 0
