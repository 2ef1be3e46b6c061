"""DeiT's distillation loss (Touvron et al., 2021; facebookresearch/deit losses.py), fed by TeacherTargets.

total = (1 - alpha) * base + alpha * distillation, where
- base: soft-target cross-entropy of the class head on the mixed, smoothed label targets [n, C];
- hard: cross-entropy of the distillation head on the teacher's top-1;
- soft: KL(student / tau || teacher / tau) * tau^2, reduced as DeiT does (sum / numel) or per sample
  (batchmean); the two differ by exactly the number of classes.
The teacher arrives as log-probabilities already at temperature tau, so the cached store path and the
online teacher path are interchangeable.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch import Tensor, nn

from deit_pipe.choices import Distillation, SoftReduction, check
from deit_pipe.errors import InputError
from deit_pipe.loss.teacher_targets import TeacherTargets

# KL summed over the batch -> loss. DeiT divides by numel (= n * C); batchmean divides by n.
SOFT_REDUCTIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    SoftReduction.sum_numel: lambda kl_sum, dist_logits: kl_sum / dist_logits.numel(),
    SoftReduction.batchmean: lambda kl_sum, dist_logits: kl_sum / dist_logits.shape[0],
}


def soft_distillation(dist_logits: Tensor, teacher: TeacherTargets, reduction: str) -> Tensor:
    tau = teacher.tau
    kl_sum = F.kl_div(
        F.log_softmax(dist_logits / tau, dim=1), teacher.log_probs, reduction="sum", log_target=True
    )
    return SOFT_REDUCTIONS[reduction](kl_sum, dist_logits) * (tau * tau)


def hard_distillation(dist_logits: Tensor, teacher: TeacherTargets, reduction: str) -> Tensor:
    return F.cross_entropy(dist_logits, teacher.top1)


DISTILLATION_MODES: dict[str, Callable[[Tensor, TeacherTargets, str], Tensor] | None] = {
    Distillation.none: None,
    Distillation.soft: soft_distillation,
    Distillation.hard: hard_distillation,
}


class DistillationLoss(nn.Module):
    """DeiT's loss. `outputs` is a tensor (no distillation token) or (cls_logits, dist_logits), as a timm
    distilled DeiT returns in distilled training mode; `targets` are the mixed, smoothed labels [n, C]."""

    def __init__(self, mode: str = "hard", alpha: float = 0.5, tau: float = 1.0, soft_reduction: str = "sum_numel"):
        super().__init__()
        mode = check(Distillation, mode, "--distillation")
        soft_reduction = check(SoftReduction, soft_reduction, "--soft-reduction")
        if not 0.0 <= alpha <= 1.0:
            raise InputError(f"distillation alpha must lie in [0, 1], got {alpha}")
        if tau <= 0.0:
            raise InputError(f"distillation tau must be positive, got {tau}")
        self.mode, self.alpha, self.tau, self.soft_reduction = mode, alpha, tau, soft_reduction
        self.base_criterion = SoftTargetCrossEntropy()

    def parts(self, outputs: Tensor | tuple[Tensor, Tensor], targets: Tensor,
              teacher: TeacherTargets | None = None) -> dict[str, Tensor]:
        """{"base", "distill" (absent for mode none), "total"}: the terms, for logging."""
        cls_logits, dist_logits = outputs if isinstance(outputs, tuple) else (outputs, None)
        distill_fn = DISTILLATION_MODES[self.mode]
        if distill_fn is None:
            # Deviation from DeiT, which ignores the distillation head here: a distilled model trained
            # without a teacher has both heads learn from the labels, so the averaged eval logits are not
            # dragged down by an untrained head. Without a distillation token this is DeiT's baseline.
            heads = (cls_logits,) if dist_logits is None else (cls_logits, dist_logits)
            base = sum(self.base_criterion(h, targets) for h in heads) / len(heads)
            return {"base": base, "total": base}
        if dist_logits is None:
            raise InputError(
                f"{self.mode} distillation needs a model with a distillation token in distilled training "
                "mode (outputs (cls_logits, dist_logits)); use a *_distilled_* DeiT or mode none"
            )
        if teacher is None:
            raise InputError(f"{self.mode} distillation needs teacher targets")
        if teacher.tau != self.tau:
            raise InputError(f"teacher targets were built at tau={teacher.tau}, the loss uses tau={self.tau}")
        base = self.base_criterion(cls_logits, targets)
        distill = distill_fn(dist_logits, teacher, self.soft_reduction)
        return {"base": base, "distill": distill, "total": (1.0 - self.alpha) * base + self.alpha * distill}

    def forward(self, outputs: Tensor | tuple[Tensor, Tensor], targets: Tensor,
                teacher: TeacherTargets | None = None) -> Tensor:
        return self.parts(outputs, targets, teacher)["total"]
