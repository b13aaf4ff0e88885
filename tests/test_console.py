"""A clean console: a normal `unisd train` prints no warnings, and help texts render as written."""
from __future__ import annotations

import os
import subprocess
import sys

from click.testing import CliRunner

from unisd.cli import main


def test_a_short_train_run_prints_no_warning(tmp_path, tiny_model, tiny_data):
    run = subprocess.run([sys.executable, "-m", "unisd", "train", "--model", str(tiny_model), "--data", str(tiny_data),
                          "--out", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "2",
                          "--max-new-tokens", "4"], capture_output=True, text=True, env=dict(os.environ))
    assert run.returncode == 0, run.stderr
    assert [line for line in run.stderr.splitlines() if "warning" in line.lower()] == []
    assert run.stdout == f"model written to {tmp_path / 'run'}\n"


def test_help_texts_render_percent_signs_as_written():
    for command in main.commands:
        text = CliRunner().invoke(main, [command, "--help"]).output
        assert "%%" not in text, command
    assert "10% warmup" in CliRunner().invoke(main, ["train", "--help"]).output
