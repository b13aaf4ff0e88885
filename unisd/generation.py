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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from tqdm.auto import tqdm
from unisd import distributed, models, progress
from unisd.data import Example
from unisd.sequences import Prompt, render

if TYPE_CHECKING:
    from unisd.policy import Policy


# ------------------------------------------------------------------------------------------------
# Content hashes and the cache
# ------------------------------------------------------------------------------------------------

def content_hash(value: Any) -> str:
    """sha256 of a JSON rendering (sorted keys) of any plain value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def data_digest(examples: Sequence[Example]) -> str:
    """Hash of every example's prompt, answer, rationale and meta, in order; and its turns before and after the
    prompt (system prompt, earlier turns, tool turns) when it has any, so a cache never serves another context."""
    return content_hash([[e.prompt, e.answer, e.rationale, dict(e.meta)]
                         + ([list(map(dict, e.context)), list(map(dict, e.after))] if e.context or e.after else [])
                         for e in examples])


@torch.no_grad()
def model_digest(policy: Policy) -> str:
    """Hash of the weights the student computes with (per-tensor sums and norms: cheap, order-sensitive)."""
    stats = []
    for name, w in policy.student.weights():
        w = w.float()
        stats.append([name, list(w.shape), round(float(w.sum()), 4), round(float(w.norm()), 4)])
    return content_hash(sorted(stats))


def cached(kind: str, key: Any, build: Callable[[], Any]) -> Any:
    """`build()`'s JSON-able result, stored at cache_dir()/plugins/<kind>/<sha256(key)>.json (atomic write).

    Under torchrun rank 0 looks it up; when it is missing every rank builds it (a sharded model generates on all
    ranks together), rank 0 stores its result and every rank returns rank 0's value.
    """
    path = models.cache_dir() / "plugins" / kind / f"{content_hash(key)}.json"
    found = distributed.once(lambda: _stored(path))
    if found is not None:
        return found[0]
    value = build()
    return distributed.once(lambda: _store(path, key, value))


def _stored(path: Path) -> tuple[Any] | None:
    """(value,) from the cache, or None when it is missing or damaged (then it is rebuilt)."""
    if path.is_file():
        try:
            return (json.loads(path.read_text(encoding="utf-8"))["value"],)
        except (json.JSONDecodeError, KeyError, OSError):
            pass
    return None


def _store(path: Path, key: Any, value: Any) -> Any:
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
def generate(policy: Policy, prompts: Sequence[Prompt], max_new_tokens: int, seed: int, temperature: float = 0.7,
             batch_size: int = 16, desc: str = "generating") -> list[tuple[str, bool]]:
    """(reply, finished) per prompt from the student as it is now, batched, with a progress bar; `finished` is
    False when the reply hit max_new_tokens without an end of turn. Seeded through a forked RNG so global state
    is untouched. Under torchrun every rank must call it (a sharded student samples on all ranks together)."""
    device, tokenizer = policy.world.device, policy.tokenizer
    replies: list[tuple[str, bool]] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            progress.phase(f"{desc}: {len(prompts)} prompts, up to {max_new_tokens} new tokens each"):
        torch.manual_seed(seed)
        for i in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", disable=None, leave=False):
            rows = [render(tokenizer, p) for p in prompts[i:i + batch_size]]
            drawn = policy.sample(rows, max_new_tokens, temperature, 1.0)
            replies.extend((tokenizer.decode(row, skip_special_tokens=True).strip(), not bool(cut))
                           for row, cut in zip(drawn.tokens, drawn.truncated))
    return replies
