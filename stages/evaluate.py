"""`deit-pipe eval`: top-1/top-5 of a weights file on a split of the shards, of the averaged heads and of each
head of a distilled DeiT.

The weights are a deit-pipe export (its metadata rebuilds the model) or a timm checkpoint (`model` names the
architecture); `img_size` evaluates at another size than theirs (a ViT rebuilt with its position embeddings
resampled, a convnet as it is). Images go through timm validate.py's transform for the model: resized to
img_size / crop_pct and centre-cropped, with the crop_pct, interpolation, mean and std of the model's pretrained
config. Images of <= 32 px follow the view recipe's small-image rule instead (centre crop/pad, no resize), so a
32 px export scores what its training run's last evaluation did. Each rank scores its share of the shards,
`accuracy` sums over ranks, and rank 0 writes the report as JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from timm.data import resolve_input_data_config
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from deit_pipe.choices import Precision, check
from deit_pipe.data.recipe import SMALL_IMAGES, ViewRecipe
from deit_pipe.data.view_dataset import EvalDataset
from deit_pipe.distributed import deepspeed_engine
from deit_pipe.distributed.context import RankContext, loader_workers
from deit_pipe.errors import InputError
from deit_pipe.models.registry import LoadedWeights, is_distilled, student_from_weights
from deit_pipe.reporting.metrics import accuracy
from deit_pipe.storage.location import check_writable, put_atomic
from deit_pipe.storage.manifest import ShardManifest


@dataclass(frozen=True)
class EvalConfig:
    shards: str
    weights: str
    model: str | None = None  # the timm architecture of a checkpoint without deit-pipe metadata
    img_size: int | None = None  # evaluate at this size instead of the weights' own
    crop_pct: float | None = None  # None: the model's (timm's pretrained config); DeiT's main.py evaluates at 0.875
    split: str = "val"
    batch_size: int = 64  # images per batch and rank
    workers: int | None = None  # loader processes per rank; None: as train's
    precision: str = "fp32"  # bf16: model and images cast, as a bf16 training run evaluates
    output: str | None = None  # the JSON report; None: beside the weights

    def __post_init__(self):
        object.__setattr__(self, "precision", check(Precision, self.precision, "--precision"))

    @property
    def output_url(self) -> str:
        return self.output or os.path.splitext(self.weights)[0] + ".eval.json"


@dataclass(frozen=True)
class EvalInputs:
    """What an evaluation needs: the split's manifest, the model with its weights loaded, the eval transform and
    timm's data config it was built from."""

    manifest: ShardManifest
    model: nn.Module
    weights: LoadedWeights
    transform: Callable
    data_config: dict


def architecture(model: nn.Module) -> str:
    return model.pretrained_cfg["architecture"]


def prepare(cfg: EvalConfig) -> EvalInputs:
    """Everything an evaluation needs, refusing bad input in one line; cheap, so a launcher runs it before
    starting any rank and each rank runs it again."""
    manifest = ShardManifest.load(cfg.shards, cfg.split)
    model, weights = student_from_weights(cfg.weights, len(manifest.classes), cfg.model, cfg.img_size)
    transform, data_config = model_transform(model, cfg.img_size, cfg.crop_pct)
    try:  # before the evaluation, not after it
        check_writable(os.path.dirname(cfg.output_url) or ".")
    except InputError as exc:
        raise InputError(f"{exc} (the report {cfg.output_url}: choose another place with --output)") from None
    return EvalInputs(manifest, model, weights, transform, data_config)


def model_transform(model: nn.Module, img_size: int | None = None,
                    crop_pct: float | None = None) -> tuple[Callable, dict]:
    """timm validate.py's eval transform for `model`, and the data config it is built from: the model's input size
    (a convnet's `img_size` when given), with the crop_pct, crop mode, interpolation, mean and std of its
    pretrained config (the test-time ones where it has them, as validate.py), or `crop_pct` when given. Built by
    the recipe's eval transform, so images of <= 32 px follow its small-image rule as a training run's evaluation
    does."""
    try:
        config = resolve_input_data_config(model, {"img_size": img_size, "crop_pct": crop_pct}, use_test_size=True)
    except ValueError as exc:  # a fixed-size model other than a ViT/DeiT, asked for another size
        raise InputError(f"--img-size {img_size}: {exc}") from None
    recipe = ViewRecipe(img_size=config["input_size"][-1], mean=config["mean"], std=config["std"],
                        interpolation=config["interpolation"])
    return recipe.eval_transform(config["crop_pct"], config["crop_mode"]), config


def run(cfg: EvalConfig) -> dict | None:
    """The report, written to cfg.output_url by rank 0 (the other ranks return None)."""
    ctx = RankContext.from_env()
    inputs = prepare(cfg)
    device = deepspeed_engine.select_accelerator(ctx)
    deepspeed_engine.init_distributed(device)  # accuracy() sums the ranks' counts
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    model = inputs.model.to(device, dtype).eval()
    heads = ("avg", "cls", "dist") if is_distilled(model) else ("avg",)
    data = EvalDataset.for_rank(cfg.shards, inputs.manifest, ctx, inputs.transform, cfg.batch_size)
    workers = cfg.workers if cfg.workers is not None else loader_workers(ctx)
    loader = DataLoader(data, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda")
    batches = tqdm(loader, desc=f"eval {cfg.split}", unit="batch", leave=False, disable=not ctx.is_main or None)
    scores = accuracy(model, batches, heads, device, dtype)
    if not ctx.is_main:
        return None
    report = _report(cfg, inputs, ctx.world_size, scores)
    put_atomic(cfg.output_url, (json.dumps(report, indent=1) + "\n").encode())
    return report


def _report(cfg: EvalConfig, inputs: EvalInputs, ranks: int, scores: dict[str, float]) -> dict:
    config, grid = inputs.data_config, inputs.weights.pos_grid
    img_size = config["input_size"][-1]
    return {
        "weights": cfg.weights,
        "weights_sha256": inputs.weights.sha256,
        "model": architecture(inputs.model),
        "img_size": img_size,
        # Small images are not resized: no crop fraction applies.
        "crop_pct": config["crop_pct"] if img_size > SMALL_IMAGES else None,
        "interpolation": config["interpolation"],
        "mean": list(config["mean"]),
        "std": list(config["std"]),
        "pos_grid": {"weights": list(grid[0]), "model": list(grid[1])} if grid else None,  # when resampled
        "split": cfg.split,
        "images": inputs.manifest.num_samples,
        "ranks": ranks,
        "precision": cfg.precision,
        "output": cfg.output_url,
        **scores,
    }


def summary(report: dict) -> list[str]:
    """The report as a few lines: what was scored, how, and each head's top-1/top-5."""
    transform = (f"resize + centre crop, crop_pct {report['crop_pct']:g}, {report['interpolation']}"
                 if report["crop_pct"] is not None else f"centre crop/pad without resize (<= {SMALL_IMAGES} px)")
    ranks = f"{report['ranks']} rank{'s' if report['ranks'] > 1 else ''}"
    lines = [f"{report['model']}, {report['img_size']} px: {transform}; {report['precision']}; "
             f"{report['split']} split, {report['images']} images on {ranks}",
             f"{'head':<6}{'top-1':>9}{'top-5':>9}"]
    heads = [key.removesuffix("_top1") for key in report if key.endswith("_top1")]
    lines += [f"{head:<6}{report[f'{head}_top1']:>9.3f}{report[f'{head}_top5']:>9.3f}" for head in heads]
    return [*lines, f"wrote {report['output']}"]
