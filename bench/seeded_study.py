"""Issue 42's study at the demo's scale: SD, SD with the verifier's reward, SFT, the control and UniSD*, three seeds each.

    python -m bench seeded_study --work runs/study --out bench/results/seeded-study

Runs `unisd ablate` with the settings below (15 trainings and 16 evaluations, about an hour on a 2-core CPU; a
killed study resumes where it stopped) and keeps its results.json and table.md with their provenance. The
docs' results page renders the table (`docs/generate.py`, region `seeded-study`).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from bench import provenance

ABLATE = ["ablate", "--model", "smollm2-135m", "--data", "demo", "--plugins", "reward",
          "--baselines", "sft,other-demo,unisd-star", "--seeds", "3", "--eval-tasks", "unisd_demo",
          "--eval-limit", "200", "--max-steps", "12", "--lr", "2e-5", "--max-new-tokens", "96",
          "--rollout", "vllm", "--rollout-eager", "--eval-backend", "vllm"]
DESCRIPTION = ("Issue 42's study at the demo's scale: plain SD, SD with the verifier's reward, SFT, the "
               "other-demonstration control and UniSD* on the demo task, 3 seeds each on one data order (12 steps "
               "of 4, lr 2e-5), scored greedily on 200 held-out sums; means over seeds with intervals that count "
               "seeds and items.")


def arguments(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench seeded_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="runs/study", help="unisd ablate's --out (kept: a rerun resumes there)")
    p.add_argument("--out", default="bench/results/seeded-study")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = arguments(argv)
    from unisd.cli import main as unisd

    unisd([*ABLATE, "--out", args.work], standalone_mode=False)
    work, out = Path(args.work), Path(args.out)
    result = json.loads((work / "results.json").read_text())
    provenance.write(out / "results.json", {"description": DESCRIPTION, **result}, ["seeded_study", *argv])
    shutil.copy(work / "table.md", out / "table.md")
    print(f"wrote {out / 'results.json'}")
    return 0
