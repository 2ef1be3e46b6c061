"""Evaluation and the reductions behind the numbers a run logs.

`Evaluation` scores a run's engine on the whole val split at each epoch end, each rank reading its share of the
shards; `accuracy` sums the hits of every rank.

Every tensor handed to a collective lives on the engine's device: NCCL reduces CUDA tensors only (gloo
takes either), so a CPU tensor would end a GPU run at its first epoch end. Counts accumulate on the
device too, so an evaluation syncs with the host once, not once per batch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from deit_pipe.data.view_dataset import EvalDataset
from deit_pipe.distributed.context import RankContext
from deit_pipe.distributed.deepspeed_engine import full_parameters, input_dtype
from deit_pipe.models.registry import head_logits
from deit_pipe.storage.manifest import ShardManifest


def mean_over_ranks(values: list[float | torch.Tensor], device: torch.device) -> float | None:
    """The mean of every rank's values (ranks may hold different numbers of them; 0-d tensors stay on the device
    until this one reduction); None when no rank has any."""
    total = torch.tensor([0.0, len(values)], dtype=torch.float64, device=device)
    for value in values:
        total[0] += value
    dist.all_reduce(total)
    value_sum, count = total.tolist()
    return value_sum / count if count else None


@torch.no_grad()
def accuracy(module: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], heads: tuple[str, ...],
             device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """top-1/top-5 (%) of each head in `heads` ("avg", "cls", "dist"), summed over every rank's batches.

    The module runs in its current mode (call module.eval() first)."""
    counts = torch.zeros(len(heads), 3, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, images
    # Label -1 marks padding (a rank's extra batches, run so that ranks run as many forwards): never counted.
    for images, labels in batches:
        labels = labels.to(device)
        logits = head_logits(module, images.to(device, dtype))
        for row, head in enumerate(heads):
            top5 = logits[head].float().topk(min(5, logits[head].shape[1]), dim=1).indices
            hit = top5 == labels[:, None]
            counts[row, 0] += hit[:, 0].sum()
            counts[row, 1] += hit.any(dim=1).sum()
            counts[row, 2] += (labels >= 0).sum()
    dist.all_reduce(counts)
    result = {}
    for head, (top1, top5, images) in zip(heads, counts.tolist(), strict=True):
        result[f"{head}_top1"] = 100.0 * top1 / max(images, 1.0)
        result[f"{head}_top5"] = 100.0 * top5 / max(images, 1.0)
    return result


class Evaluation:
    """top-1/top-5 of the averaged heads, and of each head for a distilled student, over a whole val split."""

    def __init__(self, shards: str, manifest: ShardManifest, ctx: RankContext, transform, batch_size: int,
                 workers: int, distilled: bool, device: torch.device):
        self.device = device
        self.heads = ("avg", "cls", "dist") if distilled else ("avg",)
        data = EvalDataset.for_rank(shards, manifest, ctx, transform, batch_size)
        # Persistent workers: started at the first evaluation, not at every one.
        self.loader = DataLoader(data, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                                 pin_memory=device.type == "cuda")

    def close(self) -> None:
        """Stop the persistent workers (see data.view_dataset.TrainViews.close)."""
        self.loader = None

    def __call__(self, engine, zero: int) -> dict[str, float]:
        module = engine.module
        module.eval()
        with full_parameters(engine, zero):
            result = accuracy(module, self.loader, self.heads, self.device, input_dtype(engine))
        module.train()
        return result
