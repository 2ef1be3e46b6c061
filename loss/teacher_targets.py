"""Teacher targets: the teacher's whole distribution rebuilt from a store entry, or from live logits.

A store entry per (idx, view) holds
- the k largest teacher logits (fp16, descending) and their classes: top-1 exact for hard distillation,
  the head of the distribution to fp16 precision;
- `tail_lse`, the float32 log-sum-exp of the logits outside the top-k: the mass outside the top-k, exactly
  and in the log domain (it neither underflows nor drowns in the top-k's rounding when the teacher is sure);
- a code of the whole logit vector: its coordinates in a basis of the teacher's logit space (the
  principal directions of the teacher's logits on this data set's views, fitted once per store), each
  rounded to a multiple of its step and stored as int8. The step is the store's `step` in logit units,
  widened for a direction whose coordinates would not fit in int8 (a teacher with very large logits). A
  teacher's logits vary along few directions, so a few hundred coarse coordinates keep the shape of the tail,
  which a flat fill cannot: on mixed DeiT views a real 1000-class teacher keeps ~40% of its mass outside the
  top-10 at tau = 1 and ~94% at tau = 3.

Rebuilt logits: the code's vector, the top-k entries replaced by the stored values, the other classes
shifted together so that their log-sum-exp is the stored one. At tau = 1 the top-k probabilities and
the tail's total mass are exact; the tail's shape is the code's. A code of rank 0 gives every view the
tail shape of the mean logit vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from deit_pipe.errors import InputError
from deit_pipe.models.precision import inference_precision
from deit_pipe.storage.teacher_store import TeacherStore, ViewRecord
from deit_pipe.tensor_fields import TensorFields

_INT8_MAX = 127


@dataclass(frozen=True)
class LogitCode:
    """A quantised low-rank code of whole logit vectors: logits ~ mean + (codes * steps) @ basis."""

    mean: Tensor  # [C] float32
    basis: Tensor  # [r, C] float32, orthonormal rows (principal directions, largest first)
    steps: Tensor  # [r] float32, quantisation step of each coordinate, in logit units

    @property
    def rank(self) -> int:
        return self.basis.shape[0]

    @classmethod
    def fit(cls, logits: Tensor, rank: int, step: float) -> LogitCode:
        """Principal directions of `logits` [n, C] (float64 SVD); rank is capped by C and n - 1. A direction
        whose coordinates reach past 127 steps here gets a wider step, with a quarter of room to spare."""
        x = logits.double()
        mean = x.mean(dim=0)
        rank = max(0, min(rank, x.shape[1], x.shape[0] - 1))
        _, _, vt = torch.linalg.svd(x - mean, full_matrices=False)
        basis = vt[:rank]
        # An SVD direction is defined up to sign: fix it (largest entry positive) so the code is well defined.
        basis = basis * torch.sign(basis.gather(1, basis.abs().argmax(dim=1, keepdim=True)))
        reach = ((x - mean) @ basis.T).abs().amax(dim=0) if len(x) else torch.zeros(rank, dtype=x.dtype)
        steps = torch.clamp(1.25 * reach / _INT8_MAX, min=step)
        return cls(mean.float(), basis.float(), steps.float())

    @classmethod
    def of_store(cls, store: TeacherStore) -> LogitCode:
        """The code a teacher store was written with."""
        return cls(*(torch.from_numpy(a) for a in store.code_arrays()))

    def arrays(self) -> tuple:
        """(mean, basis, steps) as numpy arrays, as TeacherStore.create keeps them."""
        return self.mean.numpy(), self.basis.numpy(), self.steps.numpy()

    def encode(self, logits: Tensor) -> Tensor:
        """[n, r] int8 coordinates."""
        coords = (logits.double() - self.mean.double()) @ self.basis.double().T
        return torch.round(coords / self.steps.double()).clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)

    def decode(self, codes: Tensor) -> Tensor:
        """[n, C] float32 logits from [n, r] codes (on the code's device)."""
        return self.mean + (codes.float() * self.steps) @ self.basis

    def to(self, device) -> LogitCode:
        return LogitCode(self.mean.to(device), self.basis.to(device), self.steps.to(device))


@dataclass(frozen=True)
class StoreEntry(TensorFields):
    """What a store holds for n views (the teacher's part of it)."""

    topk_logits: Tensor  # [n, k] float16, descending
    topk_classes: Tensor  # [n, k] integer
    tail_lse: Tensor  # [n] float32, log-sum-exp of the logits outside the top-k (-inf when k = C)
    codes: Tensor  # [n, r] int8

    @classmethod
    def from_logits(cls, logits: Tensor, k: int, code: LogitCode) -> StoreEntry:
        logits = logits.float()
        values, classes = logits.topk(k, dim=1, largest=True, sorted=True)
        tail_lse = torch.logsumexp(logits.scatter(1, classes, float("-inf")), dim=1)
        return cls(values.half(), classes.to(torch.int32), tail_lse, code.encode(logits))

    @classmethod
    def of_record(cls, record: ViewRecord, rows) -> StoreEntry:
        """The entries of a store unit's `rows` (positions within the shard)."""
        return cls(torch.from_numpy(record.logits[rows]), torch.from_numpy(record.classes[rows].astype("int64")),
                   torch.from_numpy(record.tail_lse[rows]), torch.from_numpy(record.code[rows]))



def rebuilt_logits(entry: StoreEntry, code: LogitCode) -> Tensor:
    """[n, C] float32 logits whose softmax is the teacher's distribution as the store keeps it."""
    topk = entry.topk_logits.float()
    classes = entry.topk_classes.long()
    k = topk.shape[1]
    full = code.decode(entry.codes)
    if k < full.shape[1]:
        tail = full.scatter(1, classes, float("-inf"))
        full = full + (entry.tail_lse.float() - torch.logsumexp(tail, dim=1))[:, None]
    return full.scatter(1, classes, topk)


def teacher_log_probs(entry: StoreEntry, code: LogitCode, tau: float) -> Tensor:
    """Teacher log-probabilities [n, C] at temperature `tau`, rebuilt from store entries."""
    return F.log_softmax(rebuilt_logits(entry, code) / tau, dim=1)


def teacher_top1(topk_classes: Tensor) -> Tensor:
    """Teacher's top-1 class [n] (the store keeps classes in descending logit order)."""
    return topk_classes[:, 0].long()


def rebuild_kl(full_logits: Tensor, entry: StoreEntry, code: LogitCode, tau: float) -> Tensor:
    """Per-view KL(teacher's distribution || the one rebuilt from its store entry), at `tau`, in nats."""
    true_log_probs = F.log_softmax(full_logits.float() / tau, dim=1)
    rebuilt = teacher_log_probs(entry, code, tau)
    return F.kl_div(rebuilt, true_log_probs, reduction="none", log_target=True).sum(dim=1)


def served_kl(code_error: dict, tau: float, max_kl: float) -> float:
    """The mean KL a store's targets cost at `tau`: the larger of its measurements at the two measured
    temperatures around tau (the KL need not fall or rise with tau: the top-k and the tail's mass are exact
    at tau 1, the tail's shape weighs more at higher tau). Refused outside the measured range, or above
    `max_kl`."""
    measured = sorted((float(t), kl) for t, kl in code_error["kl_mean"])
    below = [m for m in measured if m[0] <= tau]
    above = [m for m in measured if m[0] >= tau]
    if not below or not above:
        raise InputError(f"the teacher store measured its targets' error at tau {measured[0][0]:g} to "
                         f"{measured[-1][0]:g}, not at --tau {tau:g}")
    at, kl = max(below[-1], above[0], key=lambda m: m[1])
    if kl > max_kl:
        raise InputError(f"the teacher store rebuilds the teacher at tau={at:g} with a mean KL of {kl:.3g} nats, "
                         f"above --max-target-kl {max_kl:g} (make a store with a larger --code-rank or --topk)")
    return kl


@dataclass(frozen=True)
class TeacherTargets:
    """What the distillation loss needs from the teacher, whichever way it was obtained."""

    log_probs: Tensor  # [n, C] teacher log-probabilities at temperature `tau`
    top1: Tensor  # [n] teacher's top-1 class (hard distillation)
    tau: float

    @classmethod
    def from_store(cls, entry: StoreEntry, code: LogitCode, tau: float) -> TeacherTargets:
        """Cached path: rebuild from store entries."""
        return cls(log_probs=teacher_log_probs(entry, code, tau), top1=teacher_top1(entry.topk_classes), tau=tau)

    @classmethod
    def from_logits(cls, logits: Tensor, tau: float) -> TeacherTargets:
        """Online-teacher path (kept for comparison): DeiT's log_softmax(teacher_logits / tau)."""
        logits = logits.detach().float()
        return cls(log_probs=F.log_softmax(logits / tau, dim=1), top1=logits.argmax(dim=1), tau=tau)


class CachedTeacher:
    """Targets from the store's entries for each batch's (idx, view): no teacher runs."""

    def __init__(self, code: LogitCode, tau: float, device: torch.device):
        self.code, self.tau, self.device = code.to(device), tau, device

    def __call__(self, images: Tensor, entry: StoreEntry) -> TeacherTargets:
        return TeacherTargets.from_store(entry.to(self.device), self.code, self.tau)


class OnlineTeacher:
    """Targets from a teacher run on each batch, as DeiT does (kept to compare the cached path against)."""

    def __init__(self, model: torch.nn.Module, tau: float, precision: str):
        self.model, self.tau, self.precision = model.eval(), tau, precision

    def __call__(self, images: Tensor, entry: StoreEntry | None) -> TeacherTargets:
        with torch.inference_mode(), inference_precision(images.device, self.precision):
            logits = self.model(images)
        return TeacherTargets.from_logits(logits.float(), self.tau)
