"""--skip-first-tokens N: the first N completion tokens of every sample carry no loss and no gradient,
and are still seen by the tokens after them (attention and positions are those of sampling)."""
from __future__ import annotations

import shutil

import pytest
import torch

from unisd import checkpoint
from unisd import config as cfg
from unisd import losses
from unisd import train as tr
from unisd.rollout import Rollout

SKIP = 2
LENGTHS = (6, 2)  # the second completion is no longer than SKIP: nothing of it counts
FORWARD = tr.forward  # the step's forward, before any test wraps it


def test_without_first_turns_off_the_first_positions_of_each_row():
    mask = torch.tensor([[1.0, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    assert losses.without_first(mask, 2).tolist() == [[0, 0, 1, 1, 0], [0, 0, 0, 0, 0]]
    assert torch.equal(losses.without_first(mask, 0), mask)


def test_a_negative_count_is_refused():
    with pytest.raises(cfg.ConfigError, match="--skip-first-tokens"):
        cfg.resolve("", (), {}, model="m", data="d", out="o", skip_first_tokens=-1)


def _fixed_rollout(vocab: int) -> Rollout:
    g = torch.Generator().manual_seed(0)
    T = max(LENGTHS)
    tokens = torch.randint(3, vocab, (len(LENGTHS), T), generator=g)
    mask = (torch.arange(T)[None] < torch.tensor(LENGTHS)[:, None]).float()
    return Rollout(tokens * mask.long(), mask, torch.zeros(len(LENGTHS), dtype=torch.bool))


def _run(tiny_model, tiny_data, tmp_path, skip: int):
    config = cfg.resolve("", (), {}, model=str(tiny_model), data=str(tiny_data), out=str(tmp_path / f"skip{skip}"),
                         batch_size=len(LENGTHS), max_new_tokens=max(LENGTHS), max_grad_norm=1e9,
                         skip_first_tokens=skip)
    return tr.prepare(config, echo=lambda m: None)


def _step_gradients(run, rollout, monkeypatch) -> dict[str, torch.Tensor]:
    """The gradient `step` computes on `rollout` (captured when the step clears it)."""
    monkeypatch.setattr(tr.Policy, "sample", lambda *a, **k: rollout)
    grads: dict[str, torch.Tensor] = {}
    monkeypatch.setattr(run.optimizer, "zero_grad", lambda **kw: grads.update(
        {n: p.grad.clone() for n, p in run.policy.model.named_parameters() if p.grad is not None}))
    tr.step(run)
    return grads


def test_skipped_positions_carry_no_gradient(tiny_model, tiny_data, tmp_path, monkeypatch):
    probe = _run(tiny_model, tiny_data, tmp_path, 0)
    rollout = _fixed_rollout(probe.policy.model.config.vocab_size)
    skipped = _step_gradients(_run(tiny_model, tiny_data, tmp_path, SKIP), rollout, monkeypatch)
    every = _step_gradients(_run(tiny_model, tiny_data, tmp_path, 0), rollout, monkeypatch)

    # by hand: the same loss over the tokens after the first SKIP of each completion, the rest left out of the
    # loss but not out of the forward
    run = _run(tiny_model, tiny_data, tmp_path, 0)
    batch = tr.make_batch(run)
    kept = rollout.mask.clone()
    kept[:, :SKIP] = 0.0
    batch.tokens, batch.mask, batch.truncated = rollout.tokens, rollout.mask, rollout.truncated
    batch.loss_mask = kept
    out = tr.forward(run, batch, run.policy.initial)
    numerator, denominator = losses.weighted_sums(out.divergence, out.mask)
    (numerator / denominator).backward()
    by_hand = {n: p.grad for n, p in run.policy.model.named_parameters() if p.grad is not None}

    assert skipped.keys() == by_hand.keys()
    for name, grad in by_hand.items():
        torch.testing.assert_close(skipped[name], grad, rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(every[n], g, rtol=1e-3, atol=1e-6) for n, g in by_hand.items())  # skipping matters


def _step_logps(run, rollout, monkeypatch) -> dict[str, torch.Tensor]:
    """Each view's log-probs [B, T] of the sampled tokens in `step`'s forward, as plugins see them."""
    monkeypatch.setattr(tr.Policy, "sample", lambda *a, **k: rollout)
    seen: dict[str, torch.Tensor] = {}

    def recording(*args):
        out = FORWARD(*args)
        seen.update({v: lp.detach().clone() for v, lp in out.logps.items()})
        return out

    monkeypatch.setattr(tr, "forward", recording)
    tr.step(run)
    return seen


def test_counted_tokens_score_the_same_whatever_was_skipped_before_them(tiny_model, tiny_data, tmp_path,
                                                                       monkeypatch):
    # a token's log-prob under student and teacher is that of the context it was sampled in: skipping tokens
    # before it from the loss must not hide them from its attention or shift its position
    probe = _run(tiny_model, tiny_data, tmp_path, 0)
    rollout = _fixed_rollout(probe.policy.model.config.vocab_size)
    every = _step_logps(_run(tiny_model, tiny_data, tmp_path, 0), rollout, monkeypatch)
    for skip in (1, SKIP, 4):
        skipped = _step_logps(_run(tiny_model, tiny_data, tmp_path, skip), rollout, monkeypatch)
        counted = losses.without_first(rollout.mask, skip).bool()
        assert counted.any()
        for view in ("student", "teacher"):
            torch.testing.assert_close(skipped[view][counted], every[view][counted], rtol=1e-5, atol=1e-6)
            assert skipped[view][~counted].eq(0).all()


def test_truncated_completions_are_left_out_of_the_loss_only(tiny_model, tiny_data, tmp_path, monkeypatch):
    config = cfg.resolve("", (), {}, model=str(tiny_model), data=str(tiny_data), out=str(tmp_path / "mt"),
                         batch_size=len(LENGTHS), max_new_tokens=max(LENGTHS), mask_truncated=True)
    run = tr.prepare(config, echo=lambda m: None)
    rollout = _fixed_rollout(run.policy.model.config.vocab_size)
    rollout = Rollout(rollout.tokens, rollout.mask, torch.tensor([True, False]))
    captured = []
    monkeypatch.setattr(tr, "forward", lambda *a: captured.append((a[1].mask.clone(), FORWARD(*a))) or captured[-1][1])
    monkeypatch.setattr(tr.Policy, "sample", lambda *a, **k: rollout)
    tr.step(run)
    (attended, out), = captured
    assert torch.equal(attended, rollout.mask)  # the forward sees every sampled token
    assert out.mask[0].eq(0).all() and torch.equal(out.mask[1], rollout.mask[1])


def test_counted_tokens_leave_out_the_skipped_ones(tiny_model, tiny_data, tmp_path, monkeypatch):
    run = _run(tiny_model, tiny_data, tmp_path, SKIP)
    rollout = _fixed_rollout(run.policy.model.config.vocab_size)
    monkeypatch.setattr(tr.Policy, "sample", lambda *a, **k: rollout)
    metrics = tr.step(run)
    assert metrics["completion_tokens"] == sum(max(n - SKIP, 0) for n in LENGTHS)
    assert metrics["completion_length"] == sum(LENGTHS) / len(LENGTHS)  # what was sampled, skipped or not


def test_a_resume_with_another_skip_count_is_refused(tiny_model, tiny_data, tmp_path):
    def config(skip: int) -> cfg.TrainConfig:
        return cfg.resolve("", (), {}, model=str(tiny_model), data=str(tiny_data), out=str(tmp_path / "run"),
                           max_steps=2, save_every=1, batch_size=2, max_new_tokens=4, skip_first_tokens=skip)

    out = tr.train(config(0), echo=lambda m: None)
    shutil.rmtree(out / "checkpoints" / "step-000002")  # as if stopped after the checkpoint of step 1
    (out / "unisd.json").unlink()
    with pytest.raises(checkpoint.OutputDirError, match="skip_first_tokens: 0 -> 3"):
        tr.train(config(3), resume=True, echo=lambda m: None)
