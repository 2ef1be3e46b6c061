"""Teacher targets: the teacher's distribution rebuilt from a top-k store entry, or from live logits.

A store entry per (idx, view) holds the k largest teacher logits (fp16, descending), their classes and
the float32 log-sum-exp `lse` of ALL C logits at temperature 1. The leftover probability mass
1 - sum(exp(topk - lse)) is spread evenly over the other C - k classes, i.e. they all get one common
logit m = log(residual / (C - k)). At tau = 1 this reproduces the teacher's top-k probabilities exactly
(the synthetic logits normalise to exp(lse)); at any other tau the distribution is softmax([topk, m...] / tau).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# Floor for the leftover mass: fp16 rounding can push sum(exp(topk - lse)) a hair above 1.
_TINY_RESIDUAL = torch.finfo(torch.float32).tiny


def compress_teacher_logits(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(topk_logits fp16 [n,k] descending, topk_classes int32 [n,k], lse float32 [n]) as a store holds them."""
    logits = logits.float()
    values, classes = logits.topk(k, dim=1, largest=True, sorted=True)
    return values.half(), classes.to(torch.int32), torch.logsumexp(logits, dim=1)


def teacher_log_probs(
    topk_logits: Tensor, topk_classes: Tensor, lse: Tensor, num_classes: int, tau: float
) -> Tensor:
    """Teacher log-probabilities [n, C] at temperature `tau`, rebuilt from a top-k store entry."""
    topk = topk_logits.float()
    n, k = topk.shape
    if k == num_classes:
        full = torch.empty(n, num_classes, dtype=torch.float32, device=topk.device)
    else:
        # float64: the leftover mass is a difference of numbers close to 1 when the teacher is confident.
        top_mass = torch.exp(topk.double() - lse.double()[:, None]).sum(dim=1)
        residual = (1.0 - top_mass).clamp_min(_TINY_RESIDUAL)
        common_logit = lse.double() + torch.log(residual / (num_classes - k))
        full = common_logit.float()[:, None].expand(n, num_classes).clone()
    full.scatter_(1, topk_classes.long(), topk)
    return F.log_softmax(full / tau, dim=1)


def teacher_top1(topk_classes: Tensor) -> Tensor:
    """Teacher's top-1 class [n] (the store keeps classes in descending logit order)."""
    return topk_classes[:, 0].long()


def reconstruction_kl(full_logits: Tensor, k: int, tau: float) -> Tensor:
    """Per-sample KL(full teacher distribution || distribution rebuilt from its top-k entry), at `tau`."""
    num_classes = full_logits.shape[1]
    true_log_probs = F.log_softmax(full_logits.float() / tau, dim=1)
    rebuilt = teacher_log_probs(*compress_teacher_logits(full_logits, k), num_classes, tau)
    return F.kl_div(rebuilt, true_log_probs, reduction="none", log_target=True).sum(dim=1)


@dataclass(frozen=True)
class TeacherTargets:
    """What the distillation loss needs from the teacher, whichever way it was obtained."""

    log_probs: Tensor  # [n, C] teacher log-probabilities at temperature `tau`
    top1: Tensor  # [n] teacher's top-1 class (hard distillation)
    tau: float

    @classmethod
    def from_topk(
        cls, topk_logits: Tensor, topk_classes: Tensor, lse: Tensor, num_classes: int, tau: float
    ) -> TeacherTargets:
        """Cached path: rebuild from a top-k store entry."""
        return cls(
            log_probs=teacher_log_probs(topk_logits, topk_classes, lse, num_classes, tau),
            top1=teacher_top1(topk_classes),
            tau=tau,
        )

    @classmethod
    def from_logits(cls, logits: Tensor, tau: float) -> TeacherTargets:
        """Online-teacher path (kept for comparison): DeiT's log_softmax(teacher_logits / tau)."""
        logits = logits.detach().float()
        return cls(log_probs=F.log_softmax(logits / tau, dim=1), top1=logits.argmax(dim=1), tau=tau)
