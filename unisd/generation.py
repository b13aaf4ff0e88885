"""Seeded generation with the model itself, and a content-keyed cache for what it builds.

Plugins that prepare data at setup (agree's induced instructions and retrieval, contrast's negatives)
generate here and cache the result under `unisd.models.cache_dir()` / "plugins" by a sha256 of the data
content, the model (spec and a weight fingerprint) and the settings, never by a loose path.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from unisd import distributed, models
from unisd.data import Example
from unisd.rollout import sample
from unisd.sequences import render


# ------------------------------------------------------------------------------------------------
# Content hashes and the cache
# ------------------------------------------------------------------------------------------------

def content_hash(value: Any) -> str:
    """sha256 of a JSON rendering (sorted keys) of any plain value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def data_digest(examples: Sequence[Example]) -> str:
    """Hash of every example's prompt, answer, rationale and meta, in order."""
    return content_hash([[e.prompt, e.answer, e.rationale, dict(e.meta)] for e in examples])


@torch.no_grad()
def model_digest(model: torch.nn.Module) -> str:
    """Hash of the weights the model computes with (per-tensor sums and norms: cheap, order-sensitive)."""
    stats = []
    for name, w in sorted(models.effective_weights(model).items()):
        w = w.float()
        stats.append([name, list(w.shape), round(float(w.sum()), 4), round(float(w.norm()), 4)])
    return content_hash(stats)


def cached(kind: str, key: Any, build: Callable[[], Any]) -> Any:
    """`build()`'s JSON-able result, stored at cache_dir()/plugins/<kind>/<sha256(key)>.json (atomic write).

    Under torchrun, rank 0 alone looks it up or builds it and every rank receives the same value.
    """
    return distributed.once(lambda: _cached(kind, key, build))


def _cached(kind: str, key: Any, build: Callable[[], Any]) -> Any:
    path = models.cache_dir() / "plugins" / kind / f"{content_hash(key)}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))["value"]
        except (json.JSONDecodeError, KeyError, OSError):
            pass  # a damaged entry is rebuilt
    value = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"key": key, "value": value}, f, default=str)
    os.replace(tmp, path)
    return value


# ------------------------------------------------------------------------------------------------
# Seeded generation with the model itself
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def generate(model: Any, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
             max_new_tokens: int, seed: int, temperature: float = 0.7, batch_size: int = 16,
             engine: Any = None, desc: str = "generating") -> list[tuple[str, bool]]:
    """(reply, finished) per prompt, batched, with a progress bar; `finished` is False when the reply hit
    max_new_tokens without an end of turn. Seeded through a forked RNG so global state is untouched.
    With a vLLM `engine` (`--rollout vllm`) the same draw runs there, with the model's current weights."""
    device = next(model.parameters()).device
    replies: list[tuple[str, bool]] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", disable=None, leave=False):
            rows = [render(tokenizer, p) for p in prompts[i:i + batch_size]]
            drawn = sample(model, tokenizer, rows, max_new_tokens, temperature, 1.0, engine=engine)
            replies.extend((tokenizer.decode(row, skip_special_tokens=True).strip(), not bool(cut))
                           for row, cut in zip(drawn.tokens, drawn.truncated))
    return replies
