"""Rows and scorer of the `heldout` example task: replace heldout.jsonl with your own held-out rows.

The rows are read as `unisd train --data` reads a file (prompt/answer or prompt/completion rows with a
text prompt), so the model is asked exactly what it was trained on. A reply counts as right when its last
line contains the gold answer as a word (case-insensitive): change `process_results` for another rule.
"""
import re
from pathlib import Path

import datasets

from unisd.data import load_data

ROWS = Path(__file__).with_name("heldout.jsonl")


def load(**kwargs):
    """custom_dataset hook: {"test": Dataset} of the rows' prompts and gold answers."""
    examples = load_data(str(ROWS))
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict(
        {"prompt": [e.prompt for e in examples], "answer": [e.answer for e in examples]})})


def process_results(doc, results):
    """acc: 1.0 when the reply's last non-empty line names the gold answer as a word."""
    lines = [line for line in results[0].strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return {"acc": float(re.search(rf"(?<!\w){re.escape(doc['answer'].strip())}(?!\w)", last, re.IGNORECASE) is not None)}
