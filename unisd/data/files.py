"""Users' datasets: a local .jsonl/.json/.parquet/.csv file or a Hub dataset id, read by `datasets.load_dataset`.

The packaged json/parquet/csv builders read local files offline too; what they cannot read becomes one
DataError naming the file (and, for JSON lines, the line). Row formats: `unisd.data.formats`.
"""
from __future__ import annotations

import csv
import json
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from unisd.data.examples import DataError, Example
from unisd.data.formats import parse_columns, to_examples

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _renamed(dataset: Any, columns: str, source: str) -> Any:
    try:
        mapping = parse_columns(columns)
    except ValueError as e:
        raise DataError(str(e)) from None
    for old in mapping:
        if old not in dataset.column_names:
            raise DataError(f"--columns: {source} has no column {old!r} (columns: {', '.join(dataset.column_names)})")
    return dataset.rename_columns(mapping) if mapping else dataset


def _json_problem(path: Path, text: str) -> str | None:
    """Why a JSON Lines file does not parse, by line, or None when every line is a JSON object."""
    lines = text.split("\n")  # not splitlines: U+2028 may sit inside a string
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return f"{path}:{lineno}: not valid JSON ({e.msg})"
        if not isinstance(row, dict):
            return f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}"
    return None


def load_file(path: str | Path, columns: str = "") -> list[Example]:
    """Read a local dataset file (format from the suffix, rows from the columns) into Examples."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder; --data takes a data file, a Hub dataset id or a benchmark name")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unknown file type; --data takes a {', '.join(BUILDERS)} file")
    if builder != "parquet":  # text files are checked in one read: UTF-8, not empty, JSON Lines line by line
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        except OSError as e:
            raise DataError(f"{path}: cannot read it ({e.strerror})") from None
        if not text.strip():
            raise DataError(f"{path}: no examples (the file is empty)")
        if path.suffix.lower() == ".jsonl" and (problem := _json_problem(path, text)):
            raise DataError(problem)
    import datasets

    options: dict[str, Any] = {"encoding": "utf-8-sig"} if builder != "parquet" else {}  # a BOM is dropped
    if builder == "csv":  # cells stay text: pandas would read an answer "007" as the number 7
        with path.open(encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f), [])
        options["features"] = datasets.Features({name: datasets.Value("string") for name in header})
    with tempfile.TemporaryDirectory(prefix="unisd-data-") as cache:  # nothing cached beside the user's files
        try:
            with _quiet(datasets):
                dataset = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache, **options)
        except Exception as e:  # arrow / pandas parse errors: one line naming the file
            cause = str(e.__cause__ or e).strip().splitlines()
            raise DataError(f"{path}: cannot read it as {path.suffix[1:]} ({cause[0] if cause else type(e).__name__})") from None
        dataset = _renamed(dataset, columns, str(path))
        return to_examples(list(dataset), dataset.column_names, str(path))


def load_hub(dataset_id: str, config: str = "", split: str = "train", columns: str = "") -> list[Example]:
    """Download (or read from the cache) one split of a Hub dataset and read its rows into Examples."""
    import datasets

    try:
        with _quiet(datasets):
            dataset = datasets.load_dataset(dataset_id, config or None, split=split)
    except Exception as e:  # network, gating, unknown config or split: one clear line
        cause = str(e).strip().splitlines()
        raise DataError(f"cannot load the Hub dataset {dataset_id!r}"
                        f"{f' (config {config!r})' if config else ''}, split {split!r}: "
                        f"{cause[0] if cause else type(e).__name__}") from None
    source = f"{dataset_id}[{split}]"
    dataset = _renamed(dataset, columns, source)
    return to_examples(list(dataset), dataset.column_names, source)


@contextmanager
def _quiet(datasets: Any) -> Iterator[None]:
    """No progress bars while datasets builds a split (the trainer prints its own progress)."""
    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()
