"""Top-1 of an exported student computed here with timm alone: the independent side of the tests that check
what a run reports (its eval) and what it exports (its weights)."""

from __future__ import annotations

import safetensors.torch
import timm
import torch

from deit_pipe.data.recipe import ViewRecipe
from deit_pipe.data.views import decode_rgb
from deit_pipe.storage.manifest import ShardManifest, shard_url
from deit_pipe.storage.shards import read_shard


def val_images(shards: str, img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The val split through the recipe's eval transform (timm's centre crop at the view size)."""
    manifest = ShardManifest.load(shards, "val")
    transform = ViewRecipe(img_size=img_size).eval_transform()
    samples = [s for i in range(manifest.num_shards) for s in read_shard(shard_url(shards, "val", i))]
    return torch.stack([transform(decode_rgb(s.image)) for s in samples]), torch.tensor([s.label for s in samples])


def exported_hits(weights, arch: str, overrides: dict, images: torch.Tensor, labels: torch.Tensor,
                  dtype: torch.dtype = torch.float32, num_classes: int = 10) -> dict[str, int]:
    """Images each head of an export gets right ({"avg_top1", "cls_top1", "dist_top1"} for a distilled DeiT,
    {"avg_top1"} otherwise), built with timm, loaded strictly and run in `dtype` as DeepSpeed runs a module
    (bf16: parameters and inputs cast, no autocast). timm returns both of a DeiT's heads only in training mode;
    without drop path that mode computes eval's."""
    state = safetensors.torch.load_file(str(weights))
    model = timm.create_model(arch, num_classes=num_classes, drop_path_rate=0.0, **overrides)
    model.load_state_dict(state)
    distilled = hasattr(model, "set_distilled_training")
    if distilled:
        model.train().set_distilled_training(True)
    else:
        model.eval()
    with torch.no_grad():
        outputs = model.to(dtype)(images.to(dtype))
    if distilled:
        cls_logits, dist_logits = (t.float() for t in outputs)
        heads = {"avg": (cls_logits + dist_logits) / 2, "cls": cls_logits, "dist": dist_logits}
    else:
        heads = {"avg": outputs.float()}
    return {f"{h}_top1": int((logits.argmax(1) == labels).sum()) for h, logits in heads.items()}


def agree_within_one_image(reported: dict, hits: dict[str, int], n: int) -> bool:
    """A run's reported top-1 (percent of n images) against counted hits: rounding on another batch split may
    move one near-tie."""
    return all(abs(round(reported[h] * n / 100) - hits[h]) <= 1 for h in hits)
