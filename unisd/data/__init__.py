"""Training data: a benchmark, a Hub dataset or a local data file yields `Example`s; the trainer only sees those.

`Example` lives in `unisd.data.examples`, the file and Hub readers in `unisd.data.files`, the row formats in
`unisd.data.formats`; `load_data` picks the source for a --data spec.
"""
from __future__ import annotations

from pathlib import Path

from unisd.data.examples import DataError, Example
from unisd.data.files import BUILDERS, load_file, load_hub

__all__ = ["DataError", "Example", "load_data", "load_file", "load_hub", "load_jsonl"]

load_jsonl = load_file  # the name earlier releases exported


def load_data(spec: str, split: str = "train", config: str = "", columns: str = "") -> list[Example]:
    """`spec` is a data file, a benchmark name (see `unisd.data.benchmarks`) or a Hub dataset id `org/name`.

    `config` and `split` choose a Hub dataset's part (a benchmark takes `split` alone); `columns` renames a
    file's or Hub dataset's columns (`new=old,...`) before its format is detected.
    """
    from unisd.data import benchmarks

    if Path(spec).suffix.lower() in BUILDERS or Path(spec).exists():
        return load_file(spec, columns)
    if spec in benchmarks.NAMES or "/" not in spec:
        return benchmarks.load(spec, split)
    return load_hub(spec, config, split, columns)
