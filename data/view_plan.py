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
    """Each unit (shard, view) cut along its cycle into pieces of `batch` (its last one shorter). The units of one
    shard whose views share a pairing (a block of the recipe's pairing_views) walk one cycle, so their cuts are
    the same: item j holds each of their j-th pieces, and a loader decodes a sample once for all of them.

    A piece never spans two units and the teacher scores each piece alone, so what a unit's views go through
    (the teacher's batches, and with them the rounding of its kernels) depends on the unit alone: not on which
    rank runs it, which units were already done, or a resume point.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for shard, v in units:
        groups.setdefault((shard, maker.pairing_block(v)), []).append(v)
    items: list[list[ViewPiece]] = []
    for (shard, _), views in groups.items():
        order = cycle_order(maker, manifest, shard, views[0])
        for start in range(0, len(order), batch):
            items.append([ViewPiece(shard, v, tuple(order[start : start + batch])) for v in views])
            if max_items is not None and len(items) == max_items:
                return items
    return items
