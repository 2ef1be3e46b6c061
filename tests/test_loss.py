"""DeiT loss against the paper repo's formulas, and the teacher rebuilt from a store entry."""

import math

import pytest
import torch
import torch.nn.functional as F

from deit_pipe.errors import InputError
from deit_pipe.loss.deit import DistillationLoss
from deit_pipe.loss.teacher_targets import (
    LogitCode,
    StoreEntry,
    TeacherTargets,
    rebuild_kl,
    served_kl,
    teacher_log_probs,
    teacher_top1,
)

N, C = 6, 10


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    cls_logits = torch.randn(N, C, generator=g) * 2
    dist_logits = torch.randn(N, C, generator=g) * 2
    teacher_logits = torch.randn(N, C, generator=g) * 3
    # Mixed, smoothed label targets: two one-hots blended, then label smoothing.
    a, b = torch.randint(0, C, (N,), generator=g), torch.randint(0, C, (N,), generator=g)
    lam = 0.7
    targets = lam * F.one_hot(a, C).float() + (1 - lam) * F.one_hot(b, C).float()
    targets = targets * 0.9 + 0.1 / C
    return cls_logits, dist_logits, teacher_logits, targets


def soft_target_ce(x, target):  # timm SoftTargetCrossEntropy
    return torch.sum(-target * F.log_softmax(x, dim=-1), dim=-1).mean()


def deit_reference(outputs, outputs_kd, teacher_outputs, labels, distillation_type, alpha, tau):
    """facebookresearch/deit losses.py DistillationLoss.forward, written out."""
    base_loss = soft_target_ce(outputs, labels)
    if distillation_type == "none":
        return base_loss
    if distillation_type == "soft":
        T = tau
        distillation_loss = F.kl_div(
            F.log_softmax(outputs_kd / T, dim=1),
            F.log_softmax(teacher_outputs / T, dim=1),
            reduction="sum",
            log_target=True,
        ) * (T * T) / outputs_kd.numel()
    else:
        distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
    return base_loss * (1 - alpha) + distillation_loss * alpha


@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("alpha,tau", [(0.5, 1.0), (0.3, 3.0)])
def test_distillation_matches_deit(batch, mode, alpha, tau):
    cls_logits, dist_logits, teacher_logits, targets = batch
    loss = DistillationLoss(mode=mode, alpha=alpha, tau=tau)
    got = loss((cls_logits, dist_logits), targets, TeacherTargets.from_logits(teacher_logits, tau))
    want = deit_reference(cls_logits, dist_logits, teacher_logits, targets, mode, alpha, tau)
    torch.testing.assert_close(got, want)


def test_none_without_dist_token_is_deit_baseline(batch):
    cls_logits, _, _, targets = batch
    got = DistillationLoss(mode="none")(cls_logits, targets)
    torch.testing.assert_close(got, deit_reference(cls_logits, None, None, targets, "none", 0.5, 1.0))


def test_none_with_dist_token_trains_both_heads(batch):
    cls_logits, dist_logits, _, targets = batch
    got = DistillationLoss(mode="none")((cls_logits, dist_logits), targets)
    want = (soft_target_ce(cls_logits, targets) + soft_target_ce(dist_logits, targets)) / 2
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_soft_reductions_differ_by_num_classes(batch, tau):
    cls_logits, dist_logits, teacher_logits, targets = batch
    teacher = TeacherTargets.from_logits(teacher_logits, tau)
    parts = {
        r: DistillationLoss(mode="soft", tau=tau, soft_reduction=r).parts((cls_logits, dist_logits), targets, teacher)
        for r in ("sum_numel", "batchmean")
    }
    torch.testing.assert_close(parts["batchmean"]["distill"], parts["sum_numel"]["distill"] * C)
    want_batchmean = F.kl_div(
        F.log_softmax(dist_logits / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1),
        reduction="batchmean", log_target=True,
    ) * tau * tau
    torch.testing.assert_close(parts["batchmean"]["distill"], want_batchmean)


def test_distillation_refuses_missing_inputs(batch):
    cls_logits, dist_logits, teacher_logits, targets = batch
    with pytest.raises(InputError, match="distillation token"):
        DistillationLoss(mode="hard")(cls_logits, targets, TeacherTargets.from_logits(teacher_logits, 1.0))
    with pytest.raises(InputError, match="teacher"):
        DistillationLoss(mode="soft")((cls_logits, dist_logits), targets)
    with pytest.raises(InputError, match="tau"):
        DistillationLoss(mode="soft", tau=2.0)(
            (cls_logits, dist_logits), targets, TeacherTargets.from_logits(teacher_logits, 1.0)
        )
    with pytest.raises(InputError, match="mode"):
        DistillationLoss(mode="medium")


def test_store_targets_drive_the_loss_like_an_online_teacher(batch):
    cls_logits, dist_logits, teacher_logits, targets = batch
    loss = DistillationLoss(mode="soft", tau=2.0)
    online = loss((cls_logits, dist_logits), targets, TeacherTargets.from_logits(teacher_logits, 2.0))
    code = LogitCode.fit(teacher_logits, 4, 0.5)
    cached = loss((cls_logits, dist_logits), targets,
                  TeacherTargets.from_store(StoreEntry.from_logits(teacher_logits, C, code), code, 2.0))
    torch.testing.assert_close(cached, online, atol=1e-3, rtol=1e-3)  # fp16 logits


# --- the teacher rebuilt from a store entry ----------------------------------------------------------

@pytest.fixture
def teacher_logits():
    """A teacher whose 100 logits vary along 6 directions (plus a little noise), as real ones mostly do."""
    g = torch.Generator().manual_seed(1)
    directions = torch.linalg.qr(torch.randn(100, 6, generator=g)).Q.T  # 6 orthonormal rows
    mean = torch.randn(100, generator=g) * 2
    return mean + (torch.randn(96, 6, generator=g) * 6) @ directions + torch.randn(96, 100, generator=g) * 0.01


def test_store_entry_is_what_a_store_holds(teacher_logits):
    code = LogitCode.fit(teacher_logits[:64], 8, 0.25)
    entry = StoreEntry.from_logits(teacher_logits, 5, code)
    assert entry.topk_logits.dtype == torch.float16 and entry.tail_lse.dtype == torch.float32
    assert entry.topk_classes.shape == (96, 5) and entry.codes.shape == (96, 8) and entry.codes.dtype == torch.int8
    assert torch.all(entry.topk_logits[:, :-1] >= entry.topk_logits[:, 1:])
    below_top5 = teacher_logits.sort(dim=1, descending=True).values[:, 5:]
    torch.testing.assert_close(entry.tail_lse, torch.logsumexp(below_top5, dim=1))
    torch.testing.assert_close(teacher_top1(entry.topk_classes), teacher_logits.argmax(dim=1))
    # Orthonormal directions; a code rounds each coordinate to the nearest step (none widened here).
    torch.testing.assert_close(code.basis @ code.basis.T, torch.eye(8), atol=1e-5, rtol=0)
    assert (code.steps == 0.25).all()
    coords = (teacher_logits - code.mean) @ code.basis.T
    assert ((entry.codes.float() * 0.25 - coords).abs() <= 0.125 + 1e-5).all()


def test_hand_computed_entry_at_two_temperatures():
    """C = 4, k = 1, a rank-1 code along class 1: decoded logits [1, 2, -1, 0]; the store says the top class
    (0, logit 3) holds half the mass. The tail keeps the code's shape and gets exactly the other half."""
    code = LogitCode(mean=torch.tensor([1.0, 0.0, -1.0, 0.0]), basis=torch.tensor([[0.0, 1.0, 0.0, 0.0]]),
                     steps=torch.tensor([0.5]))
    tail_lse = 3.0  # the tail's mass e^3 equals the top class's: half each
    entry = StoreEntry(torch.tensor([[3.0]]).half(), torch.tensor([[0]]), torch.tensor([tail_lse]),
                       torch.tensor([[4]], dtype=torch.int8))
    s = math.exp(2) + math.exp(-1) + math.exp(0)
    at_1 = [0.5, 0.5 * math.exp(2) / s, 0.5 * math.exp(-1) / s, 0.5 / s]
    torch.testing.assert_close(teacher_log_probs(entry, code, 1.0).exp(), torch.tensor([at_1]))
    shift = 3.0 - math.log(s)  # the tail's log-sum-exp becomes 3
    logits_3 = torch.tensor([3.0, 2 + shift, -1 + shift, shift]) / 3.0
    torch.testing.assert_close(teacher_log_probs(entry, code, 3.0), torch.log_softmax(logits_3, 0)[None])


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_all_classes_kept_is_exact_whatever_the_code(teacher_logits, tau):
    C_ = teacher_logits.shape[1]
    code = LogitCode.fit(teacher_logits, 0, 1.0)
    rebuilt = teacher_log_probs(StoreEntry.from_logits(teacher_logits, C_, code), code, tau)
    # Exact up to the fp16 rounding of the stored logits.
    torch.testing.assert_close(rebuilt, F.log_softmax(teacher_logits.half().float() / tau, dim=1))


def test_topk_probabilities_and_leftover_mass_are_exact_at_tau_1(teacher_logits):
    logits = teacher_logits.half().float()  # logits the store holds without rounding
    k = 5
    code = LogitCode.fit(logits[:64], 3, 0.5)  # too small a code to matter for the head
    entry = StoreEntry.from_logits(logits, k, code)
    rebuilt = teacher_log_probs(entry, code, 1.0).exp()
    true = F.softmax(logits, dim=1)
    idx = entry.topk_classes.long()
    torch.testing.assert_close(rebuilt.gather(1, idx), true.gather(1, idx), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(1 - rebuilt.gather(1, idx).sum(1), 1 - true.gather(1, idx).sum(1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(rebuilt.sum(1), torch.ones(len(rebuilt)))


def test_the_code_keeps_the_tails_shape_a_flat_fill_cannot(teacher_logits):
    """Fitted on 64 views, measured on 32 others: a code of the teacher's 6 directions rebuilds it to within
    its quantisation, at tau 1 and 3; rank 0 (the mean's shape) does far worse; a finer step does better."""
    fit, held = teacher_logits[:64], teacher_logits[64:]
    kl = {}
    for rank, step in ((0, 0.5), (6, 0.5), (6, 0.2)):
        code = LogitCode.fit(fit, rank, step)
        entry = StoreEntry.from_logits(held, 5, code)
        kl[rank, step] = [rebuild_kl(held, entry, code, tau).mean().item() for tau in (1.0, 3.0)]
        assert all((rebuild_kl(held, entry, code, tau) >= -1e-6).all() for tau in (1.0, 3.0))
    assert kl[6, 0.5][1] < 0.01 and kl[6, 0.5][0] < 0.05
    assert kl[0, 0.5][1] > 20 * kl[6, 0.5][1]
    assert kl[6, 0.2][1] < kl[6, 0.5][1] / 3  # error ~ step^2 (6.25x here)


def test_a_direction_too_wide_for_int8_gets_a_wider_step_not_clipped():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(50, 8, generator=g) * torch.tensor([300.0, 1, 1, 1, 1, 1, 1, 1])  # class 0 spans +-1000
    code = LogitCode.fit(logits, 8, 0.5)
    assert code.steps[0] > 0.5 and (code.steps[1:] == 0.5).all()
    coords = (logits - code.mean) @ code.basis.T
    assert (code.encode(logits).abs() < 127).all()  # no coordinate clipped
    assert ((code.decode(code.encode(logits)) - logits).abs().max() <= code.steps.sum() / 2 + 1e-3)
    assert ((code.encode(logits).float() * code.steps - coords).abs() <= code.steps / 2 + 1e-4).all()


def test_confident_teacher_with_no_leftover_stays_finite():
    logits = torch.tensor([[60.0, 0.0, -30.0, -30.0], [1.0, 0.5, 0.0, -1.0]])  # leftover ~1e-26: below fp16
    code = LogitCode.fit(logits, 1, 0.5)
    entry = StoreEntry.from_logits(logits, 1, code)
    assert torch.isfinite(teacher_log_probs(entry, code, 1.0)).all()
    assert teacher_top1(entry.topk_classes).tolist() == [0, 0]


def test_a_tau_the_store_did_not_measure_or_cannot_serve_is_refused():
    error = {"views": 100, "kl_mean": [[0.5, 0.2], [1.0, 0.004], [3.0, 0.03], [5.0, 0.02]]}
    assert served_kl(error, 1.0, 0.05) == 0.004
    assert served_kl(error, 2.0, 0.05) == 0.03  # the worse of the two measured around it
    assert served_kl(error, 4.0, 0.05) == 0.03
    assert served_kl(error, 5.0, 0.05) == 0.02
    with pytest.raises(InputError, match="at tau 0.5 to 5, not at --tau 0.3"):
        served_kl(error, 0.3, 0.05)
    with pytest.raises(InputError, match="not at --tau 7"):
        served_kl(error, 7.0, 0.05)
    with pytest.raises(InputError, match="tau=0.5 with a mean KL of 0.2 nats, above --max-target-kl 0.05"):
        served_kl(error, 0.7, 0.05)
