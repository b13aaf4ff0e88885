"""Where one plain-SD step spends its time on this machine: rollout / forwards / backward / optimizer.

    python bench/step_anatomy.py --model smollm2-135m --batch-size 4 --max-new-tokens 64 --steps 4

Trains a few steps with `unisd.train` and prints the median of each phase over steps 2..N (step 1
pays for warm-up and AdamW state allocation).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from unisd import config as cfg
from unisd.train import train

PROMPTS = [("What is {a} plus {b}? Answer with the number.", "{c}", "{a} + {b} = {c}")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--plugins", default="")
    ap.add_argument("--preset", default="")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        rows = [{"prompt": PROMPTS[0][0].format(a=a, b=a + 3), "answer": str(2 * a + 3),
                 "rationale": f"{a} + {a + 3} = {2 * a + 3}"} for a in range(1, 33)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        names = tuple(n for n in args.plugins.split(",") if n)
        config = cfg.resolve(args.preset, names, {}, model=args.model, data=str(data), out=str(Path(tmp) / "run"),
                             max_steps=args.steps, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
        out = train(config, echo=lambda m: None)
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    keys = ["rollout_s", "forward_s", "backward_s", "optimizer_s", "after_step_s", "step_time_s", "completion_tokens"]
    print(f"model {args.model}, batch {args.batch_size}, max new tokens {args.max_new_tokens}, "
          f"plugins {args.plugins or args.preset or 'none'}; medians over steps 2..{args.steps}")
    for k in keys:
        print(f"  {k:18s} {statistics.median(m[k] for m in metrics):8.3f}")


if __name__ == "__main__":
    main()
