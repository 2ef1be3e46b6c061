"""DeiT loss against the paper repo's formulas, and the teacher rebuilt from a store entry."""

import math

import numpy as np
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
from deit_pipe.storage.teacher_store import ViewRecord

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
    without_token = r"distillation token in distilled training mode \(.*use a \*_distilled_\* DeiT or mode none$"
    with pytest.raises(InputError, match=without_token):
        DistillationLoss(mode="hard")(cls_logits, targets, TeacherTargets.from_logits(teacher_logits, 1.0))
    with pytest.raises(InputError, match="teacher"):
        DistillationLoss(mode="soft")((cls_logits, dist_logits), targets)
    with pytest.raises(InputError, match="tau"):
        DistillationLoss(mode="soft", tau=2.0)(
            (cls_logits, dist_logits), targets, TeacherTargets.from_logits(teacher_logits, 1.0)
        )
    with pytest.raises(InputError, match="--distillation must be one of none, soft, hard, not 'medium'"):
        DistillationLoss(mode="medium")


def test_parts_logs_base_and_distill_terms(batch):
    """The train loop logs parts' "base", "distill" and "total": each is DeiT's term, written out."""
    cls_logits, dist_logits, teacher_logits, targets = batch
    parts = DistillationLoss(mode="hard", alpha=0.25).parts(
        (cls_logits, dist_logits), targets, TeacherTargets.from_logits(teacher_logits, 1.0)
    )
    base = soft_target_ce(cls_logits, targets)
    distill = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))
    assert set(parts) == {"base", "distill", "total"}
    torch.testing.assert_close(parts["base"], base)
    torch.testing.assert_close(parts["distill"], distill)
    torch.testing.assert_close(parts["total"], 0.75 * base + 0.25 * distill)
    none = DistillationLoss(mode="none").parts(cls_logits, targets)
    assert set(none) == {"base", "total"}
    torch.testing.assert_close(none["base"], base)


@pytest.mark.parametrize("alpha,want", [(0.0, "base"), (1.0, "distill")])
def test_alpha_at_either_end_is_accepted_and_keeps_one_term(batch, alpha, want):
    """alpha 0 (labels only) and 1 (teacher only) are legal settings; DeiT's formula then keeps one term."""
    cls_logits, dist_logits, teacher_logits, targets = batch
    parts = DistillationLoss(mode="soft", alpha=alpha).parts(
        (cls_logits, dist_logits), targets, TeacherTargets.from_logits(teacher_logits, 1.0)
    )
    torch.testing.assert_close(parts["total"], parts[want])


def test_out_of_range_settings_are_refused_by_name():
    """alpha outside [0, 1], a tau that is not positive, an unknown reduction: refused, naming the value."""
    with pytest.raises(InputError, match=r"alpha must lie in \[0, 1\], got 1.5"):
        DistillationLoss(alpha=1.5)
    with pytest.raises(InputError, match=r"alpha must lie in \[0, 1\], got -0.1"):
        DistillationLoss(alpha=-0.1)
    with pytest.raises(InputError, match="tau must be positive, got 0.0"):
        DistillationLoss(tau=0.0)
    with pytest.raises(InputError, match="--soft-reduction must be one of sum_numel, batchmean, not 'mean'"):
        DistillationLoss(soft_reduction="mean")


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
    assert entry.topk_classes.dtype == torch.int32
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


def test_rebuild_kl_is_the_per_view_kl_from_the_true_teacher(teacher_logits):
    """rebuild_kl, the cost a store measures and served_kl checks, is per view sum p (log p - log q), with p the
    teacher's own softmax at tau and q the one rebuilt from its entry (here a code too small to be exact)."""
    tau = 2.0
    code = LogitCode.fit(teacher_logits, 2, 0.5)
    entry = StoreEntry.from_logits(teacher_logits, 5, code)
    p = F.softmax(teacher_logits / tau, dim=1)
    want = (p * (p.log() - teacher_log_probs(entry, code, tau))).sum(dim=1)
    got = rebuild_kl(teacher_logits, entry, code, tau)
    assert got.shape == (96,) and want.min() > 1e-3
    torch.testing.assert_close(got, want)


def test_code_rank_is_capped_by_the_views_it_is_fitted_on():
    """n centred views span at most n - 1 directions: asking for more gives n - 1 (a further direction would be
    noise, a byte per view for nothing). Rank 0 keeps the mean alone, and no views at all give rank 0."""
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(4))
    assert LogitCode.fit(logits, 8, 0.5).basis.shape == (3, 10)
    mean_only = LogitCode.fit(logits, 0, 0.5)
    assert StoreEntry.from_logits(logits, 2, mean_only).codes.shape == (4, 0)
    torch.testing.assert_close(mean_only.decode(torch.zeros(4, 0, dtype=torch.int8)), logits.mean(0).expand(4, 10))
    assert LogitCode.fit(torch.empty(0, 10), 8, 0.5).steps.shape == (0,)


def test_entry_of_a_store_record_takes_the_rows_asked_for():
    """A loader reads a shard's record and takes the rows of its views, in the order asked; classes stored as
    uint16 come back as int64 class indices."""
    n = 3
    record = ViewRecord(
        logits=np.array([[5.0, 1.0], [4.0, 2.0], [3.0, 0.5]], np.float16),
        classes=np.array([[7, 1], [2, 9], [65535, 0]], np.uint16),
        tail_lse=np.array([0.1, 0.2, 0.3], np.float32),
        code=np.array([[1], [-2], [3]], np.int8),
        partner=np.zeros(n, np.int32), lam=np.ones(n, np.float32), digest=np.zeros(n, np.uint32),
    )
    entry = StoreEntry.of_record(record, [2, 0])
    torch.testing.assert_close(entry.topk_logits, torch.tensor([[3.0, 0.5], [5.0, 1.0]], dtype=torch.float16))
    assert entry.topk_classes.dtype == torch.int64 and entry.topk_classes.tolist() == [[65535, 0], [7, 1]]
    torch.testing.assert_close(entry.tail_lse, torch.tensor([0.3, 0.1]))
    assert entry.codes.dtype == torch.int8 and entry.codes.tolist() == [[3], [1]]


def test_code_and_entry_move_to_a_device_whole(teacher_logits):
    """The train loop moves the code, and each batch's entries, to the GPU: every tensor must go along (the meta
    device stands in for it)."""
    code = LogitCode.fit(teacher_logits, 3, 0.5)
    entry = StoreEntry.from_logits(teacher_logits, 5, code)
    moved = (*vars(code.to("meta")).values(), *vars(entry.to("meta")).values())
    assert len(moved) == 7 and all(t.device.type == "meta" for t in moved)


def test_a_direction_too_wide_for_int8_gets_a_wider_step_not_clipped():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(50, 8, generator=g) * torch.tensor([300.0, 1, 1, 1, 1, 1, 1, 1])  # class 0 spans +-1000
    code = LogitCode.fit(logits, 8, 0.5)
    assert code.steps[0] > 0.5 and (code.steps[1:] == 0.5).all()
    assert code.encode(logits)[:, 0].abs().max() == 102  # round(127 / 1.25): a quarter of room to spare
    coords = (logits - code.mean) @ code.basis.T
    assert (code.encode(logits).abs() < 127).all()  # no coordinate clipped
    assert ((code.decode(code.encode(logits)) - logits).abs().max() <= code.steps.sum() / 2 + 1e-3)
    assert ((code.encode(logits).float() * code.steps - coords).abs() <= code.steps / 2 + 1e-4).all()


def test_a_view_beyond_the_fitted_range_saturates_its_code_instead_of_wrapping():
    """The code is fitted on some views and encodes all: a coordinate past 127 steps must stop at +-127 (int8
    would otherwise wrap 200 steps to -56, flipping the direction's sign)."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(20, 6, generator=g)
    code = LogitCode.fit(logits, 2, 0.5)
    assert code.steps[0] == 0.5  # not widened: the fitted views stay well inside 127 steps
    far = code.mean + torch.tensor([[100.0], [-100.0]]) * code.basis[0]  # +-200 steps along the first direction
    assert code.encode(far)[:, 0].tolist() == [127, -127]


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
    assert served_kl(error, 3.0, 0.03) == 0.03  # a KL at the limit is still within it
    with pytest.raises(InputError, match="at tau 0.5 to 5, not at --tau 0.3"):
        served_kl(error, 0.3, 0.05)
    with pytest.raises(InputError, match="not at --tau 7"):
        served_kl(error, 7.0, 0.05)
    with pytest.raises(InputError, match="tau=0.5 with a mean KL of 0.2 nats, above --max-target-kl 0.05"):
        served_kl(error, 0.7, 0.05)
