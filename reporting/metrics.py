"""Evaluation and the reductions behind the numbers a run logs.

Every tensor handed to a collective lives on the engine's device: NCCL reduces CUDA tensors only (gloo
takes either), so a CPU tensor would end a GPU run at its first epoch end. Counts accumulate on the
device too, so an evaluation syncs with the host once, not once per batch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from deit_pipe.models.registry import head_logits


def mean_over_ranks(values: list[float], device: torch.device) -> float:
    """The mean of every rank's values (ranks may hold different numbers of them)."""
    total = torch.tensor([sum(values), len(values)], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    value_sum, count = total.tolist()
    return value_sum / max(count, 1.0)


@torch.no_grad()
def accuracy(module: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], heads: tuple[str, ...],
             device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """top-1/top-5 (%) of each head in `heads` ("avg", "cls", "dist"), summed over every rank's batches.

    The module runs in its current mode (call module.eval() first)."""
    counts = torch.zeros(len(heads), 3, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, images
    for images, labels in batches:
        labels = labels.to(device)
        logits = head_logits(module, images.to(device, dtype))
        for row, head in enumerate(heads):
            top5 = logits[head].float().topk(min(5, logits[head].shape[1]), dim=1).indices
            hit = top5 == labels[:, None]
            counts[row, 0] += hit[:, 0].sum()
            counts[row, 1] += hit.any(dim=1).sum()
            counts[row, 2] += len(labels)
    dist.all_reduce(counts)
    result = {}
    for head, (top1, top5, images) in zip(heads, counts.tolist(), strict=True):
        result[f"{head}_top1"] = 100.0 * top1 / max(images, 1.0)
        result[f"{head}_top5"] = 100.0 * top5 / max(images, 1.0)
    return result
