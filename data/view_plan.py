"""Which views a loader makes, in which order: lists of pieces, each piece a run of one shard's view.

A piece walks the shard's mixing cycle (sample -> its partner -> ...), so a run of n consecutive
pieces' samples needs only n + 1 unmixed views, whatever the batch size. Plans depend only on the
manifest, the recipe and their arguments, never on workers or loader order, so a loader that starts
at item i of a plan (a resumed run) yields exactly what an unbroken run would. Training plans come from
data.schedule; the teacher's come from `unit_items`.
"""

from __future__ import annotations

from dataclasses import dataclass

from deit_pipe.data.views import ViewMaker, cycle_walk
from deit_pipe.storage.manifest import ShardManifest


@dataclass(frozen=True)
class ViewPiece:
    shard: int
    v: int
    positions: tuple[int, ...]  # positions within the shard (storage order = idx order)


def cycle_order(maker: ViewMaker, manifest: ShardManifest, shard: int, v: int) -> list[int]:
    """Shard positions in mixing-cycle order, starting at position 0."""
    return cycle_walk(maker.partner_positions(shard, len(manifest.shard_range(shard)), v))


def unit_items(
    maker: ViewMaker, manifest: ShardManifest, units: list[tuple[int, int]], batch: int, max_items: int | None = None
) -> list[list[ViewPiece]]:
    """Each unit (shard, view) cut along its cycle into batches of `batch` (its last one shorter).

    A batch never spans two units, so what a unit's views go through (the teacher's batches, and with them
    the rounding of its kernels) depends on the unit alone: not on which rank runs it, which units were
    already done, or a resume point.
    """
    items: list[list[ViewPiece]] = []
    for shard, v in units:
        order = cycle_order(maker, manifest, shard, v)
        for start in range(0, len(order), batch):
            items.append([ViewPiece(shard, v, tuple(order[start : start + batch]))])
            if max_items is not None and len(items) == max_items:
                return items
    return items
