"""Pure tensor functions: token divergences, sampled-token log-probs, and the weighted reduction.

Shapes: logits [..., V] -> per-token values [...]; hidden states [N, H]; masks and weights [B, T].
Nothing here knows about models, plugins or prompts.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Divergence = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-softmax in at least fp32: bf16 log-probs are too coarse for a KL."""
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) summed over the last (vocabulary) axis."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_T || p_S): mass-covering; the default of the paper's code (its alpha = 0)."""
    return _kl(_log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature))


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_S || p_T): mode-seeking."""
    return _kl(_log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature))


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float,
                    temperature: float = 1.0) -> torch.Tensor:
    """The paper's Eq. 7: M = (1-a) p_S + a p_T,  D = a KL(p_T || M) + (1-a) KL(p_S || M).

    D tends to 0 at both ends; D / a -> forward KL as a -> 0 and D / (1-a) -> reverse KL as a -> 1,
    so pick `forward_kl` / `reverse_kl` for the endpoints rather than a = 0 or 1.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"jsd needs 0 < alpha < 1, got {alpha} (use fkl or rkl for the endpoints)")
    log_s = _log_probs(student_logits, temperature)
    log_t = _log_probs(teacher_logits, temperature)
    log_m = torch.logaddexp(log_s + math.log(1.0 - alpha), log_t + math.log(alpha))
    return alpha * _kl(log_t, log_m) + (1.0 - alpha) * _kl(log_s, log_m)


def pick(name: str, alpha: float = 0.5) -> Divergence:
    """The divergence named on the command line: fkl, rkl, or jsd with mixture weight alpha."""
    if name == "jsd":
        return lambda s, t, temperature: generalized_jsd(s, t, alpha, temperature)
    return {"fkl": forward_kl, "rkl": reverse_kl}[name]


def objective(name: str, divergence: torch.Tensor, student_logps: torch.Tensor) -> torch.Tensor:
    """The per-token term the loss reduces, as --divergence names it: the divergence itself (fkl, rkl, jsd),
    the student's cross-entropy on the completion tokens (ce), or nothing (none: auxiliary terms alone)."""
    if name == "ce":
        return -student_logps
    if name == "none":
        return torch.zeros_like(divergence)
    return divergence


def sampled_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) at temperature 1 for each position: [..., V], [...] -> [...]."""
    return _log_probs(logits, 1.0).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def head_logits(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, bf16: bool) -> torch.Tensor:
    """The output head's matmul, in bf16 under bf16 compute: it is the largest matmul of a small model (at 0.5 B
    the head is 136 M of 494 M parameters) and runs for the student, each teacher view and again in backward.
    Only the matmul: the log-softmax after it upcasts to fp32 (`_log_probs`)."""
    if not bf16:
        return head(hidden)
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16):
        return head(hidden)


def distill_in_chunks(student_head: Callable[[torch.Tensor], torch.Tensor], student_hidden: torch.Tensor,
                      teacher_head: Callable[[torch.Tensor], torch.Tensor], teacher_hidden: torch.Tensor,
                      tokens: torch.Tensor, divergence: Divergence, temperature: float,
                      chunk: int = 512, bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Divergence and sampled-token log-probs from final hidden states, a chunk of positions at a time.

    Inputs are the N completion positions only: hidden [N, H], tokens [N]. Returns (D, logp_student,
    logp_teacher), each [N]. Each chunk runs under activation checkpointing, so the [N, V] logits are
    never all alive at once: backward recomputes a chunk's logits instead of storing them. `bf16`: the heads'
    matmuls in bf16 (`head_logits`).
    """

    def one_chunk(h_s: torch.Tensor, h_t: torch.Tensor, tok: torch.Tensor):
        z_s = head_logits(student_head, h_s, bf16)
        with torch.no_grad():
            z_t = head_logits(teacher_head, h_t, bf16)
        if z_s.shape[-1] != z_t.shape[-1]:  # one tokenizer, embeddings padded to other sizes (Qwen2.5 0.5B vs 7B)
            width = min(z_s.shape[-1], z_t.shape[-1])
            z_s, z_t = z_s[..., :width], z_t[..., :width]
        return divergence(z_s, z_t, temperature), sampled_logprobs(z_s, tok), sampled_logprobs(z_t, tok)

    parts = [checkpoint(one_chunk, student_hidden[i:i + chunk], teacher_hidden[i:i + chunk], tokens[i:i + chunk],
                        use_reentrant=False)
             for i in range(0, tokens.shape[0], chunk)]
    if not parts:
        empty = student_hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty, empty
    return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]


def logprobs_in_chunks(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, tokens: torch.Tensor,
                       chunk: int = 512, bf16: bool = False) -> torch.Tensor:
    """Sampled-token log-probs [N] from hidden [N, H], without ever holding [N, V] logits: with gradient (the
    student, when no teacher is scored) each chunk's logits are recomputed in backward rather than stored.
    `bf16`: the head's matmul in bf16 (`head_logits`)."""
    one = lambda h, t: sampled_logprobs(head_logits(head, h, bf16), t)  # noqa: E731
    parts = [checkpoint(one, hidden[i:i + chunk], tokens[i:i + chunk], use_reentrant=False) if torch.is_grad_enabled()
             else one(hidden[i:i + chunk], tokens[i:i + chunk]) for i in range(0, tokens.shape[0], chunk)]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def without_first(mask: torch.Tensor, n: int) -> torch.Tensor:
    """The completion mask [B, T] with each sample's first n positions off, so those tokens add nothing to
    the loss (SDFT's reference main.py skips 3, `num_loss_tokens_to_skip`)."""
    return mask * (torch.arange(mask.shape[-1], device=mask.device) >= n).to(mask.dtype)


def weighted_sums(values: torch.Tensor, mask: torch.Tensor,
                  weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(numerator, denominator) of `weighted_mean`; data-parallel ranks add up the denominators."""
    mask = mask.to(values.dtype)
    w = mask if weights is None else mask * weights.to(values.dtype)
    per_token = w / mask.sum(-1, keepdim=True).clamp_min(1.0)
    return (per_token * values).sum(), per_token.sum().detach()


def weighted_mean(values: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sequence weighted mean, sequences weighted by their mean reliability.

        loss = sum_b (1/n_b) sum_t m w v  /  sum_b (1/n_b) sum_t m w,   n_b = sum_t m

    With w = 1 this is the mean over sequences of each sequence's token mean. Token weights re-weight
    tokens within a sequence, and a sequence whose weights are low as a whole counts less than the
    others in the batch (a constant per-sequence weight does not cancel, unlike a per-sequence
    normalisation by sum_t m w). Sequences with no valid token are ignored; an empty batch gives 0.
    Weights carry no gradient.
    """
    numerator, denominator = weighted_sums(values, mask, weights)
    return numerator / denominator.clamp_min(1e-12)
