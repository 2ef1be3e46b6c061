"""`deit-pipe verify-store`: does this store belong to these shards, and does it still replay?

It refuses a store bound to other shards or another recipe, reports the store's size and bytes per view,
then, for a sample of committed units, rebuilds the views from the shards (digests must match: no
replay drift), re-runs the teacher on them and reports top-1 agreement, the largest stored-logit error
(in fp16 units in the last place: up to about 1 is fp16 rounding) and the KL between the full teacher
distribution and the one rebuilt from the stored top-k. A store made with a random-weights teacher
(weights_sha256 "none") cannot have its teacher rebuilt: only the digests are checked.
"""

from __future__ import annotations

import numpy as np
import torch

from deit_pipe.data.recipe import ViewRecipe
from deit_pipe.data.view_dataset import ViewDataset
from deit_pipe.data.view_plan import unit_items
from deit_pipe.data.views import ViewMaker
from deit_pipe.errors import InputError
from deit_pipe.loss.teacher_targets import reconstruction_kl
from deit_pipe.models.registry import NO_WEIGHTS, create_teacher
from deit_pipe.stages.teacher_logits import autocast
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
        max_views_per_unit: int = 64, device: str = "cpu") -> dict:
    manifest, store, recipe = open_bound_store(shards, store_url, split)
    committed = sorted(store.committed_units())
    if not committed:
        raise InputError(f"teacher store {store_url} has no committed units")
    views_stored = sum(len(manifest.shard_range(s)) for s, _ in committed)
    store_bytes = store.nbytes_stored()
    report = {"store_bytes": store_bytes, "views_stored": views_stored, "bytes_per_view": store_bytes / views_stored}

    teacher = store.attrs["teacher"]
    rerun = teacher["weights_sha256"] != NO_WEIGHTS
    dev = torch.device(device)
    if rerun or teacher_weights is not None:
        # Past this check the weights are the store's: a model exists exactly when the teacher is re-run.
        model, sha = create_teacher(teacher["name"], len(manifest.classes), teacher_weights, img_size=recipe.img_size)
        store.check_binding({"teacher": {"weights_sha256": sha}})
        model.to(dev)

    rng = np.random.default_rng(0)
    chosen = [committed[i] for i in sorted(rng.choice(len(committed), min(units, len(committed)), replace=False))]
    maker = ViewMaker(recipe, split)
    # The first batch of each chosen unit is enough to see drift.
    dataset = ViewDataset(shards, maker, [unit_items(maker, manifest, [u], max_views_per_unit, max_items=1)[0]
                                          for u in chosen])

    digests_ok = views = top1_ok = 0
    max_ulps, kls = 0.0, []
    with torch.inference_mode():
        for pieces, batch, _ in (dataset[i] for i in range(len(dataset))):
            (piece,) = pieces
            stored = store.read_unit(piece.shard, piece.v)
            rows = np.asarray(piece.positions)
            views += len(rows)
            digests_ok += int((batch.digest.numpy() == stored.digest[rows].astype(np.int64)).sum())
            if not rerun:
                continue
            with autocast(dev, teacher["precision"]):
                logits = model(batch.images.to(dev)).float().cpu()
            top1_ok += int((logits.argmax(1).numpy() == stored.classes[rows, 0]).sum())
            recomputed = np.take_along_axis(logits.numpy(), stored.classes[rows].astype(np.int64), axis=1)
            max_ulps = max(max_ulps, float(fp16_ulps(stored.logits[rows], recomputed).max()))
            kls.append(reconstruction_kl(logits, store.k, 1.0))
    report.update({"views_checked": views, "digest_match_rate": digests_ok / views, "teacher_rerun": rerun})
    if rerun:
        kl = torch.cat(kls)
        report.update({
            "top1_match_rate": top1_ok / views,
            "max_logit_error_fp16_ulps": max_ulps,
            "topk_kl_mean": kl.mean().item(),
            "topk_kl_max": kl.max().item(),
        })
    return report


def fp16_ulps(stored: np.ndarray, recomputed: np.ndarray) -> np.ndarray:
    """|stored - recomputed| in units of the fp16 spacing at the stored value: <= 0.5 is exact rounding."""
    stored = stored.astype(np.float16)
    return np.abs(stored.astype(np.float64) - recomputed) / np.spacing(np.abs(stored)).astype(np.float64)
