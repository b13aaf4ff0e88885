"""Token layout: chat-rendered prompts, left-padded, followed by one shared right-padded completion.

Every view of an example (student, teacher, auxiliary contexts) scores the *same* completion tokens;
only the prompt differs. Left padding keeps the completion aligned at the same columns in every row.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase


Prompt = str | Sequence[Mapping[str, Any]]  # one user turn, or a list of {"role", "content", ...} messages

END_MARKER = "unisd-end-of-turn-probe"


class RenderError(ValueError):
    """The tokenizer's chat template refuses a conversation, or would drop part of it (tool calls)."""


def render(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """Token ids of the prompt's turns plus the assistant header.

    A string is one user turn; a list of messages carries a system prompt, earlier turns and tool turns.
    Without a chat template, one user turn is its raw text (as lm-eval prompts a base model) and several
    turns are written `Role:` by role, so that a system prompt or an earlier answer is not mistaken for the
    question.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if tokenizer.chat_template:
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                 **getattr(tokenizer, TEMPLATE_KWARGS, {}))
        except (TemplateError, TypeError) as e:  # Gemma: no system turn; Mistral: turns must alternate
            raise RenderError(f"the chat template refuses this conversation ({str(e).strip() or type(e).__name__})") from None
        _check_tools_rendered(text, messages)
    else:
        text = _plain(messages)
    return tokenizer(text, add_special_tokens=not tokenizer.chat_template)["input_ids"]


TEMPLATE_KWARGS = "unisd_template_kwargs"  # a tokenizer attribute: the chat template's variables for `render`


def with_template_kwargs(tokenizer: PreTrainedTokenizerBase, kwargs: Mapping[str, Any]) -> PreTrainedTokenizerBase:
    """The tokenizer whose chat template `render` fills with these variables too (e.g. enable_thinking=False): a
    shallow copy, so the student's and the teacher's prompts can differ while sharing one vocabulary."""
    if not kwargs:
        return tokenizer
    found = copy.copy(tokenizer)
    setattr(found, TEMPLATE_KWARGS, dict(kwargs))
    return found


def _plain(messages: Sequence[Mapping[str, Any]]) -> str:
    """Turns as `Role:` blocks ending with the assistant's header; a lone user turn stays raw text."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return str(messages[0]["content"])
    blocks = []
    for m in messages:
        calls = [json.dumps(c.get("function", c), ensure_ascii=False) for c in m.get("tool_calls") or []]
        body = "\n".join(filter(None, [str(m["content"]), *calls]))
        blocks.append(f"{str(m['role']).capitalize()}:\n{body}")
    return "\n\n".join([*blocks, "Assistant:\n"])


def _check_tools_rendered(text: str, messages: Sequence[Mapping[str, Any]]) -> None:
    """A template that does not know tools leaves tool calls out silently: refuse rather than train without them."""
    for m in messages:
        shown = [c.get("function", c).get("name", "") for c in m.get("tool_calls") or []]
        if m["role"] == "tool":
            shown.append(m["content"])
        if any(part not in text for part in shown):
            raise RenderError("the chat template does not render tool calls or tool results (it drops them); "
                              "use a model whose chat template supports tools, or leave tool turns out of the data")


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that closes an assistant turn in the chat template (Qwen2.5 base: <|im_end|>, while its EOS is
    <|endoftext|>); the EOS when there is no template or the template ends turns with ordinary text."""
    eos = int(tokenizer.eos_token_id)
    if not tokenizer.chat_template:
        return eos
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": END_MARKER}]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False)
    except (TemplateError, TypeError):
        return eos
    tail = text.partition(END_MARKER)[2]
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return int(ids[0]) if ids and ids[0] in special else eos


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
