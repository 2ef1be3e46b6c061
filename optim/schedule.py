"""DeiT's optimisation recipe, built as DeiT's main.py builds it, with timm's own factories.

- Optimizer: timm's create_optimizer (AdamW, eps 1e-8, torch's betas); no weight decay on the names in
  `model.no_weight_decay()` (pos_embed, cls_token, dist_token) nor on 1-D parameters and biases.
- Learning rate: lr x global batch / 512; timm's CosineLRScheduler (warmup from warmup_lr, cosine to
  min_lr over `epochs`, the cosine not shifted by the warmup) stepped once per epoch, after it, as
  DeiT's main.py does: epoch 0 and epoch 1 both train at warmup_lr, epoch e >= 1 at the scheduler's
  value for e - 1, and the rate is constant within an epoch. `per_step` instead evaluates the same
  scheduler at the fractional epoch of every step (for runs of a few epochs, where a whole epoch at
  warmup_lr is a large share).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler


@dataclass(frozen=True)
class LRSchedule:
    base_lr: float = 5e-4  # per 512 images of global batch
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    warmup_epochs: int = 5
    epochs: int = 300
    per_step: bool = False

    def peak(self, global_batch: int) -> float:
        return self.base_lr * global_batch / 512.0

    def scheduler(self, optimizer) -> CosineLRScheduler:
        """timm's scheduler over `optimizer`, whose groups hold the peak rate; it sets them to warmup_lr."""
        return CosineLRScheduler(optimizer, t_initial=self.epochs, lr_min=self.min_lr, warmup_lr_init=self.warmup_lr,
                                 warmup_t=self.warmup_epochs, cycle_limit=1, t_in_epochs=True)


    def position(self, epoch: int, step: int, steps: int) -> float:
        """Where the scheduler is evaluated for step `step` of `steps` in `epoch`: DeiT steps it after each
        epoch with the epoch just finished (epoch 0 trains at its value at 0, the warmup rate)."""
        if self.per_step:
            return epoch + step / max(steps, 1)
        return max(epoch - 1, 0)


def adamw(model: torch.nn.Module, lr: float, weight_decay: float = 0.05) -> torch.optim.Optimizer:
    return create_optimizer_v2(model, "adamw", lr=lr, weight_decay=weight_decay, eps=1e-8)
