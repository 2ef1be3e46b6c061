"""`deit-pipe teacher-logits`: the teacher runs once over every (sample, view) and its top-k is stored.

Rank 0 lays out the store (or checks and grows an existing one) and the other ranks wait for it; each
rank then takes its image shards, and for every view not yet committed its loader workers rebuild the
mixed views from the shard (the same code the student's loader runs), the teacher scores them, and the
unit (shard, view) is written as one chunk per array and committed. A rerun redoes uncommitted units
only; a larger --views appends views without touching the existing ones.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import deit_pipe
from deit_pipe.data.recipe import ViewRecipe
from deit_pipe.data.view_dataset import ViewDataset
from deit_pipe.data.view_plan import unit_items
from deit_pipe.data.views import ViewMaker
from deit_pipe.distributed.context import RankContext
from deit_pipe.errors import InputError
from deit_pipe.loss.teacher_targets import compress_teacher_logits
from deit_pipe.models.registry import create_teacher
from deit_pipe.storage.manifest import ShardManifest
from deit_pipe.storage.teacher_store import TeacherStore, ViewRecord, store_binding


@dataclass(frozen=True)
class TeacherSpec:
    name: str
    weights: str | None
    precision: str = "bf16"  # bf16 | fp32


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def teacher_binding(spec: TeacherSpec, weights_sha256: str, recipe: ViewRecipe) -> dict:
    return {
        "name": spec.name,
        "weights_sha256": weights_sha256,
        "input": {"img_size": recipe.img_size, "mean": list(recipe.mean), "std": list(recipe.std),
                  "interpolation": recipe.interpolation},
        "precision": spec.precision,
    }


def provenance(recipe: ViewRecipe) -> dict:
    import timm
    import zarr

    return {
        "recipe": recipe.to_dict(),
        "versions": {"deit_pipe": deit_pipe.__version__, "torch": torch.__version__,
                     "timm": timm.__version__, "zarr": zarr.__version__},
    }


def open_store(store_url: str, manifest: ShardManifest, binding: dict, views: int, recipe: ViewRecipe,
               ctx: RankContext) -> TeacherStore:
    """Rank 0 creates or checks and grows the store; the other ranks wait for its layout.

    Every rank checks an existing store before waiting, so a mismatch stops them all, not rank 0 alone.
    """
    split, recipe_dict = manifest.split, recipe.to_dict()
    if TeacherStore.exists(store_url, split):
        store = TeacherStore.open(store_url, split)
        store.check_binding(binding, recipe_dict)
        if ctx.is_main:
            store.append_views(views)
    elif ctx.is_main:
        store = TeacherStore.create(store_url, split, binding, views, provenance(recipe))
    if not ctx.is_main:
        store = TeacherStore.wait_layout(store_url, split, views)
        store.check_binding(binding, recipe_dict)
    return store


def run(
    shards: str,
    store_url: str,
    teacher: TeacherSpec,
    recipe: ViewRecipe,
    views: int,
    k: int = 10,
    split: str = "train",
    batch_size: int = 64,
    workers: int = 2,
    device: str = "cpu",
) -> dict:
    ctx = RankContext.from_env()
    manifest = ShardManifest.load(shards, split)
    num_classes = len(manifest.classes)
    if views < 1:
        raise InputError(f"--views must be at least 1, not {views}")
    if not 1 <= k <= num_classes:
        raise InputError(f"--topk {k} must be between 1 and the number of classes ({num_classes})")
    dev = torch.device(device)
    model, weights_sha = create_teacher(teacher.name, num_classes, teacher.weights, img_size=recipe.img_size)
    model.to(dev).eval()
    binding = store_binding(manifest, recipe.hash(), teacher_binding(teacher, weights_sha, recipe), num_classes, k)
    store = open_store(store_url, manifest, binding, views, recipe, ctx)

    done = store.committed_units()
    units = [(s, v) for s in ctx.my_units(list(range(manifest.num_shards))) for v in range(views) if (s, v) not in done]
    maker = ViewMaker(recipe, split)
    # Batches stay inside a unit, so the store's bytes do not depend on how ranks or resumes split the units.
    dataset = ViewDataset(shards, maker, unit_items(maker, manifest, units, batch_size))
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=False)

    pending: dict[tuple[int, int], UnitBuffer] = {}
    written = 0
    bar = tqdm(total=sum(len(manifest.shard_range(s)) for s, _ in units), unit="view", unit_scale=True,
               desc=f"teacher-logits rank {ctx.rank}", disable=None)
    with torch.inference_mode():
        for pieces, batch, _ in loader:
            with autocast(dev, teacher.precision):
                logits = model(batch.images.to(dev, non_blocking=True))
            top, cls, lse = (t.cpu().numpy() for t in compress_teacher_logits(logits.float(), k))
            start = 0
            for piece in pieces:
                rows = slice(start, start + len(piece.positions))
                start = rows.stop
                key = (piece.shard, piece.v)
                unit = pending.setdefault(key, UnitBuffer(len(manifest.shard_range(piece.shard)), k))
                if unit.put(piece.positions, rows, top, cls, lse, batch):
                    store.write_unit(piece.shard, piece.v, unit.record())
                    del pending[key]
            bar.update(len(batch.idx))
            written += len(batch.idx)
    bar.close()
    return {"rank": ctx.rank, "units_written": len(units), "views_written": written,
            "store_bytes": store.nbytes_stored(), "views_total": manifest.num_samples * views}


class UnitBuffer:
    """Collects one (shard, view) unit's rows, which arrive in mixing-cycle order, until it is whole."""

    def __init__(self, n: int, k: int):
        self.arrays = {
            "logits": np.zeros((n, k), np.float16),
            "classes": np.zeros((n, k), np.int32),
            "lse": np.zeros(n, np.float32),
            "partner": np.zeros(n, np.int32),
            "lam": np.zeros(n, np.float32),
            "digest": np.zeros(n, np.uint32),
        }
        self.missing = n

    def put(self, positions, rows: slice, top, cls, lse, batch) -> bool:
        """Rows `rows` of the batch and of its teacher outputs are this unit's `positions`."""
        at = np.asarray(positions)
        a = self.arrays
        a["logits"][at], a["classes"][at], a["lse"][at] = top[rows], cls[rows], lse[rows]
        for name in ("partner", "lam", "digest"):
            a[name][at] = getattr(batch, name)[rows].numpy()
        self.missing -= len(at)
        return self.missing == 0

    def record(self) -> ViewRecord:
        return ViewRecord(**self.arrays)
