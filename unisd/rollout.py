"""Sampling one completion per prompt, with transformers `generate` (KV cache) or the vLLM engine.

`unisd.policy.Policy.sample` chooses what samples (the model, its bf16 copy, its shards, the engine) and gives
it the current weights; this module draws from it and returns the same `Rollout` whichever it was.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from unisd.sequences import completion_mask, end_of_turn_id, left_pad

if TYPE_CHECKING:
    from unisd.engine import Engine


@dataclass(frozen=True)
class Rollout:
    tokens: torch.Tensor     # [B, T] sampled ids, right-padded
    mask: torch.Tensor       # [B, T] 1.0 on real completion tokens (through the first EOS)
    truncated: torch.Tensor  # [B] no EOS within max_new_tokens


def eos_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every id that ends a turn: the tokenizer's EOS, the chat template's end of turn and the generation
    config's (chat models often differ; a base model's config may not list the end of turn its template writes)."""
    ids = {tokenizer.eos_token_id, end_of_turn_id(tokenizer)}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


def _transformers_model(model: Any) -> Any:
    """The transformers model that owns `generation_config`, under a peft wrapper or a sharded root."""
    from unisd import models

    if not isinstance(model, PreTrainedModel) and not models.is_peft(model):
        model = model.model  # a sharded root (unisd.policy.HiddenStates) holds the model it samples with
    return models.base_model(model)


@contextlib.contextmanager
def only_the_given_settings(model: Any) -> Iterator[None]:
    """For the call, the model's generation config is blank: `generate` fills every setting it is not given
    from the model's generation_config.json (Qwen2.5-Instruct ships repetition_penalty 1.05), so without this
    the samples would follow options no flag of the run names, and vLLM (which ignores that file) would differ."""
    owner = _transformers_model(model)
    saved = owner.generation_config
    owner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        owner.generation_config = saved


#: generation_config.json entries that name tokens or the file itself, not how to sample
NOT_SAMPLING = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "transformers_version",
                "_from_model_config")


def ignored_settings(model: Any) -> dict[str, Any]:
    """The options a model's generation_config.json sets beyond what its config.json implies, all of which
    `sample` ignores (the run's flags decide)."""
    owner = _transformers_model(model)
    implied = GenerationConfig.from_model_config(owner.config).to_dict()
    stored = owner.generation_config.to_diff_dict()
    return {k: v for k, v in stored.items() if k not in NOT_SAMPLING and implied.get(k) != v}


@torch.no_grad()
def sample(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]],
           max_new_tokens: int, temperature: float, top_p: float, min_new_tokens: int = 0, top_k: int = 0,
           stops: set[int] | None = None, bf16: bool = False) -> Rollout:
    """Sample from the model as it is now; dropout is off while sampling and restored afterwards.

    `top_k` keeps only the k most likely tokens at each step (0: no top-k truncation); `min_new_tokens`
    suppresses EOS before that many tokens (benchmarks use it to fix the length); `bf16` computes under bf16
    autocast. A model sharded with FSDP gathers each layer's weights at every decoding step, so every rank
    keeps decoding until all ranks are done (`synced_gpus`), and no inference tensors are made (they would
    live on as weights).
    """
    from unisd import distributed

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids, attn = left_pad(prompts, tokenizer.pad_token_id)
    stops = eos_ids(model, tokenizer) if stops is None else stops
    extra = {"min_new_tokens": min_new_tokens} if min_new_tokens else {}
    sharded = distributed.is_sharded(model)
    if sharded:
        extra["synced_gpus"] = True
    try:
        with torch.no_grad() if sharded else torch.inference_mode(), only_the_given_settings(model), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=True,
                                 temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                                 eos_token_id=sorted(stops), pad_token_id=tokenizer.pad_token_id, **extra)
    finally:
        model.train(was_training)
    out = out.clone()  # an ordinary tensor, not an inference tensor
    tokens = out[:, ids.shape[1]:]
    mask, truncated = completion_mask(tokens, set(stops))
    width = max(int(mask.sum(-1).max().item()), 1)
    tokens, mask = tokens[:, :width], mask[:, :width]
    return Rollout(tokens.masked_fill(mask == 0, tokenizer.pad_token_id), mask, truncated)


def sample_with(engine: Engine, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]], max_new_tokens: int,
                temperature: float, top_p: float, stops: set[int], min_new_tokens: int = 0, top_k: int = 0) -> Rollout:
    """`sample` through the vLLM engine, with the weights it last loaded: one seeded request per prompt.

    The seeds are drawn from torch's global generator, so a seeded or resumed run samples the same completions.
    """
    seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
    rows = engine.generate(prompts, max_new_tokens, temperature, top_p, stops, seeds, min_new_tokens, top_k)
    return _padded(rows, torch.tensor([not r or r[-1] not in stops for r in rows]), tokenizer.pad_token_id)


def _padded(rows: list[list[int]], truncated: torch.Tensor, pad_id: int) -> Rollout:
    """Completion rows (each through its EOS, if any) as a right-padded Rollout."""
    width = max(max(len(r) for r in rows), 1)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width))
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1.0
    return Rollout(tokens, mask, truncated)


def from_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_new_tokens: int) -> Rollout:
    """Completions given as text (e.g. gold demonstrations), each ended as the chat template ends an assistant turn
    (`end_of_turn_id`), so that a gold answer teaches the end the student writes; longer ones are cut and marked
    truncated."""
    end = end_of_turn_id(tokenizer)
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] + [end] for t in texts]
    truncated = torch.tensor([len(r) > max_new_tokens for r in rows])
    return _padded([r[:max_new_tokens] for r in rows], truncated, tokenizer.pad_token_id)
