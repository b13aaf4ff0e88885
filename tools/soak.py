"""Soak: a long run killed with SIGKILL at random moments and resumed, against an uninterrupted run.

    python -m tools.soak [--steps 1000] [--save-every 20] [--kill-within 250] [--seed 0] [--workdir DIR]

Trains a tiny random model (a 2-layer Llama built from a config, with SmolLM2's tokenizer, so that each
step takes milliseconds) on the bundled demo data with `unisd train --save-every N` and the ema and clip
plugins; a second copy of the same run is SIGKILLed after a random number of
steps (and a random fraction of a step, so kills land inside steps and inside checkpoint writes) and
restarted with --resume until it finishes. Meanwhile a watcher lists DIR/checkpoints every few
milliseconds and verifies every visible step-* folder against its manifest. At the end it prints the
counts and whether the final weights and per-step losses equal the uninterrupted run's, bit for bit.
Exit status 1 if they differ or a half-written checkpoint was ever visible.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from unisd import checkpoint, models


def tiny_model(folder: Path) -> Path:
    """A 2-layer Llama of width 32 with SmolLM2's tokenizer and chat template, random weights."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(models.resolve("smollm2-135m"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def command(model: Path, out: Path, steps: int, save_every: int) -> list[str]:
    return [sys.executable, "-m", "unisd", "train", "--model", str(model), "--data", "demo", "--out", str(out),
            "--max-steps", str(steps), "--batch-size", "2", "--max-new-tokens", "4", "--lr", "1e-3",
            "--save-every", str(save_every), "--plugins", "ema,clip", "-o", "ema.every=5", "-o", "clip.max=0.5"]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def lines(path: Path) -> int:
    try:
        return path.read_text().count("\n")
    except FileNotFoundError:
        return 0


class Watcher(threading.Thread):
    """Verifies every step-* folder it sees; one that is visible and incomplete is a violation."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root, self.checks = root, 0
        self.seen: set[str] = set()
        self.violations: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for folder in sorted(self.root.glob("step-*")) if self.root.is_dir() else []:
                problem = checkpoint.verify(folder)
                self.checks += 1
                if problem and folder.exists() and checkpoint.verify(folder):  # not merely renamed away meanwhile
                    self.violations.append(f"{folder.name}: {problem}")
                if not problem:
                    self.seen.add(folder.name)
            time.sleep(0.005)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--save-every", type=int, default=20)
    parser.add_argument("--kill-within", type=int, default=250, help="most steps a process runs before its kill")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="unisd-soak-"))
    model = tiny_model(work / "tiny")
    reference, killed = work / "reference", work / "killed"
    started = time.time()
    ref = subprocess.Popen(command(model, reference, args.steps, args.save_every), env=ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    watcher = Watcher(killed / "checkpoints")
    watcher.start()
    kills = restarts = 0
    metrics = killed / "metrics.jsonl"
    while True:
        resume = ["--resume"] if kills else []
        restarts += bool(kills)
        proc = subprocess.Popen(command(model, killed, args.steps, args.save_every) + resume, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        at = lines(metrics) + rng.randint(1, args.kill_within)  # metrics are truncated to the resumed step
        while proc.poll() is None and lines(metrics) < at:
            time.sleep(0.01)
        if proc.poll() is not None:
            break
        time.sleep(rng.uniform(0, 0.2))  # somewhere inside the next step or checkpoint write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    _, err = proc.communicate()
    watcher.stop.set()
    watcher.join()
    _, ref_err = ref.communicate()
    if proc.returncode or ref.returncode:
        print(err[-2000:], ref_err[-2000:], file=sys.stderr)
        return 1

    a, b = load_file(str(reference / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    weights_equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (reference, killed)]
    result = {"steps": args.steps, "save_every": args.save_every, "kills": kills, "restarts": restarts,
              "checkpoints_seen": len(watcher.seen), "checkpoint_checks": watcher.checks,
              "half_written_seen": len(watcher.violations), "weights_equal": weights_equal,
              "losses_equal": losses[0] == losses[1], "metric_lines": len(losses[1]),
              "wall_s": round(time.time() - started, 1), "workdir": str(work)}
    print(json.dumps(result, indent=1))
    for v in watcher.violations[:5]:
        print(f"half-written: {v}", file=sys.stderr)
    return 0 if weights_equal and losses[0] == losses[1] and not watcher.violations else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
