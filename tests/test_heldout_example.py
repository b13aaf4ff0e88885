"""The documented example task over one's own held-out rows (docs/examples/heldout) runs through `unisd eval`."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from click.testing import CliRunner

from unisd.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "heldout"


def _utils():
    spec = importlib.util.spec_from_file_location("heldout_utils", EXAMPLE / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_reads_the_rows_as_training_does_and_scores_the_last_line():
    utils = _utils()
    test = utils.load()["test"]
    assert test["answer"] == ["Paris", "36", "Mars"] and test["prompt"][1].startswith("What is 12 times 3?")
    doc = {"answer": "36"}
    assert utils.process_results(doc, ["12 x 3 = 36.\nAnswer: 36"]) == {"acc": 1.0}
    assert utils.process_results(doc, ["Answer: 360"]) == {"acc": 0.0}          # a word, not a substring
    assert utils.process_results(doc, ["Answer: 36\nNo, Answer: 35\n"]) == {"acc": 0.0}    # the last line decides


def test_unisd_eval_scores_the_example_task_through_include_path(tiny_model, tmp_path):
    result = CliRunner().invoke(main, ["eval", "--model", f"tiny={tiny_model}", "--include-path", str(EXAMPLE),
                                       "--tasks", "heldout", "--max-gen-toks", "4", "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert "heldout" in results["scores"]["tiny"] and len(results["items"]["tiny"]["heldout"]) == 3
