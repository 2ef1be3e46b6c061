"""`deit-pipe verify-store`: does this store belong to these shards, and does it still replay?

It refuses a store bound to other shards or another recipe, reports the store's size and bytes per view,
then, for a sample of committed units, rebuilds the views from the shards (digests must match: no
replay drift), re-runs the teacher on them and reports top-1 agreement, the largest stored-logit error
(in fp16 units in the last place: up to about 1 is fp16 rounding) and, at each temperature asked for, the
KL between the teacher's distribution and the one rebuilt from the stored entry (top-k and logit code).
A store made with a random-weights teacher
(weights_sha256 "none") cannot have its teacher rebuilt: only the digests are checked.
"""

from __future__ import annotations

import numpy as np
import torch

from deit_pipe.data.recipe import ViewRecipe
from deit_pipe.data.rng import permutation
from deit_pipe.data.view_dataset import ViewDataset
from deit_pipe.data.view_plan import unit_items
from deit_pipe.data.views import ViewMaker
from deit_pipe.distributed.context import RankContext, rank_device
from deit_pipe.errors import InputError
from deit_pipe.loss.teacher_targets import LogitCode, StoreEntry, rebuild_kl
from deit_pipe.models.precision import teacher_on
from deit_pipe.models.registry import NO_WEIGHTS, create_teacher
from deit_pipe.stages.teacher_logits import teacher_logits
from deit_pipe.storage.manifest import ShardManifest
from deit_pipe.storage.teacher_store import TeacherStore


def open_bound_store(shards: str, store_url: str, split: str) -> tuple[ShardManifest, TeacherStore, ViewRecipe]:
    """The manifest, the store and its view recipe, refusing a store made from other shards."""
    manifest = ShardManifest.load(shards, split)
    store = TeacherStore.open(store_url, split)
    recipe = ViewRecipe.from_dict(store.attrs["provenance"]["recipe"])
    store.check_binding({
        "split": split,
        "manifest_digest": manifest.digest,
        "num_samples": manifest.num_samples,
        "samples_per_shard": manifest.samples_per_shard,
        "recipe_hash": recipe.hash(),
        "num_classes": len(manifest.classes),
    }, recipe.to_dict())
    return manifest, store, recipe


def run(shards: str, store_url: str, teacher_weights: str | None, split: str = "train", units: int = 4,
        max_views_per_unit: int = 64, device: str = "cpu", taus: tuple[float, ...] = (1.0, 3.0)) -> dict:
    manifest, store, recipe = open_bound_store(shards, store_url, split)
    committed = sorted(store.committed_units())
    if not committed:
        raise InputError(f"teacher store {store_url} has no committed units")
    views_stored = sum(len(manifest.shard_range(s)) for s, _ in committed)
    store_bytes = store.nbytes_stored()
    report = {"store_bytes": store_bytes, "views_stored": views_stored, "bytes_per_view": store_bytes / views_stored}

    teacher = store.attrs["teacher"]
    rerun = teacher["weights_sha256"] != NO_WEIGHTS
    dev = rank_device(device, RankContext.from_env())
    if rerun or teacher_weights is not None:
        # Past this check the weights are the store's: a model exists exactly when the teacher is re-run.
        model, sha = create_teacher(teacher["name"], len(manifest.classes), teacher_weights, img_size=recipe.img_size)
        store.check_binding({"teacher": {"weights_sha256": sha}})
        model = teacher_on(model, dev)

    chosen = [committed[i] for i in sorted(permutation(len(committed), "verify-store")[:units])]
    maker = ViewMaker.for_store(recipe, split, store.attrs)
    # The first batch of each chosen unit is enough to see drift.
    dataset = ViewDataset(shards, manifest, maker,
                          [unit_items(maker, manifest, [u], max_views_per_unit, max_items=1)[0] for u in chosen])

    code = LogitCode.of_store(store)
    digests_ok = views = top1_ok = 0
    max_ulps, kls = 0.0, {tau: [] for tau in taus}
    with torch.inference_mode():
        for pieces, batch, _ in (dataset[i] for i in range(len(dataset))):
            (piece,) = pieces
            stored = store.read_unit(piece.shard, piece.v)
            rows = np.asarray(piece.positions)
            views += len(rows)
            digests_ok += int((batch.digest.numpy() == stored.digest[rows].astype(np.int64)).sum())
            if not rerun:
                continue
            logits = teacher_logits(model, batch.images, dev, teacher["precision"])
            top1_ok += int((logits.argmax(1).numpy() == stored.classes[rows, 0]).sum())
            recomputed = np.take_along_axis(logits.numpy(), stored.classes[rows].astype(np.int64), axis=1)
            max_ulps = max(max_ulps, float(fp16_ulps(stored.logits[rows], recomputed).max()))
            entry = StoreEntry.of_record(stored, rows)
            for tau in taus:
                kls[tau].append(rebuild_kl(logits, entry, code, tau))
    report.update({"views_checked": views, "digest_match_rate": digests_ok / views, "teacher_rerun": rerun})
    if rerun:
        report.update({"top1_match_rate": top1_ok / views, "max_logit_error_fp16_ulps": max_ulps})
        for tau in taus:
            kl = torch.cat(kls[tau])
            report[f"target_kl_mean_tau{tau:g}"] = kl.mean().item()
            report[f"target_kl_max_tau{tau:g}"] = kl.max().item()
    return report


def fp16_ulps(stored: np.ndarray, recomputed: np.ndarray) -> np.ndarray:
    """|stored - recomputed| in units of the fp16 spacing at the stored value: <= 0.5 is exact rounding."""
    stored = stored.astype(np.float16)
    return np.abs(stored.astype(np.float64) - recomputed) / np.spacing(np.abs(stored)).astype(np.float64)
