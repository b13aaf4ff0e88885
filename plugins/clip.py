"""Divergence clipping (UniSD paper §2.2, Eq. 8): D̃_t = min(D_t, κ), so rare outlier tokens cannot dominate.

    unisd train ... --plugins clip -o clip.max=10          # static κ
    unisd train ... --plugins clip -o clip.quantile=0.99   # κ = that quantile of D over the batch's tokens

A hard clamp, as in the official code: a token above κ adds the constant κ and gets **zero gradient**
(it is not rescaled). κ is applied to the per-token divergence after the vocabulary sum and before
reliability weights. When `quantile` is set it wins over `max` (the official code makes them mutually
exclusive); with both set to none the plugin changes nothing (the unclipped objective). Logs
`clip/rate`, the fraction of completion tokens above κ, and `clip/kappa`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from unisd.api import Outputs, Plugin


def clip(D: torch.Tensor, mask: torch.Tensor, max: float | None = 10.0,
         quantile: float | None = None) -> tuple[torch.Tensor, float | None]:
    """(min(D, κ), κ) for D [B, T]; κ = the `quantile` of D over masked tokens if given, else `max`."""
    valid = mask.bool()
    if quantile is not None:
        if not valid.any():
            return D, None
        kappa = float(torch.quantile(D.detach()[valid].float(), quantile))
    elif max is not None:
        kappa = float(max)
    else:
        return D, None
    return D.clamp(max=kappa), kappa


class Clip(Plugin):
    __doc__ = __doc__
    forwards = 0.0  # no view of its own
    needs_teacher = False  # it caps D, whatever computed it

    @dataclass(frozen=True)
    class Config:
        max: float | None = 10.0        # static κ (official default 10.0 nats); none: no static cap
        quantile: float | None = None   # adaptive κ: this quantile of D per batch; wins over max

        def __post_init__(self) -> None:
            if self.max is not None and self.max <= 0:
                raise ValueError(f"clip.max must be positive (or none), got {self.max}")
            if self.quantile is not None and not 0 < self.quantile <= 1:
                raise ValueError(f"clip.quantile must be in (0, 1] (or none), got {self.quantile}")

    config: Config

    def token_loss(self, D: torch.Tensor, out: Outputs) -> torch.Tensor:
        clipped, kappa = clip(D, out.mask, self.config.max, self.config.quantile)
        if kappa is not None:
            above = (D.detach() > kappa) & out.mask.bool()
            out.metrics[f"{self.name}/rate"] = float(above.sum() / out.mask.sum().clamp_min(1.0))
            out.metrics[f"{self.name}/kappa"] = kappa
        return clipped
