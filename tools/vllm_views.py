"""Whether agree's and contrast's views are cheaper scored by the vLLM engine than by the trainer's no-grad forward.

    python -m tools.vllm_views [--model smollm2-135m] [--batches 3] [--batch-size 4] [--out FILE.json]

Of these views only the sampled token's log-probability is used (agree's weights, contrast's hinge), and a vLLM
engine gives it for every token of a prompt (`prompt_logprobs=0`). The engine samples with the student's weights,
so scoring the views there means loading the teacher's (UniSD*'s EMA teacher) into it first, every step; the
student's are loaded before the next rollout anyway. This prepares a UniSD* run on the demo task with vLLM
rollouts, samples real batches, and scores the same view rows both ways: the trainer's way (`views.hidden` in
groups of similar length, then the head at the completion positions) and the engine's way (a load of the
teacher's weights, then one prompt-log-probability request per row), timed apart, with the largest difference
of the log-probabilities. tools/results/vllm_views.json keeps a run.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench import provenance
from unisd import config as cfg
from unisd import losses, views
from unisd.sequences import render
from unisd.train import _teacher, make_batch, prepare


def trainer_logps(run: Any, teacher: Any, rows: list[list[int]], tokens: torch.Tensor, mask: torch.Tensor
                  ) -> torch.Tensor:
    """[R, T] log-probabilities of each row's completion tokens, as `unisd.train.forward` scores a view."""
    B, T = tokens.shape
    plan = views.by_length(rows, B, T, size=B)
    with torch.no_grad():
        hidden = views.hidden(teacher.hidden, rows, tokens, mask, run.tokenizer.pad_token_id, plan)
        where = mask.bool().repeat(len(rows) // B, 1)
        logps = losses.logprobs_in_chunks(teacher.head, hidden[where], tokens.repeat(len(rows) // B, 1)[where])
    return torch.zeros(where.shape).masked_scatter(where, logps)


def engine_logps(engine: Any, rows: list[list[int]], tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The same from the engine: each row's prompt and completion as one prompt, the log-probability of each
    completion token read from its prompt log-probabilities."""
    B = tokens.shape[0]
    completions = [tokens[r % B][mask[r % B].bool()].tolist() for r in range(len(rows))]
    params = engine.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
    outputs = engine.llm.generate([{"prompt_token_ids": p + c} for p, c in zip(rows, completions)], params,
                                  use_tqdm=False)
    found = torch.zeros(len(rows), tokens.shape[1])
    for r, (prompt, completion, out) in enumerate(zip(rows, completions, outputs)):
        scored = out.prompt_logprobs[len(prompt):]
        values = torch.tensor([entry[t].logprob for t, entry in zip(completion, scored)])
        found[r].masked_scatter_(mask[r % B].bool(), values)
    return found


def measure(model: str, batches: int, batch_size: int) -> list[dict[str, Any]]:
    found = []
    with tempfile.TemporaryDirectory() as tmp:
        config = cfg.resolve("unisd-star", (), {"contrast": {"tries": "1"}}, model=model, data="demo",
                             out=str(Path(tmp) / "run"), batch_size=batch_size, max_new_tokens=96, save_every=0,
                             max_steps=batches, lr=2e-5, lora=True, rollout="vllm", rollout_eager=True)
        run = prepare(config, echo=print)
        engine = run.policy.engine
        for _ in range(batches):
            batch = make_batch(run)
            rollout = run.policy.sample([render(run.tokenizer, p) for p in batch.prompts["student"]],
                                        config.max_new_tokens, config.temperature, config.top_p)
            batch.prompts.update(run.hooks.views(batch))
            names = [v for v in batch.prompts if v not in ("student", "teacher")]
            rows = [render(run.tokenizer, p) for v in names for p in batch.prompts[v]]
            teacher = _teacher(run)
            started = time.perf_counter()
            ours = trainer_logps(run, teacher, rows, rollout.tokens, rollout.mask)
            trainer_s = time.perf_counter() - started
            started = time.perf_counter()
            engine.load(teacher.weights(), "teacher")
            load_s = time.perf_counter() - started
            started = time.perf_counter()
            theirs = engine_logps(engine, rows, rollout.tokens, rollout.mask)
            engine_s = time.perf_counter() - started
            mask = rollout.mask.bool().repeat(len(rows) // batch_size, 1)
            found.append({"views": names, "rows": len(rows), "completion_tokens": int(rollout.mask.sum()),
                          "row_tokens": sum(len(r) for r in rows) + int(mask.sum()),
                          "trainer_s": trainer_s, "teacher_load_s": load_s, "engine_s": engine_s,
                          "max_logp_difference": float((ours - theirs)[mask].abs().max())})
            print(f"batch {len(found)}: {len(rows)} rows; trainer {trainer_s:.2f} s, engine {engine_s:.2f} s "
                  f"+ teacher load {load_s:.2f} s; max |logp difference| {found[-1]['max_logp_difference']:.1e}")
        run.policy.close()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = measure(args.model, args.batches, args.batch_size)
    later = rows[1:] or rows  # the first batch also pays the engine's first requests
    total = {k: sum(r[k] for r in later) for k in ("trainer_s", "engine_s", "teacher_load_s")}
    speedup = total["trainer_s"] / (total["engine_s"] + total["teacher_load_s"])
    print(f"views: trainer {total['trainer_s']:.2f} s, engine {total['engine_s']:.2f} s + teacher loads "
          f"{total['teacher_load_s']:.2f} s over batches 2-{len(rows)}: the engine is {speedup:.2f}x the trainer's speed")
    if args.out:
        provenance.write(args.out, {"model": args.model, "threads": torch.get_num_threads(), "rows": rows,
                                    "totals_after_first": total, "engine_speedup": speedup},
                         sys.argv[1:], module="tools.vllm_views")


if __name__ == "__main__":
    main()
