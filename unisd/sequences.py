"""Token layout: chat-rendered prompts, left-padded, followed by one shared right-padded completion.

Every view of an example (student, teacher, auxiliary contexts) scores the *same* completion tokens;
only the prompt differs. Left padding keeps the completion aligned at the same columns in every row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from transformers import PreTrainedTokenizerBase


Prompt = str | Sequence[Mapping[str, str]]  # one user turn, or a list of {"role", "content"} messages


def render(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """Token ids of the prompt's turns plus the assistant header (raw text for tokenizers without a template).

    A string is one user turn; a list of messages carries a system prompt and earlier turns.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "\n\n".join(m["content"] for m in messages)
    return tokenizer(text, add_special_tokens=not tokenizer.chat_template)["input_ids"]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[R] lists of ids -> ids [R, P], attention [R, P], padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            attn[i, width - len(r):] = 1
    return ids, attn


@dataclass(frozen=True)
class Packed:
    """Prompt + completion rows ready for a forward pass; `start` is the column of completion token 0."""

    ids: torch.Tensor        # [R, P + T]
    attention: torch.Tensor  # [R, P + T]
    positions: torch.Tensor  # [R, P + T]
    start: int               # P


def pack(prompts: list[list[int]], completion: torch.Tensor, completion_mask: torch.Tensor, pad_id: int) -> Packed:
    """Left-padded prompts [R] + completion [R, T] (right-padded; mask marks real tokens)."""
    ids, attn = left_pad(prompts, pad_id)
    full_ids = torch.cat([ids, completion.to(ids.device)], dim=1)
    full_attn = torch.cat([attn, completion_mask.to(attn.device, torch.long)], dim=1)
    positions = (full_attn.cumsum(-1) - 1).clamp_min(0)
    return Packed(full_ids, full_attn, positions, ids.shape[1])


def completion_mask(tokens: torch.Tensor, eos_ids: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [B, T] of real completion tokens (up to and including the first EOS) and truncated [B].

    A completion is truncated when it never produced EOS: it hit the token limit mid-answer.
    """
    is_eos = torch.zeros_like(tokens, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= tokens == e
    # tokens strictly after the first EOS are padding
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    mask = ~after_eos
    truncated = ~is_eos.any(-1)
    return mask.float(), truncated
