"""Shared helpers of the built-in plugins: content-hash caches, seeded generation, auxiliary contexts.

`agree` builds its K auxiliary contexts here (solved *other* examples shown as references, or an
instruction the model induced), and `contrast` generates its negatives with `generate`. Everything that
is costly to build is cached under `unisd.models.cache_dir()` / "plugins" by a sha256 of the data
content, the model (spec and a weight fingerprint) and the settings, never by a loose path.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from unisd import distributed, models
from unisd.data import Example
from unisd.data.prompts import demonstration
from unisd.data.scoring import LETTERS
from unisd.rollout import eos_ids, sample
from unisd.sequences import completion_mask, left_pad, render

REFERENCE_HEADER = (
    "## Reference Samples (DO NOT SOLVE THESE)\n"
    "The solved sample below only shows how tasks like this one are answered. It is NOT the task.\n\n"
)
TASK_HEADER = "-----\n## Task to Solve (ONLY ANSWER THIS TASK)\n"
INSTRUCTION_HEADER = "## General Instruction for Your Answer\n"


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
def generate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
             max_new_tokens: int, seed: int, temperature: float = 0.7, batch_size: int = 8,
             engine: Any = None) -> list[tuple[str, bool]]:
    """(reply, finished) per prompt, batched; `finished` is False when the reply hit max_new_tokens without
    an end of turn. Seeded through a forked RNG so global state is untouched. With a vLLM `engine`
    (`--rollout vllm`) the same draw runs there, with the model's current weights."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stops = sorted(eos_ids(models.base_model(model), tokenizer))
    replies: list[tuple[str, bool]] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in range(0, len(prompts), batch_size):
            rows = [render(tokenizer, p) for p in prompts[i:i + batch_size]]
            if engine is not None:
                drawn = sample(model, tokenizer, rows, max_new_tokens, temperature, 1.0, engine=engine)
                completions, truncated = drawn.tokens, drawn.truncated
            else:
                ids, attn = left_pad(rows, tokenizer.pad_token_id)
                out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=True,
                                     temperature=temperature, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
                                     eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
                completions = out[:, ids.shape[1]:]
                _, truncated = completion_mask(completions, set(stops))
            replies.extend((tokenizer.decode(row, skip_special_tokens=True).strip(), not bool(cut))
                           for row, cut in zip(completions, truncated))
    model.train(was_training)
    return replies


# ------------------------------------------------------------------------------------------------
# Auxiliary contexts (agree)
# ------------------------------------------------------------------------------------------------

def donor_task(donor: Example) -> str:
    """A solved example's task in compact form: its question and options, or its instruction.

    As in the official context builders: multiple choice shows the question and options, tool use the
    user instruction without the API documentation; other data shows its (short) prompt.
    """
    meta = donor.meta
    if "instruction" in meta:
        return str(meta["instruction"]).strip()
    if "question" in meta and meta.get("options"):
        options = "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, meta["options"]))
        return f"Question: {meta['question']}\nOptions:\n{options}"
    return donor.prompt.strip()


def reference_context(example: Example, donor: Example) -> str:
    """The student prompt preceded by one solved *other* example, compact (never the current gold answer)."""
    return (f"{REFERENCE_HEADER}### [REFERENCE ONLY]\n{donor_task(donor)}\n\nSolved answer:\n{demonstration(donor)}\n\n"
            f"{TASK_HEADER}{example.prompt}")


def instruction_context(example: Example, instruction: str) -> str:
    """The student prompt preceded by a general instruction the model induced from solved examples."""
    return f"{INSTRUCTION_HEADER}{instruction.strip()}\n\n{example.prompt}"


def pick_fitting(contexts: Iterable[str], k: int, fits: Callable[[str], bool]) -> list[str]:
    """The first k contexts that fit, in the given order (cycled when fewer fit); [] when none does.

    `contexts` may be lazy, so a context past the k-th fitting one is never built.
    """
    found: list[str] = []
    for text in contexts:
        if fits(text):
            found.append(text)
            if len(found) == k:
                break
    return [found[r % len(found)] for r in range(k)] if found else []


def random_donors(n: int, k: int, seed: int) -> list[list[int]]:
    """For each example, k distinct other examples (cycled when fewer than k others exist), seeded."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        picks = rng.choice(n - 1, size=min(k, n - 1), replace=False)
        order = [int(j) + (j >= i) for j in picks]   # skip i itself
        out.append([order[r % len(order)] for r in range(k)])
    return out


def retrieval_donors(texts: Sequence[str], k: int, backend: str = "tfidf", block: int = 1024) -> list[list[int]]:
    """For each text, its k nearest *other* texts by cosine similarity (TF-IDF offline, or MiniLM)."""
    if backend == "tfidf":
        from sklearn.feature_extraction.text import TfidfVectorizer

        vectors: Any = TfidfVectorizer(sublinear_tf=True, token_pattern=r"(?u)\b\w+\b").fit_transform(texts)
    else:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise RuntimeError("agree.retriever=minilm needs sentence-transformers: pip install 'unisd[retrieval]'") from None
        vectors = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2").encode(
            list(texts), normalize_embeddings=True)
    n = len(texts)
    out: list[list[int]] = []
    for start in range(0, n, block):
        sim = vectors[start:start + block] @ vectors.T
        sim = np.asarray(sim.toarray() if hasattr(sim, "toarray") else sim, dtype=np.float64)
        top = min(k + 1, n)
        for r in range(sim.shape[0]):
            sim[r, start + r] = -np.inf  # never the example itself
            best = np.argpartition(-sim[r], top - 1)[:top]
            order = [int(j) for j in best[np.lexsort((best, -sim[r][best]))] if j != start + r]
            out.append([order[q % len(order)] for q in range(k)])
    return out


def induction_prompt(demos: Sequence[Example]) -> str:
    """Meta-prompt asking the model for one general instruction induced from a few solved examples."""
    blocks = "\n\n".join(f"### Example {i + 1}\n{e.prompt}\n\nSolved answer:\n{demonstration(e)}"
                         for i, e in enumerate(demos))
    return (f"Here are solved examples of a task.\n\n{blocks}\n\n"
            "Write ONE concise, high-level instruction (3-4 sentences) that would help someone solve new tasks "
            "of this kind. Do NOT mention example-specific details. Reply with the instruction only.")
