"""agree's auxiliary contexts: solved *other* examples shown as references, or an instruction the model
induced; donors picked at random or by retrieval. Generation and caching are `unisd.generation`'s."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import numpy as np

from unisd.data import Example
from unisd.data.prompts import demonstration
from unisd.data.scoring import LETTERS

REFERENCE_HEADER = (
    "## Reference Samples (DO NOT SOLVE THESE)\n"
    "The solved sample below only shows how tasks like this one are answered. It is NOT the task.\n\n"
)
TASK_HEADER = "-----\n## Task to Solve (ONLY ANSWER THIS TASK)\n"
INSTRUCTION_HEADER = "## General Instruction for Your Answer\n"


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


def same_task(example: Example, donor: Example) -> bool:
    """A donor that repeats the example (same prompt after the same turns): its solved answer is this task's."""
    return donor.prompt == example.prompt and list(map(dict, donor.context)) == list(map(dict, example.context))


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
        order = [int(j) + int(j >= i) for j in picks]   # skip i itself
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
        for r in range(sim.shape[0]):  # most similar first, ties by position; never the example itself
            order = [int(j) for j in np.argsort(-sim[r], kind="stable")[:k + 1] if j != start + r][:k]
            out.append([order[q % len(order)] for q in range(k)])
    return out


def induction_prompt(demos: Sequence[Example]) -> str:
    """Meta-prompt asking the model for one general instruction induced from a few solved examples."""
    blocks = "\n\n".join(f"### Example {i + 1}\n{e.prompt}\n\nSolved answer:\n{demonstration(e)}"
                         for i, e in enumerate(demos))
    return (f"Here are solved examples of a task.\n\n{blocks}\n\n"
            "Write ONE concise, high-level instruction (3-4 sentences) that would help someone solve new tasks "
            "of this kind. Do NOT mention example-specific details. Reply with the instruction only.")
