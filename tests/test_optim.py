"""DeiT's optimizer groups and learning-rate schedule, against DeiT's main.py written out by hand.

DeiT (main.py with timm's create_optimizer / create_scheduler): AdamW, eps 1e-8; no weight decay on the
names model.no_weight_decay() returns, on 1-D parameters or on biases; lr x batch x world / 512; timm's
cosine scheduler stepped after each epoch with that epoch's number, so epochs 0 and 1 train at warmup_lr
and epoch e >= 1 at the value for e - 1: warmup_lr + t (peak - warmup_lr) / warmup for t < warmup, then
min_lr + (peak - min_lr) (1 + cos(pi t / epochs)) / 2, t not shifted by the warmup.
"""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

from deit_pipe.models.registry import create_student
from deit_pipe.optim.schedule import LRSchedule, adamw

NO_DECAY_NAMES = {"pos_embed", "cls_token", "dist_token"}


def tiny_distilled_deit() -> torch.nn.Module:
    return create_student("deit_tiny_distilled_patch16_224", 10, img_size=32, patch_size=4, depth=2, embed_dim=64,
                          num_heads=4)


def test_weight_decay_spares_tokens_position_embedding_biases_and_norms():
    model = tiny_distilled_deit()
    optimizer = adamw(model, lr=1e-3, weight_decay=0.05)
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    expected = {name: 0.0 if (name in NO_DECAY_NAMES or p.ndim <= 1 or name.endswith(".bias")) else 0.05
                for name, p in model.named_parameters()}
    assert {name: decay_of[id(p)] for name, p in model.named_parameters()} == expected
    # Spelled out for the names a reader looks for first.
    assert expected["pos_embed"] == expected["cls_token"] == expected["dist_token"] == 0.0
    assert expected["blocks.0.norm1.weight"] == expected["blocks.0.attn.qkv.bias"] == 0.0
    assert expected["blocks.0.attn.qkv.weight"] == expected["patch_embed.proj.weight"] == 0.05
    assert expected["head.weight"] == expected["head_dist.weight"] == 0.05
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(g["eps"] == 1e-8 and g["betas"] == (0.9, 0.999) for g in optimizer.param_groups)


def deit_lr(epoch: int, peak: float, warmup_lr=1e-6, min_lr=1e-5, warmup=5, epochs=300) -> float:
    t = max(epoch - 1, 0)
    if t < warmup:
        return warmup_lr + t * (peak - warmup_lr) / warmup
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * t / epochs))


def lr_at(schedule: LRSchedule, global_batch: int, epoch: int, step: int = 0, steps: int = 100) -> float:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=schedule.peak(global_batch))
    schedule.scheduler(optimizer).step(schedule.position(epoch, step, steps))
    return optimizer.param_groups[0]["lr"]


def test_lr_scales_with_the_global_batch_and_follows_deits_epoch_steps():
    schedule = LRSchedule()  # DeiT's defaults
    assert schedule.peak(1024) == pytest.approx(1e-3)  # DeiT's 64 x 16 GPUs
    for epoch in [0, 1, 2, 3, 5, 6, 7, 50, 150, 298, 299]:
        assert lr_at(schedule, 1024, epoch, step=37) == pytest.approx(deit_lr(epoch, 1e-3), rel=1e-9), epoch
    assert lr_at(schedule, 1024, 0) == lr_at(schedule, 1024, 1) == pytest.approx(1e-6)
    # The cosine runs down: after the warmup every epoch trains at a lower rate than the one before.
    rates = [lr_at(schedule, 1024, e) for e in range(6, 300)]
    assert all(a > b for a, b in pairwise(rates))
    assert rates[0] == pytest.approx(1e-3, rel=1e-3)


def test_per_step_evaluates_the_same_curve_at_fractional_epochs():
    schedule = LRSchedule(base_lr=4e-3, warmup_lr=1e-6, min_lr=1e-5, warmup_epochs=1, epochs=9, per_step=True)
    peak = schedule.peak(128)
    assert lr_at(schedule, 128, 0, 0, 10) == pytest.approx(1e-6)
    assert lr_at(schedule, 128, 0, 5, 10) == pytest.approx(1e-6 + 0.5 * (peak - 1e-6))
    t = 4 + 3 / 10
    assert lr_at(schedule, 128, 4, 3, 10) == pytest.approx(1e-5 + 0.5 * (peak - 1e-5) * (1 + math.cos(math.pi * t / 9)))


def test_adamw_defaults_to_deits_weight_decay_and_keeps_the_given_lr():
    """DeiT's weight decay 0.05 when none is given (on the weight; never on the bias); the lr is the one
    passed, not torch's default of 1e-3."""
    layer = torch.nn.Linear(3, 2)
    optimizer = adamw(layer, lr=2.5e-4)
    decay_of = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    assert decay_of == {id(layer.weight): (2.5e-4, 0.05), id(layer.bias): (2.5e-4, 0.0)}


def test_one_cosine_cycle_then_min_lr():
    """One cosine cycle (cycle_limit 1, what timm's create_scheduler gives DeiT's main.py): from `epochs` on
    the rate stays at min_lr, with no warm restart at the peak."""
    schedule = LRSchedule(warmup_epochs=2, epochs=10)
    for epoch in [11, 12, 16, 21]:  # scheduler positions 10, 11, 15, 20
        assert lr_at(schedule, 512, epoch) == pytest.approx(1e-5, rel=1e-12), epoch
