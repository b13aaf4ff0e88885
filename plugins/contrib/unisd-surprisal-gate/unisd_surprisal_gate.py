"""An example third-party unisd plugin: distil only the tokens the student is most uncertain about.

    pip install ./plugins/contrib/unisd-surprisal-gate && unisd train ... --plugins gate -o gate.keep=0.5

Surprisal s_t = −log p_θ(ŷ_t | x, ŷ_<t) of the student's own sampled token (no gradient through it);
tokens at or above the (1 − keep)-quantile of s over the batch's completion tokens get weight 1, the
others 0. Registered under the entry-point group `unisd.plugins`, exactly as the built-ins are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from unisd.plugin import Plugin


def surprisal_gate(student_logps: torch.Tensor, mask: torch.Tensor, keep: float) -> torch.Tensor:
    """0/1 weights [B, T]: 1 on the `keep` fraction of masked tokens with the highest −log p."""
    surprisal = -student_logps.detach()
    valid = mask.bool()
    if not valid.any():
        return torch.ones_like(surprisal)
    threshold = torch.quantile(surprisal[valid].float(), 1.0 - keep)
    return (surprisal >= threshold).to(surprisal.dtype)


class SurprisalGate(Plugin):
    """Keep only the most surprising tokens in the distillation loss."""

    @dataclass(frozen=True)
    class Config:
        keep: float = 0.5   # fraction of completion tokens kept

        def __post_init__(self) -> None:
            if not 0.0 < self.keep <= 1.0:
                raise ValueError(f"gate.keep must be in (0, 1], got {self.keep}")

    def weights(self, out: Any) -> torch.Tensor:
        w = surprisal_gate(out.logps["student"], out.mask, self.config.keep)
        out.metrics[f"{self.name}/kept"] = float((w * out.mask).sum() / out.mask.sum().clamp_min(1.0))
        return w
