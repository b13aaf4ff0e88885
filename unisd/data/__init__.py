"""Training data: a benchmark adapter or a user's JSONL file yields `Example`s; the trainer only sees those.

`Example` and the JSONL reader live in `unisd.data.examples`; `load_data` picks the source for a --data spec.
"""
from __future__ import annotations

from pathlib import Path

from unisd.data.examples import DataError, Example, load_jsonl

__all__ = ["DataError", "Example", "load_data", "load_jsonl"]


def load_data(spec: str, split: str = "train") -> list[Example]:
    """`spec` is a benchmark name (see `unisd.data.benchmarks`) or a path to a JSONL file."""
    if spec.endswith(".jsonl") or Path(spec).exists():
        return load_jsonl(spec)
    from unisd.data import benchmarks

    return benchmarks.load(spec, split)
