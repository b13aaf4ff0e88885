"""--num-generations G: G completions per prompt, each scored under the same views, weighted as G x B rows."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from unisd import config as cfg
from unisd import losses
from unisd.sequences import render
from unisd.train import forward, make_batch, prepare, train


def _config(model: Path, data: Path, out: Path, **settings) -> cfg.TrainConfig:
    base = dict(model=str(model), data=str(data), out=str(out), batch_size=2, max_new_tokens=5, max_steps=2,
                lr=1e-3, seed=1)
    return cfg.resolve("", ("clip",), {}, **{**base, **settings})


def test_each_prompt_is_sampled_g_times_on_the_same_data_order(tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    one = prepare(_config(tiny_model, tiny_data, tmp_path / "one"), echo=lambda m: None)
    three = prepare(_config(tiny_model, tiny_data, tmp_path / "three", num_generations=3), echo=lambda m: None)
    a, b = make_batch(one), make_batch(three)
    assert b.indices == [i for i in a.indices for _ in range(3)]
    assert b.prompts["teacher"] == [p for p in a.prompts["teacher"] for _ in range(3)]
    assert one.position == three.position  # the data order advances by prompts, not rows
    torch.manual_seed(0)
    rollout = three.policy.sample([render(three.tokenizer, "hi")] * 3, 5, 1.0, 1.0)
    assert len({tuple(r) for r in rollout.tokens.tolist()}) > 1  # identical prompts, independent samples


def test_the_loss_of_g_samples_is_that_of_one_batch_of_g_times_b_rows(tiny_model: Path, tiny_data: Path,
                                                                     tmp_path: Path) -> None:
    """The step's loss on G samples of B prompts, and its gradient, equal those of the G x B rows as separate
    sequences: each row's token mean, averaged over every row (no per-prompt or per-group normalisation)."""
    run = prepare(_config(tiny_model, tiny_data, tmp_path / "g", num_generations=2, max_steps=1), echo=lambda m: None)
    batch = make_batch(run)
    torch.manual_seed(3)
    rollout = run.policy.sample([render(run.tokenizer, p) for p in batch.prompts["student"]], 5, 1.0, 1.0)
    batch.tokens, batch.mask, batch.loss_mask = rollout.tokens, rollout.mask, rollout.mask
    out = forward(run, batch, run.policy.initial)
    numerator, denominator = losses.weighted_sums(out.divergence, out.mask, None)
    params = [p for _, p in run.policy.trainable()]
    step_grads = torch.autograd.grad(numerator / denominator, params, retain_graph=True, allow_unused=True)
    rows = [(out.divergence[r] * out.mask[r]).sum() / out.mask[r].sum() for r in range(len(batch.indices))]
    by_hand = torch.stack(rows).mean()
    hand_grads = torch.autograd.grad(by_hand, params, allow_unused=True)
    assert len(rows) == 4 and torch.allclose(numerator / denominator, by_hand)
    for g, h in zip(step_grads, hand_grads):
        assert (g is None) == (h is None)
        if g is not None:
            torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)


def test_a_run_with_several_generations_trains_and_logs_every_row(tiny_model: Path, tiny_data: Path,
                                                                  tmp_path: Path) -> None:
    out = train(_config(tiny_model, tiny_data, tmp_path / "run", num_generations=2, log_samples=1), echo=lambda m: None)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 1, 1, 1, 2, 2, 2, 2]  # two prompts, two samples each
    assert samples[0]["prompt"] == samples[1]["prompt"] != samples[2]["prompt"]
    record = json.loads((out / "unisd.json").read_text())
    plain = train(_config(tiny_model, tiny_data, tmp_path / "plain"), echo=lambda m: None)
    assert record["data"] == json.loads((plain / "unisd.json").read_text())["data"]
    assert record["config"]["num_generations"] == 2


def test_the_memory_estimate_counts_g_times_b_rows(tmp_path: Path) -> None:
    from unisd import memory

    shape = memory.Shape(params=10**8, linear=8 * 10**7, lora=10**5, hidden=256, intermediate=1024, layers=4,
                         vocab=1000)
    one = memory._activations(cfg.TrainConfig(model="m", data="demo", out=str(tmp_path), batch_size=2), shape, False, 2)
    two = memory._activations(cfg.TrainConfig(model="m", data="demo", out=str(tmp_path), batch_size=2,
                                              num_generations=2), shape, False, 2)
    assert two["teacher views' hidden states"] == 2 * one["teacher views' hidden states"]
