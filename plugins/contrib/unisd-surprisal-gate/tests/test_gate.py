"""The gate's own test: run with `pytest plugins/contrib/unisd-surprisal-gate` (unisd installed)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unisd.plugin import PluginError, configure  # noqa: E402
from unisd_surprisal_gate import SurprisalGate, surprisal_gate  # noqa: E402


def test_keeps_the_most_surprising_tokens() -> None:
    logps = torch.tensor([[-0.1, -3.0, -0.5, -9.0], [-2.0, -0.2, -7.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    w = surprisal_gate(logps, mask, keep=3 / 7)
    # masked surprisals: 0.1 3 0.5 | 2 0.2 7 1 -> the top 3 are 7, 3, 2
    assert w[mask.bool()].tolist() == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert surprisal_gate(logps, mask, keep=1.0)[mask.bool()].eq(1).all()


def test_keep_is_checked() -> None:
    with pytest.raises(PluginError, match="gate.keep"):
        configure(SurprisalGate, {"keep": "0"}, "gate")
