"""Mixup and CutMix of two views, and the mixed, smoothed label targets that go with them (timm's convention)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.data.mixup import one_hot


@dataclass(frozen=True)
class MixParams:
    """How one view is mixed with its partner. lam is the weight of the sample's own image and label."""

    mode: str  # "mixup", "cutmix" or "none"
    lam: float  # a float32 value; for CutMix 1 - (clipped box area) / (H * W)
    box: tuple[int, int, int, int] | None = None  # CutMix (y_lo, y_hi, x_lo, x_hi), half-open


NO_MIX = MixParams("none", 1.0)


def mix_views(own: torch.Tensor, partner: torch.Tensor, params: MixParams, out: torch.Tensor) -> None:
    """Write the mix of two views into `out` (a batch's slot: no view-sized temporary is copied there): Mixup's
    own * lam + partner * (1 - lam), CutMix's own view with the partner's box pasted in, or the own view."""
    if params.mode == "mixup":
        lam = torch.tensor(params.lam, dtype=torch.float32)
        torch.mul(own, lam, out=out)
        out.add_(partner * (1 - lam))  # the same roundings as own * lam + partner * (1 - lam)
        return
    out.copy_(own)
    if params.mode == "cutmix":
        yl, yh, xl, xh = params.box
        out[:, yl:yh, xl:xh] = partner[:, yl:yh, xl:xh]


def mixed_targets(label, partner_label, lam, num_classes: int, smoothing: float) -> torch.Tensor:
    """[n, C] float32: lam * smooth(one_hot(label)) + (1 - lam) * smooth(one_hot(partner_label)).

    timm's smoothing convention: off = smoothing / C, on = 1 - smoothing + off.
    """
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    own = one_hot(torch.as_tensor(label), num_classes, on_value=on, off_value=off)
    other = one_hot(torch.as_tensor(partner_label), num_classes, on_value=on, off_value=off)
    lam = torch.as_tensor(lam, dtype=torch.float32, device=own.device).reshape(-1, 1)
    return own * lam + other * (1 - lam)
