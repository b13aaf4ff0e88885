"""Divergences and the reduction against closed forms and brute force."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unisd import losses


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _brute_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.array([sum(pi * math.log(pi / qi) for pi, qi in zip(pr, qr)) for pr, qr in zip(p, q)])


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 7, generator=g, dtype=torch.float64) * 2, torch.randn(5, 7, generator=g, dtype=torch.float64) * 2


def test_forward_and_reverse_kl_match_brute_force(logits):
    s, t = logits
    p_s, p_t = _softmax(s.numpy()), _softmax(t.numpy())
    np.testing.assert_allclose(losses.forward_kl(s, t).numpy(), _brute_kl(p_t, p_s), rtol=1e-6)
    np.testing.assert_allclose(losses.reverse_kl(s, t).numpy(), _brute_kl(p_s, p_t), rtol=1e-6)


def test_two_token_closed_form():
    # p_T = (1/2, 1/2), p_S = (1/4, 3/4): KL(T||S) = 1/2 ln 2 + 1/2 ln(2/3)
    s = torch.log(torch.tensor([[0.25, 0.75]]))
    t = torch.log(torch.tensor([[0.5, 0.5]]))
    expected = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert losses.forward_kl(s, t).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_jsd_matches_eq7_brute_force(logits, alpha):
    s, t = logits
    p_s, p_t = _softmax(s.numpy()), _softmax(t.numpy())
    m = (1 - alpha) * p_s + alpha * p_t
    expected = alpha * _brute_kl(p_t, m) + (1 - alpha) * _brute_kl(p_s, m)
    np.testing.assert_allclose(losses.generalized_jsd(s, t, alpha).numpy(), expected, rtol=1e-6)


def test_jsd_limits_are_the_kls(logits):
    s, t = logits
    eps = 1e-6
    np.testing.assert_allclose((losses.generalized_jsd(s, t, eps) / eps).numpy(),
                               losses.forward_kl(s, t).numpy(), rtol=1e-3)
    np.testing.assert_allclose((losses.generalized_jsd(s, t, 1 - eps) / eps).numpy(),
                               losses.reverse_kl(s, t).numpy(), rtol=1e-3)


def test_jsd_bounds_and_identity(logits):
    s, t = logits
    assert (losses.generalized_jsd(s, t, 0.5) <= math.log(2) + 1e-9).all()
    assert (losses.generalized_jsd(s, t, 0.5) >= 0).all()
    for fn in (losses.forward_kl, losses.reverse_kl):
        assert fn(s, s).abs().max() < 1e-12
    with pytest.raises(ValueError, match="0 < alpha < 1"):
        losses.generalized_jsd(s, t, 0.0)


def test_temperature_divides_both_logit_sets(logits):
    s, t = logits
    for name in ("fkl", "rkl", "jsd"):
        fn = losses.pick(name, 0.3)
        torch.testing.assert_close(fn(s, t, 0.7), fn(s / 0.7, t / 0.7, 1.0))
    # a high temperature flattens both distributions toward uniform: the divergence shrinks
    assert (losses.forward_kl(s, t, 100.0) < losses.forward_kl(s, t, 1.0)).all()


def test_chunked_distillation_equals_full_computation_and_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False).double()
    h_s = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(13, 8, dtype=torch.float64)
    tok = torch.randint(0, 11, (13,))
    fn = losses.pick("jsd", 0.3)
    D, lp_s, lp_t = losses.distill_in_chunks(head, h_s, head, h_t, tok, fn, 0.7, chunk=4)
    (D.sum() + lp_s.sum()).backward()
    g_chunked, w_chunked = h_s.grad.clone(), head.weight.grad.clone()
    h_s.grad = None
    head.weight.grad = None
    z_s, z_t = head(h_s), head(h_t).detach()
    D_ref = fn(z_s, z_t, 0.7)
    lp_ref = torch.log_softmax(z_s, -1).gather(-1, tok[:, None])[:, 0]
    (D_ref.sum() + lp_ref.sum()).backward()
    torch.testing.assert_close(D, D_ref)
    torch.testing.assert_close(lp_s, lp_ref)
    torch.testing.assert_close(lp_t, torch.log_softmax(z_t, -1).gather(-1, tok[:, None])[:, 0])
    torch.testing.assert_close(g_chunked, h_s.grad)
    torch.testing.assert_close(w_chunked, head.weight.grad)
    torch.testing.assert_close(losses.logprobs_in_chunks(head, h_t, tok, chunk=5), lp_t)


def test_weighted_mean_is_mean_of_sequence_means():
    v = torch.tensor([[1.0, 3.0, 9.0], [2.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert losses.weighted_mean(v, m).item() == pytest.approx((2.0 + 2.0) / 2)
    # a sequence with no valid token is ignored, an empty batch is 0 (not NaN)
    m2 = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert losses.weighted_mean(v, m2).item() == pytest.approx(2.0)
    assert losses.weighted_mean(v, torch.zeros_like(m)).item() == 0.0


def test_sequence_weight_does_not_cancel():
    v = torch.tensor([[1.0, 1.0], [5.0, 5.0]])
    m = torch.ones_like(v)
    # halving the second sequence's weight moves the loss toward the first: (1*1 + .5*5) / 1.5
    w = torch.tensor([[1.0], [0.5]])
    assert losses.weighted_mean(v, m, w).item() == pytest.approx((1 + 0.5 * 5) / 1.5)
    # token weights re-weight within a sequence
    w_tok = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    v2 = torch.tensor([[0.0, 4.0], [2.0, 2.0]])
    w_tok[0, 1] = 0.0
    assert losses.weighted_mean(v2, m, w_tok).item() == pytest.approx((0.0 + 2.0 * 2 / 2) / (0.5 + 1.0))


def test_any_leading_shape_is_per_position(logits):
    """[B, T, V] logits give the values of each [V] row: the vocabulary is the last axis, whatever the rank."""
    s, t = (x.reshape(1, 5, 7) for x in logits)
    tokens = torch.arange(5).reshape(1, 5)
    for fn in (losses.forward_kl, losses.reverse_kl, lambda a, b: losses.generalized_jsd(a, b, 0.3)):
        rows = torch.stack([fn(s[0, i], t[0, i]) for i in range(5)])
        torch.testing.assert_close(fn(s, t), rows[None])
    by_row = torch.stack([torch.log_softmax(s[0, i], -1)[i] for i in range(5)])
    torch.testing.assert_close(losses.sampled_logprobs(s, tokens), by_row[None])


def test_bf16_logits_are_scored_in_fp32(logits):
    s, t = (x.to(torch.bfloat16) for x in logits)
    got = losses.forward_kl(s, t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, losses.forward_kl(s.float(), t.float()))


def test_jsd_alpha_must_lie_strictly_inside_0_1(logits):
    s, t = logits
    for alpha in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="0 < alpha < 1"):
            losses.generalized_jsd(s, t, alpha)
    torch.testing.assert_close(losses.pick("jsd")(s, t, 1.0), losses.generalized_jsd(s, t, 0.5))  # default 0.5


def test_chunked_loss_reaches_the_head_even_from_constant_hidden_states():
    """The head's gradient flows through every checkpointed chunk, also when the inputs need no gradient."""
    torch.manual_seed(1)
    head = torch.nn.Linear(4, 6, bias=False).double()
    h_s, h_t = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    tok = torch.randint(0, 6, (7,))
    D, _, _ = losses.distill_in_chunks(head, h_s, head, h_t, tok, losses.forward_kl, 1.0, chunk=3)
    D.sum().backward()
    chunked = head.weight.grad.clone()
    head.weight.grad = None
    losses.forward_kl(head(h_s), head(h_t).detach()).sum().backward()
    torch.testing.assert_close(chunked, head.weight.grad)


def test_no_completion_position_gives_empty_results():
    head = torch.nn.Linear(4, 6, bias=False)
    empty = torch.zeros(0, 4)
    out = losses.distill_in_chunks(head, empty, head, empty, torch.zeros(0, dtype=torch.long), losses.forward_kl, 1.0)
    assert [tuple(x.shape) for x in out] == [(0,), (0,), (0,)]


def test_under_bf16_compute_the_head_matmul_runs_in_bf16_and_the_rest_in_fp32():
    torch.manual_seed(0)
    N, H, V = 37, 16, 50
    head = torch.nn.Linear(H, V, bias=False)
    seen: list[torch.dtype] = []
    head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    h_s, h_t = torch.randn(N, H, requires_grad=True), torch.randn(N, H)
    tokens = torch.randint(0, V, (N,))
    exact = losses.distill_in_chunks(head, h_s, head, h_t, tokens, losses.forward_kl, 1.0, chunk=16)
    assert set(seen) == {torch.float32}
    seen.clear()
    fast = losses.distill_in_chunks(head, h_s, head, h_t, tokens, losses.forward_kl, 1.0, chunk=16, bf16=True)
    assert set(seen) == {torch.bfloat16}  # the logits, before the log-softmax's fp32 cast
    assert all(x.dtype == torch.float32 for x in fast)
    for a, b in zip(fast, exact):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)
    seen.clear()
    fast[0].sum().backward()  # the recomputed chunks run in bf16 too, and the head's gradient stays fp32
    assert set(seen) == {torch.bfloat16}
    assert head.weight.grad is not None and head.weight.grad.dtype == torch.float32
    seen.clear()
    with torch.no_grad():
        lp = losses.logprobs_in_chunks(head, h_t, tokens, chunk=16, bf16=True)
    assert set(seen) == {torch.bfloat16} and lp.dtype == torch.float32
    torch.testing.assert_close(lp, exact[2], rtol=0.05, atol=0.05)
