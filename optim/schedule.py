"""DeiT's optimisation recipe: AdamW without decay on biases and norms, lr scaled by the global batch,
linear warmup from warmup_lr, then cosine to min_lr (Touvron et al., 2021; DeiT main.py defaults)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from timm.optim import param_groups_weight_decay


@dataclass(frozen=True)
class LRSchedule:
    base_lr: float = 5e-4  # per 512 images of global batch
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    warmup_epochs: float = 5.0
    epochs: int = 300

    def peak(self, global_batch: int) -> float:
        return self.base_lr * global_batch / 512.0

    def at(self, epoch_progress: float, global_batch: int) -> float:
        """lr at a fractional epoch (epoch + step / steps_in_epoch)."""
        peak = self.peak(global_batch)
        if epoch_progress < self.warmup_epochs:
            return self.warmup_lr + (peak - self.warmup_lr) * epoch_progress / self.warmup_epochs
        span = max(self.epochs - self.warmup_epochs, 1e-8)
        t = min((epoch_progress - self.warmup_epochs) / span, 1.0)
        return self.min_lr + 0.5 * (peak - self.min_lr) * (1.0 + math.cos(math.pi * t))


def adamw(model: torch.nn.Module, lr: float, weight_decay: float = 0.05) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups_weight_decay(model, weight_decay), lr=lr)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
