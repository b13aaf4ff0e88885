"""How far the LoRA EMA teacher (an average of the adapter's factors) is from an average of the merged weights.

    python -m tools.ema_factors [--steps 10] [--beta 0.5] [--lr 5e-2]

Under LoRA the EMA teacher is a second adapter whose A and B follow the student's (`policy.follower`), so its
weights are W + s·B̄Ā; a full copy would hold W + s·avg(BA). They differ by a product of averages against an
average of products. This trains the tiny test model (a 2-layer Llama of width 32, LoRA r 4, `ema` every step)
and keeps the merged-weight average beside the run, then prints, after each step, the difference between the
two teachers relative to how far the merged average has moved from the base, and the KL between their
next-token distributions on the training prompts. docs/differences.md quotes the result.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from unisd import config as cfg
from unisd.train import prepare, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=5e-2)
    args = parser.parse_args()
    from tests.conftest import TINY_ROWS, build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model, data = build_tiny_model(Path(tmp) / "model"), Path(tmp) / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS))
        config = cfg.resolve("", ("ema",), {"ema": {"every": "1", "beta": str(args.beta)}}, model=str(model),
                             data=str(data), out=str(Path(tmp) / "out"), batch_size=2, max_new_tokens=8,
                             max_steps=args.steps, lr=args.lr, lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)
        run = prepare(config, echo=lambda m: None)
        teacher, base = run.policy.as_model(run.plugins[0].teacher(run)), dict(run.policy.initial.weights())
        assert teacher.adapter_name is not None  # the adapter form
        merged = {n: w.clone() for n, w in run.policy.student.weights()}  # a full copy's θ̄ ← θ
        for _ in range(args.steps):
            step(run)
            for n, w in run.policy.student.weights():
                merged[n].lerp_(w, 1.0 - args.beta)
            factors = dict(teacher.weights())
            gap = sum(float((factors[n] - merged[n]).pow(2).sum()) for n in merged) ** 0.5
            moved = sum(float((merged[n] - base[n]).pow(2).sum()) for n in merged) ** 0.5
            if moved == 0:  # the first step of the warmup has learning rate 0
                continue
            print(f"step {run.step}: |factor avg - merged avg| / |merged avg - base| = {gap / moved:.4f}; "
                  f"teachers' KL {_kl(run, teacher, merged):.2e} nats/token")


@torch.no_grad()
def _kl(run, teacher, merged: dict[str, torch.Tensor]) -> float:
    """Mean KL(merged-average teacher || factor-average teacher) per prompt token."""
    from unisd.sequences import render

    ids = [render(run.tokenizer, e.prompt) for e in run.examples]
    plain, out = _plain(run, merged), []
    for row in ids:
        x = torch.tensor([row])
        with teacher.adapter():
            log_q = torch.log_softmax(run.policy.model(input_ids=x).logits, -1)
        log_p = torch.log_softmax(plain(input_ids=x).logits, -1)
        out.append(float((log_p.exp() * (log_p - log_q)).sum(-1).mean()))
    return sum(out) / len(out)


def _plain(run, weights: dict[str, torch.Tensor]):
    from transformers import AutoModelForCausalLM

    from unisd import models

    model = AutoModelForCausalLM.from_config(models.base_model(run.policy.model).config)
    model.load_state_dict(weights, strict=False)
    return model.eval()


if __name__ == "__main__":
    main()
