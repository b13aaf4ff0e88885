"""Feature matching (UniSD paper §2.2, Eq. 6): pull the student's final hidden states to the teacher's.

    unisd train ... --plugins match -o match.weight=0.1 -o match.mode=joint

L_feat = weight · mean_b [ Σ_t m_t (1/H)‖h^S_t − sg(h^T_t)‖² / Σ_t m_t ], on the final (post-norm)
hidden states at the completion positions: student under the student prompt, primary teacher under
the gold-demonstration prompt (detached). `mode=joint` adds it to the distillation loss; `mode=repr`
trains on it alone: it declares the objective `--divergence none`, so the divergence gets no gradient
(the official repr mode also drops the contrastive term; here other plugins' auxiliary terms still count).
Same as the official code otherwise (MSE averaged over the hidden dimension, last layer only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from unisd import losses
from unisd.api import Outputs, Plugin


def feature_mse(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Per-token MSE [B, T] over the hidden dimension of [B, T, H] states; the teacher side is detached."""
    return (student_hidden.float() - teacher_hidden.detach().float()).pow(2).mean(-1)


class Match(Plugin):
    __doc__ = __doc__
    forwards = 0.0  # no view of its own

    @dataclass(frozen=True)
    class Config:
        weight: float = 0.1                        # λ_f (official match_* runs: 0.1; UniSD*: 0.01)
        mode: Literal["joint", "repr"] = "joint"   # joint: KL + L_feat; repr: L_feat only

        def __post_init__(self) -> None:
            if self.weight < 0:
                raise ValueError(f"match.weight must be >= 0, got {self.weight}")
            if self.mode not in ("joint", "repr"):
                raise ValueError(f"match.mode must be joint or repr, got {self.mode!r}")

    config: Config

    @property
    def objective(self) -> str | None:  # type: ignore[override]
        """repr trains on L_feat alone: it stands for --divergence none (joint keeps the user's objective)."""
        return "none" if self.config.mode == "repr" else None

    def aux_losses(self, out: Outputs) -> dict[str, torch.Tensor]:
        mse = feature_mse(out.hidden["student"], out.hidden["teacher"])
        return {self.name or "match": self.config.weight * losses.weighted_mean(mse, out.mask)}
