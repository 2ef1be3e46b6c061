"""Which views a loader makes, in which order: lists of pieces, each piece a run of one shard's view.

A piece walks the shard's mixing cycle (sample -> its partner -> ...), so a run of n consecutive
pieces' samples needs only n + 1 unmixed views, whatever the batch size. Plans depend only on the
manifest, the recipe and their arguments, never on workers or loader order, so a loader that starts
at item i of a plan (a resumed run) yields exactly what an unbroken run would.
"""

from __future__ import annotations

from dataclasses import dataclass

from deit_pipe.data.views import ViewMaker
from deit_pipe.storage.manifest import ShardManifest


@dataclass(frozen=True)
class ViewPiece:
    shard: int
    v: int
    positions: tuple[int, ...]  # positions within the shard (storage order = idx order)


def cycle_order(maker: ViewMaker, manifest: ShardManifest, shard: int, v: int) -> list[int]:
    """Shard positions in mixing-cycle order, starting at position 0."""
    ids = list(manifest.shard_range(shard))
    partner_pos = [p - ids[0] for p in maker.partners(shard, ids, v)]
    order, pos = [], 0
    for _ in ids:
        order.append(pos)
        pos = partner_pos[pos]
    return order


def stream_items(
    maker: ViewMaker,
    manifest: ShardManifest,
    units: list[tuple[int, int]],
    batch: int,
    max_items: int | None = None,
    drop_last: bool = True,
) -> list[list[ViewPiece]]:
    """Fixed-size batches over the concatenated units (a batch may span units).

    Training drops the last partial batch, so every step has the same size on every rank; the teacher
    keeps it, since every view must be scored.
    """
    items: list[list[ViewPiece]] = []
    current: list[ViewPiece] = []
    filled = 0
    for shard, v in units:
        order = cycle_order(maker, manifest, shard, v)
        while order:
            take = order[: batch - filled]
            order = order[len(take) :]
            current.append(ViewPiece(shard, v, tuple(take)))
            filled += len(take)
            if filled == batch:
                items.append(current)
                if max_items is not None and len(items) == max_items:
                    return items
                current, filled = [], 0
    if current and not drop_last:
        items.append(current)
    return items
