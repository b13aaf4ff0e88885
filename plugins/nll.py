"""`nll`: cross-entropy on the completion tokens instead of the divergence to the teacher.

token_loss returns -log p_student(y_t) (temperature 1), so the step becomes supervised fine-tuning
on whatever completions the micro-batch holds: gold demonstrations (SFT) or base-model samples (SSD).
"""
from __future__ import annotations

from typing import Any

import torch

from unisd.plugin import Plugin


class NLL(Plugin):
    def token_loss(self, D: torch.Tensor, out: Any) -> torch.Tensor:
        return -out.logps["student"]
