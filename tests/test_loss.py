"""DeiT loss against the paper repo's formulas, and the top-k teacher reconstruction."""

import pytest
import torch
import torch.nn.functional as F

from deit_pipe.errors import InputError
from deit_pipe.loss.deit import DistillationLoss
from deit_pipe.loss.teacher_targets import (
    TeacherTargets,
    compress_teacher_logits,
    reconstruction_kl,
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
    cached = loss((cls_logits, dist_logits), targets,
                  TeacherTargets.from_topk(*compress_teacher_logits(teacher_logits, C), C, 2.0))
    torch.testing.assert_close(cached, online, atol=1e-3, rtol=1e-3)  # fp16 logits


# --- top-k reconstruction ---------------------------------------------------------------------------

@pytest.fixture
def teacher_logits():
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 100, generator=g) * 4


def test_compress_is_what_a_store_holds(teacher_logits):
    topk, classes, lse = compress_teacher_logits(teacher_logits, 5)
    assert topk.dtype == torch.float16 and lse.dtype == torch.float32 and classes.shape == (64, 5)
    assert torch.all(topk[:, :-1] >= topk[:, 1:])
    torch.testing.assert_close(lse, torch.logsumexp(teacher_logits, dim=1))
    torch.testing.assert_close(teacher_top1(classes), teacher_logits.argmax(dim=1))


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_full_k_is_exact(teacher_logits, tau):
    C_ = teacher_logits.shape[1]
    rebuilt = teacher_log_probs(*compress_teacher_logits(teacher_logits, C_), C_, tau)
    # Exact up to the fp16 rounding of the stored logits.
    want = F.log_softmax(teacher_logits.half().float() / tau, dim=1)
    torch.testing.assert_close(rebuilt, want)
    assert reconstruction_kl(teacher_logits, C_, tau).abs().max() < 1e-5


@pytest.mark.parametrize("fp16_exact", [True, False])
def test_topk_keeps_top_probs_and_leftover_mass_at_tau_1(teacher_logits, fp16_exact):
    if fp16_exact:  # logits the store holds without rounding: the rebuild is exact
        teacher_logits = teacher_logits.half().float()
        rtol, atol = 1e-5, 1e-6
    else:  # fp16 rounding of a logit near 10 moves it by up to ~4e-3, so its probability by ~0.4%
        rtol, atol = 5e-3, 5e-3
    k, C_ = 5, teacher_logits.shape[1]
    topk, classes, lse = compress_teacher_logits(teacher_logits, k)
    rebuilt = teacher_log_probs(topk, classes, lse, C_, 1.0).exp()
    true = F.softmax(teacher_logits, dim=1)
    idx = classes.long()
    torch.testing.assert_close(rebuilt.gather(1, idx), true.gather(1, idx), rtol=rtol, atol=1e-7)
    leftover_true = 1 - true.gather(1, idx).sum(1)
    leftover_rebuilt = 1 - rebuilt.gather(1, idx).sum(1)
    torch.testing.assert_close(leftover_rebuilt, leftover_true, rtol=rtol, atol=atol)
    # The leftover is spread evenly over the other classes.
    others = rebuilt.scatter(1, idx, float("nan"))
    others = others[~others.isnan()].view(-1, C_ - k)
    torch.testing.assert_close(others, (leftover_rebuilt / (C_ - k))[:, None].expand_as(others))
    torch.testing.assert_close(rebuilt.sum(1), torch.ones(len(rebuilt)))


def test_topk_kl_is_small_and_shrinks_with_k(teacher_logits):
    kls = {k: reconstruction_kl(teacher_logits, k, 1.0).mean().item() for k in (1, 5, 20, 50, 100)}
    print("mean KL(full || top-k rebuilt) at tau=1:", {k: f"{v:.2e}" for k, v in kls.items()})
    values = list(kls.values())
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert kls[20] < 0.05 and kls[100] < 1e-5
    assert (reconstruction_kl(teacher_logits, 20, 1.0) >= -1e-6).all()


def test_confident_teacher_with_no_leftover_stays_finite():
    logits = torch.tensor([[60.0, 0.0, -30.0, -30.0]])  # leftover mass ~ 1e-26: below fp16 resolution
    rebuilt = teacher_log_probs(*compress_teacher_logits(logits, 1), 4, 1.0)
    assert torch.isfinite(rebuilt).all()
    assert teacher_top1(compress_teacher_logits(logits, 1)[1]).item() == 0
