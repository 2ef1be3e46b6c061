"""Evaluation counts and the reductions behind logged numbers (reporting/metrics.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from deit_pipe.models.registry import create_student
from deit_pipe.reporting import metrics


class _Reduced(Exception):
    pass


@pytest.fixture
def collective_devices(monkeypatch):
    """dist.all_reduce replaced by a recorder of each tensor's device that stops the caller right there
    (a meta tensor has no values to read back)."""
    seen: list[torch.device] = []

    def record(tensor, *args, **kwargs):
        seen.append(tensor.device)
        raise _Reduced

    monkeypatch.setattr(dist, "all_reduce", record)
    return seen


def tiny_deit(num_classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_student("deit_tiny_distilled_patch16_224", num_classes, img_size=32, patch_size=4, depth=1,
                          embed_dim=32, num_heads=2, drop_path_rate=0.0)


def test_collectives_get_tensors_on_the_engines_device(collective_devices):
    """A GPU run's first epoch end: NCCL has no CPU all-reduce. The meta device stands in for cuda here."""
    meta = torch.device("meta")
    model = tiny_deit().to(meta).eval()
    batches = [(torch.zeros(4, 3, 32, 32), torch.arange(4))]
    with pytest.raises(_Reduced):
        metrics.accuracy(model, batches, ("avg", "cls", "dist"), meta)
    with pytest.raises(_Reduced):
        metrics.mean_over_ranks([1.0, 2.0], meta)
    assert collective_devices == [meta, meta]


def test_accuracy_of_each_head_against_timms_own_outputs(monkeypatch):
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **k: None)  # one rank: the sum is the tensor
    model = tiny_deit()
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model.set_distilled_training(True)
    with torch.no_grad():
        model.train()
        cls, dist_logits = (t.numpy() for t in model(images))  # timm: (cls, dist) in distilled training mode
        model.eval()
        avg = model(images).numpy()  # timm: the heads' average at eval
    # Labels the class head gets right for 12 images and the distillation head for the other 4.
    labels = np.concatenate([cls[:12].argmax(1), dist_logits[12:].argmax(1)])

    def by_hand(logits):
        order = np.argsort(-logits, axis=1)
        return 100 * np.mean(order[:, 0] == labels), 100 * np.mean((order[:, :5] == labels[:, None]).any(1))

    batches = [(images[:10], torch.from_numpy(labels[:10])), (images[10:], torch.from_numpy(labels[10:]))]
    result = metrics.accuracy(model, batches, ("avg", "cls", "dist"), torch.device("cpu"))
    for head, logits in (("avg", avg), ("cls", cls), ("dist", dist_logits)):
        top1, top5 = by_hand(logits)
        assert result[f"{head}_top1"] == pytest.approx(top1) and result[f"{head}_top5"] == pytest.approx(top5), head
    assert result["cls_top1"] != result["dist_top1"]  # the heads are told apart


def test_mean_over_ranks_weighs_every_value(monkeypatch):
    def two_ranks(tensor, *args, **kwargs):  # the other rank holds three values summing to 9
        tensor += torch.tensor([9.0, 3.0], dtype=tensor.dtype)

    monkeypatch.setattr(dist, "all_reduce", two_ranks)
    assert metrics.mean_over_ranks([1.0, 2.0], torch.device("cpu")) == pytest.approx(12.0 / 5.0)


def test_padding_labels_count_neither_as_images_nor_as_hits(monkeypatch):
    """Label -1 marks an eval batch a rank runs only to keep pace with the others."""
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **k: None)
    model = tiny_deit().eval()
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        predicted = model(images).argmax(1)
    labels = torch.tensor([predicted[0].item(), (predicted[1].item() + 1) % 10, predicted[2].item()])
    padded = [(images[:3], labels), (images[3:], torch.full((3,), -1))]
    result = metrics.accuracy(model, padded, ("avg",), torch.device("cpu"))
    assert result["avg_top1"] == pytest.approx(100 * 2 / 3)
    assert metrics.accuracy(model, padded[1:], ("avg",), torch.device("cpu"))["avg_top1"] == 0.0


def test_mean_over_ranks_takes_the_losses_as_device_tensors(monkeypatch):
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **k: None)
    assert metrics.mean_over_ranks([torch.tensor(1.0), torch.tensor(2.5)], torch.device("cpu")) == 1.75
    assert metrics.mean_over_ranks([], torch.device("cpu")) is None  # no rank walked a step: no mean
