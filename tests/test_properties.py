"""Properties of the divergences and the reduction over random shapes and values (Hypothesis).

The closed-form tests in test_losses.py pin single values; these check the laws that must hold for
every input: a divergence is >= 0 and 0 only at equality, the JSD is bounded by ln 2 and tends to the
KLs at its ends, temperature divides the logits, chunking changes nothing, and the weighted mean does
not depend on the order of sequences or the scale of the weights.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unisd import losses

FAST = settings()  # the profile's (tests/conftest.py): 40 examples, no deadline


def _approx(value: float):
    return pytest.approx(value, rel=1e-9)
DIVERGENCES = [losses.forward_kl, losses.reverse_kl, lambda s, t, temperature=1.0: losses.generalized_jsd(s, t, 0.5, temperature)]


@st.composite
def logit_pairs(draw, max_rows: int = 6, max_vocab: int = 9, max_scale: float = 6.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float64 logit tensors [N, V] (V >= 2) from a seed, with scales from flat to peaked."""
    rows, vocab = draw(st.integers(1, max_rows)), draw(st.integers(2, max_vocab))
    seed, scale = draw(st.integers(0, 2**31 - 1)), draw(st.floats(0.1, max_scale))
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale,
            torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale)


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p / q).log()).sum(-1)


@FAST
@given(logit_pairs(), st.sampled_from(range(len(DIVERGENCES))))
def test_divergences_are_non_negative_and_zero_at_equality(pair, which):
    s, t = pair
    fn = DIVERGENCES[which]
    assert (fn(s, t) >= -1e-12).all()
    assert fn(s, s).abs().max() < 1e-12
    assert fn(s, s + 3.0).abs().max() < 1e-12  # a constant shift leaves the distribution unchanged


@FAST
@given(logit_pairs(), st.sampled_from(range(len(DIVERGENCES))))
def test_divergence_is_positive_where_distributions_differ(pair, which):
    s, t = pair
    differ = (torch.softmax(s, -1) - torch.softmax(t, -1)).abs().amax(-1) > 1e-3
    d = DIVERGENCES[which](s, t)
    assert (d[differ] > 0).all()


@FAST
@given(logit_pairs(), st.floats(0.01, 0.99))
def test_jsd_is_the_mixture_formula_and_at_most_ln2(pair, alpha):
    s, t = pair
    p_s, p_t = torch.softmax(s, -1), torch.softmax(t, -1)
    m = (1 - alpha) * p_s + alpha * p_t
    expected = alpha * _kl(p_t, m) + (1 - alpha) * _kl(p_s, m)
    got = losses.generalized_jsd(s, t, alpha)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-12)
    assert (got <= math.log(2) + 1e-12).all()


@FAST
@given(st.integers(2, 9), st.integers(0, 2**31 - 1))
def test_jsd_reaches_ln2_on_disjoint_supports(vocab, seed):
    # one-hot distributions on different tokens: M = (p_S + p_T) / 2 and D = ln 2 exactly
    a, b = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))[:2].tolist()
    s = torch.full((1, vocab), -1e4, dtype=torch.float64)
    t = s.clone()
    s[0, a], t[0, b] = 0.0, 0.0
    assert losses.generalized_jsd(s, t, 0.5).item() == _approx(math.log(2))


@FAST
@given(logit_pairs(max_scale=2.0))
def test_jsd_over_alpha_tends_to_the_kls_at_the_ends(pair):
    # the gap is about eps * sum p_T^2 / p_S (moderate logits keep it small), and float64 rounding of
    # D ~ eps * KL is about 1e-16 / eps = 1e-7 in absolute terms
    s, t = pair
    eps = 1e-9
    torch.testing.assert_close(losses.generalized_jsd(s, t, eps) / eps, losses.forward_kl(s, t), rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(losses.generalized_jsd(s, t, 1 - eps) / eps, losses.reverse_kl(s, t),
                               rtol=1e-3, atol=1e-6)


@FAST
@given(logit_pairs(), st.sampled_from(range(len(DIVERGENCES))), st.floats(0.2, 5.0))
def test_temperature_divides_the_logits(pair, which, temperature):
    s, t = pair
    fn = DIVERGENCES[which]
    torch.testing.assert_close(fn(s, t, temperature), fn(s / temperature, t / temperature, 1.0))


@FAST
@given(st.integers(0, 24), st.integers(1, 8), st.integers(2, 12), st.integers(1, 50), st.integers(0, 2**31 - 1))
def test_chunked_equals_unchunked_for_any_shape(positions, hidden, vocab, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(hidden, vocab, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g, dtype=torch.float64))
    h_s = torch.randn(positions, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(positions, hidden, generator=g, dtype=torch.float64)
    tok = torch.randint(0, vocab, (positions,), generator=g)
    fn = losses.pick("jsd", 0.3)
    D, lp_s, lp_t = losses.distill_in_chunks(head, h_s, head, h_t, tok, fn, 0.8, chunk=chunk)
    assert D.shape == lp_s.shape == lp_t.shape == (positions,)
    z_s, z_t = head(h_s), head(h_t)
    same = {"check_dtype": False}  # no position at all gives float32 empties, whatever the hidden dtype
    torch.testing.assert_close(D, fn(z_s, z_t.detach(), 0.8), **same)
    torch.testing.assert_close(lp_s, torch.log_softmax(z_s, -1).gather(-1, tok[:, None])[:, 0], **same)
    torch.testing.assert_close(lp_t, torch.log_softmax(z_t, -1).gather(-1, tok[:, None])[:, 0], **same)
    torch.testing.assert_close(losses.logprobs_in_chunks(head, h_t, tok, chunk=chunk), lp_t, **same)
    if positions:
        (grad_chunked,) = torch.autograd.grad(D.sum(), h_s)
        (grad_full,) = torch.autograd.grad(fn(head(h_s), z_t.detach(), 0.8).sum(), h_s)
        torch.testing.assert_close(grad_chunked, grad_full)


@st.composite
def batches(draw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """values, a mask with at least one valid token, positive weights: [B, T] each."""
    rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 7))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    values = torch.rand(rows, cols, generator=g, dtype=torch.float64) * 10
    mask = (torch.rand(rows, cols, generator=g) < 0.7).double()
    mask[draw(st.integers(0, rows - 1)), draw(st.integers(0, cols - 1))] = 1.0
    weights = torch.rand(rows, cols, generator=g, dtype=torch.float64) + 0.05
    return values, mask, weights


def _brute_weighted_mean(values: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> float:
    num = den = 0.0
    for v, m, w in zip(values.tolist(), mask.tolist(), weights.tolist()):
        n = sum(m)
        if n:
            num += sum(mi * wi * vi for vi, mi, wi in zip(v, m, w)) / n
            den += sum(mi * wi for mi, wi in zip(m, w)) / n
    return num / den


@FAST
@given(batches(), st.integers(0, 2**31 - 1), st.floats(0.01, 100.0))
def test_weighted_mean_ignores_sequence_order_and_weight_scale(batch, seed, scale):
    values, mask, weights = batch
    expected = _brute_weighted_mean(values, mask, weights)
    assert losses.weighted_mean(values, mask, weights).item() == _approx(expected)
    perm = torch.randperm(values.shape[0], generator=torch.Generator().manual_seed(seed))
    assert losses.weighted_mean(values[perm], mask[perm], weights[perm]).item() == _approx(expected)
    assert losses.weighted_mean(values, mask, weights * scale).item() == _approx(expected)
    # a constant value is its own mean, whatever the weights
    assert losses.weighted_mean(torch.full_like(values, 2.5), mask, weights).item() == _approx(2.5)


@FAST
@given(batches())
def test_masked_tokens_do_not_count(batch):
    values, mask, weights = batch
    noisy = values + (1 - mask) * 1e6  # whatever sits under the mask
    torch.testing.assert_close(losses.weighted_mean(noisy, mask, weights), losses.weighted_mean(values, mask, weights))
    numerator, denominator = losses.weighted_sums(values, mask, weights)
    torch.testing.assert_close(numerator / denominator, losses.weighted_mean(values, mask, weights))
