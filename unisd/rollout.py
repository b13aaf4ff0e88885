"""On-policy rollout: the student samples one completion per prompt (transformers `generate`, KV cache)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from unisd.sequences import completion_mask, left_pad


@dataclass(frozen=True)
class Rollout:
    tokens: torch.Tensor     # [B, T] sampled ids, right-padded
    mask: torch.Tensor       # [B, T] 1.0 on real completion tokens (through the first EOS)
    truncated: torch.Tensor  # [B] no EOS within max_new_tokens


def eos_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every id that ends a turn: the tokenizer's EOS and the generation config's (chat models often differ)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


@torch.no_grad()
def sample(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]],
           max_new_tokens: int, temperature: float, top_p: float) -> Rollout:
    """Sample from the model as it is now; dropout is off while sampling and restored afterwards."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids, attn = left_pad(prompts, tokenizer.pad_token_id)
    stops = sorted(eos_ids(model, tokenizer))
    out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=True,
                         temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
                         eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    model.train(was_training)
    tokens = out[:, ids.shape[1]:]
    mask, truncated = completion_mask(tokens, set(stops))
    width = max(int(mask.sum(-1).max().item()), 1)
    tokens, mask = tokens[:, :width], mask[:, :width]
    return Rollout(tokens.masked_fill(mask == 0, tokenizer.pad_token_id), mask, truncated)


def from_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_new_tokens: int) -> Rollout:
    """Completions given as text (e.g. gold demonstrations), ended by EOS; longer ones are cut and marked truncated."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    truncated = torch.tensor([len(r) > max_new_tokens for r in rows])
    rows = [r[:max_new_tokens] for r in rows]
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width))
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1.0
    return Rollout(tokens, mask, truncated)
