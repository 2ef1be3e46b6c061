"""`deit-pipe teacher-logits`: the teacher runs once over every (sample, view) and its top-k is stored.

Rank 0 lays out the store (or checks and grows an existing one) and the other ranks wait for it; each
rank then takes its image shards, and for every view not yet committed its loader workers rebuild the
mixed views from the shard (the same code the student's loader runs), the teacher scores them, and the
unit (shard, view) is written as one chunk per array and committed. A rerun redoes uncommitted units
only; a larger --views appends views without touching the existing ones.

Before the layout, rank 0 fits the store's logit code (loss.teacher_targets.LogitCode) on the teacher's
logits for view 0 of the first samples, holding every fifth view out to measure what the code costs: the
mean KL between the teacher's distribution and the rebuilt one at each temperature in ERROR_TAUS, which
the store records and readers check against the temperature they train with.

The teacher runs in fp32 by default: measured on the demo's teacher, a bf16 (or fp16) forward changes the
stored fp16 logits on most entries and flips the top-1 of 1-2% of views, in a store paid for once and
reused by every student (bench/teacher_precision.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import deit_pipe
from deit_pipe.choices import Precision, check
from deit_pipe.data.recipe import ViewRecipe
from deit_pipe.data.view_dataset import ViewDataset
from deit_pipe.data.view_plan import unit_items
from deit_pipe.data.views import VIEW_DIGEST, ViewMaker
from deit_pipe.distributed.context import RankContext, rank_device
from deit_pipe.errors import InputError
from deit_pipe.loss.teacher_targets import LogitCode, StoreEntry, rebuild_kl
from deit_pipe.models.precision import device_kind, inference_precision, teacher_on
from deit_pipe.models.registry import create_teacher
from deit_pipe.storage.lease import launch_lease
from deit_pipe.storage.location import check_writable, join
from deit_pipe.storage.manifest import ShardManifest
from deit_pipe.storage.teacher_store import GROWABLE_VERSIONS, TeacherStore, ViewRecord, store_binding

# Temperatures at which a store measures the KL its code costs (a reader's tau must lie within them).
ERROR_TAUS = (0.5, 1.0, 2.0, 3.0, 4.0, 5.0)


@dataclass(frozen=True)
class TeacherSpec:
    name: str
    weights: str | None
    precision: str = "fp32"  # fp32 | bf16

    def __post_init__(self):
        object.__setattr__(self, "precision", check(Precision, self.precision, "--precision"))


@dataclass(frozen=True)
class CodeSpec:
    """The store's logit code: rank (coordinates per view), quantisation step, views it is fitted on."""

    rank: int = 256
    step: float = 0.7
    fit_views: int = 4096

    def held_out(self, num_samples: int) -> torch.Tensor:
        """[pool] bool over the views the code is fitted from: every fifth measures its cost (none if < 5)."""
        held = torch.zeros(min(self.fit_views, num_samples), dtype=torch.bool)
        held[4::5] = len(held) >= 5
        return held

    def binding(self, num_samples: int, num_classes: int) -> dict:
        fitted = int((~self.held_out(num_samples)).sum())
        return {"kind": "pca-int8", "rank": max(0, min(self.rank, num_classes, fitted - 1)), "step": self.step,
                "fit_views": fitted}


def teacher_logits(model: torch.nn.Module, images: torch.Tensor, device: torch.device, precision: str) -> torch.Tensor:
    """float32 logits on the CPU."""
    with inference_precision(device, precision):
        return model(images.to(device, non_blocking=True)).float().cpu()


def fit_code(model, device, teacher: TeacherSpec, spec: CodeSpec, k: int, maker: ViewMaker, manifest: ShardManifest,
             shards: str, batch_size: int, workers: int) -> tuple[LogitCode, dict]:
    """(the code, its measured cost): fitted on view 0 of the first fit_views samples but every fifth."""
    held = spec.held_out(manifest.num_samples)
    pool = len(held)
    units = [(s, 0) for s in range(manifest.shard_of(pool - 1) + 1)]
    loader = DataLoader(ViewDataset(shards, manifest, maker, unit_items(maker, manifest, units, batch_size)),
                        batch_size=None, num_workers=workers)
    with torch.inference_mode():
        logits = torch.cat([teacher_logits(model, batch.images, device, teacher.precision)
                            for _, batch, _ in tqdm(loader, desc="fitting the logit code", unit="batch", disable=None)])
    logits = logits[:pool]
    code = LogitCode.fit(logits[~held], spec.rank, spec.step)
    measured = logits[held] if held.any() else logits
    entry = StoreEntry.from_logits(measured, k, code)
    error = {"views": len(measured),
             "kl_mean": [[tau, rebuild_kl(measured, entry, code, tau).mean().item()] for tau in ERROR_TAUS]}
    return code, error


def teacher_binding(spec: TeacherSpec, weights_sha256: str, recipe: ViewRecipe) -> dict:
    return {
        "name": spec.name,
        "weights_sha256": weights_sha256,
        "input": {"img_size": recipe.img_size, "mean": list(recipe.mean), "std": list(recipe.std),
                  "interpolation": recipe.interpolation},
        "precision": spec.precision,
    }


def provenance(recipe: ViewRecipe, device: torch.device) -> dict:
    import timm
    import zarr

    return {
        "recipe": recipe.to_dict(),
        "view_digest": VIEW_DIGEST,
        "device": device_kind(device),
        "versions": {"deit_pipe": deit_pipe.__version__, "torch": torch.__version__,
                     "timm": timm.__version__, "zarr": zarr.__version__},
    }


def open_store(store_url: str, manifest: ShardManifest, binding: dict, views: int, recipe: ViewRecipe,
               device: torch.device, ctx: RankContext, fit) -> TeacherStore:
    """Rank 0 creates (fitting the code with `fit()`) or checks and grows the store; the other ranks wait for
    its layout.

    Every rank checks an existing store before waiting, so a mismatch stops them all, not rank 0 alone.
    """
    split, recipe_dict = manifest.split, recipe.to_dict()
    if TeacherStore.exists(store_url, split):
        store = TeacherStore.open(store_url, split, writable=True)
        store.check_binding(_grown_as_it_is(binding, store), recipe_dict)
        if store.num_views >= views:
            return store  # nothing to grow: no rank waits for a layout marker of fewer views, none is written
        if ctx.is_main:
            store.append_views(views)
    elif ctx.is_main:
        code, error = fit()
        store = TeacherStore.create(store_url, split, binding, views, provenance(recipe, device), code.arrays(), error)
    if not ctx.is_main:
        store = TeacherStore.wait_layout(store_url, split, views)
        store.check_binding(_grown_as_it_is(binding, store), recipe_dict)
    return store


def _grown_as_it_is(binding: dict, store: TeacherStore) -> dict:
    """The binding an existing store must match: a store of an older version this one can grow keeps it."""
    version = store.attrs.get("format_version")
    return {**binding, "format_version": version} if version in GROWABLE_VERSIONS else binding


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
    code: CodeSpec = CodeSpec(),
) -> dict:
    ctx = RankContext.from_env()
    manifest = ShardManifest.load(shards, split)
    check_writable(store_url)  # a missing bucket is one line here, not a traceback from the store's layout
    num_classes = len(manifest.classes)
    if views < 1:
        raise InputError(f"--views must be at least 1, not {views}")
    if not 1 <= k <= num_classes:
        raise InputError(f"--topk {k} must be between 1 and the number of classes ({num_classes})")
    # One launch at a time writes a split: a double-submitted job refuses here, before it lays out or writes.
    with launch_lease(join(store_url, split), f"the teacher store {store_url} (split {split})", ctx.is_main,
                      ctx.launch):
        return _fill_store(shards, store_url, manifest, teacher, recipe, views, k, batch_size, workers, device, code,
                           ctx)


def _fill_store(shards: str, store_url: str, manifest: ShardManifest, teacher: TeacherSpec, recipe: ViewRecipe,
                views: int, k: int, batch_size: int, workers: int, device: str, code: CodeSpec,
                ctx: RankContext) -> dict:
    """Lay out or open the store, then score and write this rank's units not yet committed."""
    split, num_classes = manifest.split, len(manifest.classes)
    dev = rank_device(device, ctx)
    model, weights_sha = create_teacher(teacher.name, num_classes, teacher.weights, img_size=recipe.img_size)
    model = teacher_on(model, dev).eval()
    binding = store_binding(manifest, recipe.hash(), teacher_binding(teacher, weights_sha, recipe), num_classes, k,
                            code.binding(manifest.num_samples, num_classes))
    maker = ViewMaker(recipe, split)
    store = open_store(store_url, manifest, binding, views, recipe, dev, ctx, lambda: fit_code(
        model, dev, teacher, code, k, maker, manifest, shards, batch_size, workers))
    logit_code = LogitCode.of_store(store)
    maker = ViewMaker.for_store(recipe, split, store.attrs)  # views appended keep the store's digest

    done = store.committed_units()
    units = [(s, v) for s in ctx.my_units(list(range(manifest.num_shards))) for v in range(views) if (s, v) not in done]
    # The teacher's batches (pieces) stay inside a unit, so the store's bytes do not depend on how ranks or resumes
    # split the units, nor on which units share an item.
    dataset = ViewDataset(shards, manifest, maker, unit_items(maker, manifest, units, batch_size))
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=False)

    pending: dict[tuple[int, int], UnitBuffer] = {}
    written = 0
    bar = tqdm(total=sum(len(manifest.shard_range(s)) for s, _ in units), unit="view", unit_scale=True,
               desc=f"teacher-logits rank {ctx.rank}", disable=None)
    with torch.inference_mode():
        for pieces, batch, _ in loader:
            start = 0
            for piece in pieces:
                rows = slice(start, start + len(piece.positions))
                start = rows.stop
                # Piece by piece: a unit's batches (and so its bytes) do not depend on the units in its items.
                entry = StoreEntry.from_logits(teacher_logits(model, batch.images[rows], dev, teacher.precision), k,
                                               logit_code)
                key = (piece.shard, piece.v)
                unit = pending.setdefault(key, UnitBuffer(len(manifest.shard_range(piece.shard)), k, logit_code.rank))
                if unit.put(piece.positions, entry, batch, rows):
                    store.write_unit(piece.shard, piece.v, unit.record())
                    del pending[key]
            bar.update(len(batch.idx))
            written += len(batch.idx)
    bar.close()
    return {"rank": ctx.rank, "units_written": len(units), "views_written": written,
            "store_bytes": store.nbytes_stored(), "views_total": manifest.num_samples * views}


class UnitBuffer:
    """Collects one (shard, view) unit's rows, which arrive in mixing-cycle order, until it is whole."""

    def __init__(self, n: int, k: int, rank: int):
        self.arrays = {
            "logits": np.zeros((n, k), np.float16),
            "classes": np.zeros((n, k), np.int32),
            "tail_lse": np.zeros(n, np.float32),
            "code": np.zeros((n, rank), np.int8),
            "partner": np.zeros(n, np.int32),
            "lam": np.zeros(n, np.float32),
            "digest": np.zeros(n, np.uint32),
        }
        self.missing = n

    def put(self, positions, entry: StoreEntry, batch, rows: slice) -> bool:
        """The store entries `entry` and rows `rows` of the batch are this unit's `positions`."""
        at = np.asarray(positions)
        a = self.arrays
        for name, values in (("logits", entry.topk_logits), ("classes", entry.topk_classes),
                             ("tail_lse", entry.tail_lse), ("code", entry.codes)):
            a[name][at] = values.numpy()
        for name in ("partner", "lam", "digest"):
            a[name][at] = getattr(batch, name)[rows].numpy()
        self.missing -= len(at)
        return self.missing == 0

    def record(self) -> ViewRecord:
        return ViewRecord(**self.arrays)
