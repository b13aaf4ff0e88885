"""Whether UniSD*'s no-grad views may run in bf16 beside an fp32 student: the error it makes, batch by batch.

    python -m tools.bf16_views [--model smollm2-135m] [--batches 4] [--batch-size 4] [--out FILE.json]

The views (the teacher, agree's contexts, contrast's negative) need no gradient, so on hardware with fast
bf16 they could run in bf16 while the student trains in fp32 (issue 40). This prepares a UniSD* run on the
demo task, samples real batches, and computes each batch's loss terms twice on the same completions: all in
fp32, then with the views' decoder in bf16 (their hidden states upcast to fp32 before the heads, which stay
fp32; the student unchanged). It prints the relative error of the distillation loss and of each auxiliary
term, and the largest change of agree's per-token weights. The bar: 1e-3 relative on the losses, 1e-2 on the
weights. Each pass is timed too (the student's fp32 forward is in both), so a CPU with native bf16 shows what the
bf16 views would save. tools/results/bf16_views.json keeps a run, with the machine it ran on.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from bench import provenance
from unisd import config as cfg
from unisd import losses, views
from unisd.sequences import render
from unisd.train import _teacher, forward, make_batch, prepare

LOSS_TOLERANCE, WEIGHT_TOLERANCE = 1e-3, 1e-2


@contextlib.contextmanager
def views_in_bf16() -> Iterator[None]:
    """Run every no-grad `views.hidden` call (the views; the student's forward keeps its gradient) in bf16."""
    fp32 = views.hidden

    def hidden(*args: Any, **kwargs: Any) -> torch.Tensor:
        if torch.is_grad_enabled():
            return fp32(*args, **kwargs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fp32(*args, **kwargs).float()

    views.hidden = hidden  # type: ignore[assignment]
    try:
        yield
    finally:
        views.hidden = fp32  # type: ignore[assignment]


def loss_terms(run: Any, batch: Any) -> tuple[dict[str, float], torch.Tensor | None]:
    """The step's loss terms for this batch as `unisd.train.step` computes them, and agree's weights."""
    out = forward(run, batch, _teacher(run))
    weights = run.hooks.weights(out)
    numerator, denominator = losses.weighted_sums(run.hooks.token_loss(out.divergence, out), out.mask, weights)
    terms = {"distill": float(numerator.detach() / denominator.clamp_min(1e-12))}
    terms |= {name: float(value.detach()) for name, value in run.hooks.aux_losses(out).items()}
    return terms, None if weights is None else weights.detach() * out.mask


def measure(model: str, batches: int, batch_size: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        config = cfg.resolve("unisd-star", (), {"contrast": {"max_new_tokens": "96"}}, model=model, data="demo",
                             out=str(Path(tmp) / "run"), batch_size=batch_size, max_new_tokens=96, save_every=0,
                             max_steps=batches, lr=2e-5, lora=True)
        run = prepare(config, echo=print)
        for _ in range(batches):
            batch = make_batch(run)
            rollout = run.policy.sample([render(run.tokenizer, p) for p in batch.prompts["student"]],
                                        config.max_new_tokens, config.temperature, config.top_p)
            batch.tokens, batch.truncated, batch.mask = rollout.tokens, rollout.truncated, rollout.mask
            batch.loss_mask = rollout.mask
            batch.prompts.update(run.hooks.views(batch))
            start = time.perf_counter()
            reference, ref_weights = loss_terms(run, batch)
            middle = time.perf_counter()
            with views_in_bf16():
                low, low_weights = loss_terms(run, batch)
            seconds = {"fp32": middle - start, "bf16_views": time.perf_counter() - middle}
            error = {k: abs(low[k] - v) / abs(v) if v else abs(low[k]) for k, v in reference.items()}
            assert ref_weights is not None and low_weights is not None  # UniSD* weighs every token (agree)
            weight_gap = float((low_weights - ref_weights).abs().max())
            rows.append({"fp32": reference, "bf16_views": low, "relative_error": error, "weights_max_change": weight_gap,
                         "completion_tokens": int(rollout.mask.sum()), "seconds": seconds})
            print(f"batch {len(rows)}: " + ", ".join(f"{k} {v:.2e}" for k, v in error.items())
                  + f"; agree weights max change {weight_gap:.2e}; forwards {seconds['fp32']:.2f} s fp32, "
                  f"{seconds['bf16_views']:.2f} s with bf16 views")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = measure(args.model, args.batches, args.batch_size)
    worst = {k: max(r["relative_error"][k] for r in rows) for k in rows[0]["relative_error"]}
    weights = max(r["weights_max_change"] for r in rows)
    passed = all(v <= LOSS_TOLERANCE for v in worst.values()) and weights <= WEIGHT_TOLERANCE
    later = rows[1:] or rows  # the first batch also pays first touches of memory
    seconds = {k: sum(r["seconds"][k] for r in later) for k in ("fp32", "bf16_views")}
    print("worst relative error: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items())
          + f"; agree weights {weights:.2e}: " + ("within" if passed else "outside")
          + f" the bar ({LOSS_TOLERANCE:g} on losses, {WEIGHT_TOLERANCE:g} on weights); forwards over batches "
          f"2-{len(rows)}: {seconds['fp32']:.2f} s fp32, {seconds['bf16_views']:.2f} s with bf16 views")
    if args.out:
        provenance.write(args.out, {"description": "UniSD*'s loss terms with the no-grad views in bf16 beside an fp32 "
                                    "student: relative error per batch, and the forwards' seconds",
                                    "model": args.model, "threads": torch.get_num_threads(), "rows": rows,
                                    "worst": worst, "weights_max_change": weights, "within": passed,
                                    "seconds_after_first": seconds}, sys.argv[1:], module="tools.bf16_views")


if __name__ == "__main__":
    main()
