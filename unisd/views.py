"""The no-grad views' hidden states: identical rows scored once, the others run in groups of similar length.

Every view of an example scores the same completion under another prompt, and the views' prompts differ
in length (an agreement context shows a solved example before the question). Stacked into one batch,
each row is padded to the longest prompt of all views; rows that are the same prompt (an example with
no negative or no context falls back to the teacher or student prompt) are computed again. Sorting the
rows by length and running them in groups keeps the padding small, and a repeated row is run once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from unisd.sequences import pack

SLACK = 0.1  # a row joins a group while padding it to the group's width wastes at most this share of the row


@dataclass(frozen=True)
class Plan:
    """Which rows run, in which forward: `groups` of row indices, and for every row the row it copies."""

    groups: list[list[int]]
    source: list[int]


def one_batch(rows: int, size: int | None = None) -> Plan:
    """Every row in forwards of at most `size` rows (all at once by default), in order, none shared: under FSDP
    every rank must run the same forwards, and every rank has as many rows."""
    size = size or rows
    return Plan([list(range(start, min(start + size, rows))) for start in range(0, rows, size)], list(range(rows)))


def by_length(prompts: list[list[int]], completions: int, width: int, slack: float = SLACK,
              size: int | None = None) -> Plan:
    """Row r scores completion r % `completions` (of `width` columns) after prompts[r].

    A row equal to an earlier one (same prompt, same completion) copies it; the others, longest first,
    fill a group while their prompt + completion is at least (1 - slack) of the group's first row's and the
    group holds fewer than `size` rows (no bound by default): a forward's activations then never exceed
    those of `size` rows, however many views the plugins add.
    """
    first: dict[tuple[int, tuple[int, ...]], int] = {}
    source = [first.setdefault((r % completions, tuple(p)), r) for r, p in enumerate(prompts)]
    distinct = sorted(set(source), key=lambda r: (-len(prompts[r]), r))
    groups: list[list[int]] = []
    for r in distinct:
        if (groups and len(groups[-1]) < (size or len(prompts))
                and len(prompts[r]) + width >= (1.0 - slack) * (len(prompts[groups[-1][0]]) + width)):
            groups[-1].append(r)
        else:
            groups.append([r])
    return Plan(groups, source)


def hidden(encode: Callable[..., torch.Tensor], prompts: list[list[int]], tokens: torch.Tensor,
           mask: torch.Tensor, pad_id: int, plan: Plan) -> torch.Tensor:
    """Final hidden states [R, T, H] at the positions that predict each completion token, row r scoring
    completion r % B of tokens [B, T] (mask [B, T]) after prompts[r]; the forwards are the plan's groups."""
    B, T = tokens.shape
    parts: dict[int, torch.Tensor] = {}
    for group in plan.groups:
        rows = [r % B for r in group]
        packed = pack([prompts[r] for r in group], tokens[rows], mask[rows], pad_id)
        device = tokens.device
        h = encode(input_ids=packed.ids.to(device), attention_mask=packed.attention.to(device),
                   position_ids=packed.positions.to(device))[:, packed.start - 1: packed.start - 1 + T]
        parts.update(zip(group, h))
    return torch.stack([parts[s] for s in plan.source])
