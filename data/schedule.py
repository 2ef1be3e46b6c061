"""The epoch -> view schedule with repeated augmentation (DESIGN invariant 4).

Epochs come in groups of R (the repeat count). Within group g every shard is visited exactly once,
in one of the group's R epochs (a seeded permutation of the shards, dealt out in R parts), and a
visited shard yields R distinct views of each of its images: v = g*R + r, r = 0..R-1. So an epoch
processes about N views (N/R images, R views each), as DeiT's RASampler does, and E epochs use
ceil(E/R)*R views per sample: 300 for DeiT's 300 epochs, whatever R.

Within an epoch the visited shards are dealt to ranks round-robin; each rank's batches walk its
shards one view at a time (data.view_plan.stream_items), and every rank stops after the same number
of steps: the smallest rank's count. Everything is a pure function of (seed, epoch, world size).
"""

from __future__ import annotations

import numpy as np

from deit_pipe.errors import InputError
from deit_pipe.storage.manifest import ShardManifest


def views_needed(epochs: int, repeats: int) -> int:
    return -(-epochs // repeats) * repeats


def epoch_shards(num_shards: int, epoch: int, repeats: int, seed: int) -> list[int]:
    group = epoch // repeats
    order = np.random.RandomState([seed, group, 0x5EED]).permutation(num_shards)
    return sorted(int(s) for s in order[epoch % repeats :: repeats])


def epoch_views(epoch: int, repeats: int, num_views: int | None, allow_reuse: bool) -> list[int]:
    """The R view indices an epoch uses; past the stored views it is an error unless reuse is asked for."""
    first = (epoch // repeats) * repeats
    views = list(range(first, first + repeats))
    if num_views is not None and views[-1] >= num_views:
        if not allow_reuse:
            raise InputError(
                f"epoch {epoch} needs view {views[-1]} but the teacher store has {num_views} views: run "
                f"`deit-pipe teacher-logits --views {views[-1] + 1}` (or more) or pass --allow-view-reuse"
            )
        views = [v % num_views for v in views]
    return views


def rank_units(manifest: ShardManifest, epoch: int, repeats: int, seed: int, rank: int, world: int,
               num_views: int | None, allow_reuse: bool = False) -> list[tuple[int, int]]:
    """(shard, view) units this rank reads in this epoch, in reading order (seeded by seed and epoch)."""
    shards = epoch_shards(manifest.num_shards, epoch, repeats, seed)
    if len(shards) < world:
        raise InputError(
            f"epoch {epoch} has {len(shards)} shards for {world} ranks: shard with a smaller "
            f"--samples-per-shard, use fewer --repeats or fewer ranks"
        )
    mine = shards[rank::world]
    order = np.random.RandomState([seed, epoch, rank, 0x0DE]).permutation(len(mine))
    views = epoch_views(epoch, repeats, num_views, allow_reuse)
    return [(mine[i], v) for i in order for v in views]


def steps_per_epoch(manifest: ShardManifest, epoch: int, repeats: int, seed: int, world: int, batch: int,
                    grad_accum: int = 1) -> int:
    """Every rank's step count: the smallest rank's number of full batches, rounded down to whole gradient
    accumulations so that no optimizer step spans two epochs."""
    shards = epoch_shards(manifest.num_shards, epoch, repeats, seed)
    per_rank = [sum(len(manifest.shard_range(s)) for s in shards[r::world]) * repeats for r in range(world)]
    return min(per_rank) // (batch * grad_accum) * grad_accum
