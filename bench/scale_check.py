"""Two numbers of the scale path, measured with `unisd train` itself and written with their provenance.

    python bench/scale_check.py --out bench/results/scale-check.json

- host memory: the peak RSS of each rank of a one-step run, alone, under DDP (2 ranks) and under --fsdp (2 ranks);
- the cost of a step without a teacher: SFT (cross-entropy on gold completions, no teacher model or forward)
  against plain SD, each the median step of a short run, the two interleaved twice.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = ["train", "--model", "smollm2-135m", "--data", "demo", "--overwrite"]


def _rank_memory() -> None:
    """Inside one rank: run the command, then print this process's peak RSS as one JSON line on stderr."""
    from unisd.cli import main

    try:
        main(sys.argv[2:])
    except SystemExit as e:
        if e.code:
            raise
    print("RSS " + json.dumps({"rank": int(os.environ.get("RANK", "0")),
                               "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}),
          file=sys.stderr)


def host_memory(folder: Path) -> dict[str, list[float]]:
    args = RUN + ["--max-steps", "1", "--batch-size", "1", "--max-new-tokens", "16"]
    layouts = {"1 rank": ([], []), "2 ranks, DDP": (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], []),
               "2 ranks, --fsdp": (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], ["--fsdp"])}
    found = {}
    for name, (launcher, extra) in layouts.items():
        out = folder / name.replace(" ", "").replace(",", "-")
        done = subprocess.run([sys.executable, *launcher, __file__, "--rank-memory", *args, "--out", str(out), *extra],
                              capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
        if done.returncode:
            raise SystemExit(done.stderr[-2000:])
        rows = [json.loads(line[4:]) for line in done.stderr.splitlines() if line.startswith("RSS ")]
        found[name] = [round(r["peak_rss_gib"], 2) for r in sorted(rows, key=lambda r: r["rank"])]
    return found


def step_costs(folder: Path, steps: int) -> dict[str, object]:
    medians: dict[str, list[float]] = {"sd": [], "sft": []}
    phases: dict[str, dict[str, float]] = {}
    for preset in ("sd", "sft", "sd", "sft"):
        out = folder / preset
        subprocess.run([sys.executable, "-m", "unisd", *RUN, "--preset", preset, "--out", str(out), "--max-steps",
                        str(steps), "--batch-size", "4", "--max-new-tokens", "64"], check=True, capture_output=True,
                       env={**os.environ, "TQDM_DISABLE": "1"})
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]  # step 1 warms up
        medians[preset].append(statistics.median(r["step_time_s"] for r in rows))
        phases[preset] = {k: round(statistics.median(r[k] for r in rows), 2) for k in ("rollout_s", "forward_s", "backward_s")}
    ratios = [sft / sd for sft, sd in zip(medians["sft"], medians["sd"])]
    return {"step_s": {k: [round(v, 2) for v in vs] for k, vs in medians.items()}, "phases_s": phases,
            "sft_over_sd": [round(r, 2) for r in ratios]}


def provenance() -> dict[str, object]:
    import torch
    import transformers

    from unisd import hardware

    sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "git_sha": sha,
            "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                         "transformers": transformers.__version__}, "machine": hardware.machine()}


def main() -> None:
    if sys.argv[1:2] == ["--rank-memory"]:
        return _rank_memory()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=4, help="steps per run (the first is not timed)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = {**provenance(), "host_memory_gib_per_rank": host_memory(Path(tmp)),
                  "no_teacher_step": step_costs(Path(tmp), args.steps)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
