"""The epoch -> view schedule (DESIGN invariant 4): pure functions of the manifest, (seed, epoch) and world."""

from __future__ import annotations

import math

import pytest

from deit_pipe.data.recipe import ViewRecipe
from deit_pipe.data.schedule import epoch_shards, epoch_views, rank_units, steps_per_epoch, views_needed
from deit_pipe.data.view_plan import stream_items
from deit_pipe.data.views import ViewMaker
from deit_pipe.errors import InputError
from deit_pipe.storage.manifest import ShardManifest
from deit_pipe.storage.shards import ShardInfo

SAMPLES_PER_SHARD = 25


def manifest(num_samples: int = 290) -> ShardManifest:
    """A manifest of `num_samples` ids in shards of 25 (the last one short), no files behind it."""
    n_shards = math.ceil(num_samples / SAMPLES_PER_SHARD)
    shards = [ShardInfo(f"train-{s:06d}.tar", min(SAMPLES_PER_SHARD, num_samples - s * SAMPLES_PER_SHARD), 0, "")
              for s in range(n_shards)]
    return ShardManifest("train", [str(c) for c in range(10)], num_samples, SAMPLES_PER_SHARD, 0, shards)


@pytest.mark.parametrize("epochs,repeats", [(1, 1), (5, 1), (3, 3), (4, 3), (300, 3), (7, 2)])
def test_epochs_use_ceil_e_over_r_times_r_views(epochs, repeats):
    used = {v for e in range(epochs) for v in epoch_views(e, repeats, None, False)}
    assert views_needed(epochs, repeats) == math.ceil(epochs / repeats) * repeats
    assert used == set(range(views_needed(epochs, repeats)))


@pytest.mark.parametrize("repeats", [1, 2, 3])
def test_each_group_visits_every_shard_once_with_distinct_views(repeats):
    m = manifest()
    for group in range(3):
        seen: dict[int, list[int]] = {}  # shard -> views it was read with in this group
        for epoch in range(group * repeats, (group + 1) * repeats):
            for rank in range(2):
                for shard, v in rank_units(m, epoch, repeats, 0, rank, 2, None):
                    seen.setdefault(shard, []).append(v)
        assert sorted(seen) == list(range(m.num_shards))  # every shard in the group ...
        for views in seen.values():  # ... in one epoch only, with R distinct views of each of its samples
            assert sorted(views) == list(range(group * repeats, (group + 1) * repeats))


def test_ranks_read_disjoint_shards_of_the_epoch():
    m = manifest()
    units = [rank_units(m, 4, 3, 0, rank, 3, None) for rank in range(3)]
    shards = [{s for s, _ in u} for u in units]
    assert set.union(*shards) == set(epoch_shards(m.num_shards, 4, 3, 0))
    assert sum(len(s) for s in shards) == len(set.union(*shards))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_rank_gets_the_same_number_of_full_steps(world):
    m, maker, batch = manifest(), ViewMaker(ViewRecipe(img_size=32), "train"), 8
    for epoch in range(3):
        steps = steps_per_epoch(m, epoch, 3, 0, world, batch)
        assert steps > 0
        for rank in range(world):
            plan = stream_items(maker, m, rank_units(m, epoch, 3, 0, rank, world, None), batch, steps)
            assert len(plan) == steps
            assert all(sum(len(p.positions) for p in item) == batch for item in plan)


def test_steps_are_whole_gradient_accumulations():
    m = manifest()
    for accum in (1, 2, 4):
        steps = steps_per_epoch(m, 0, 3, 0, 2, 8, accum)
        assert steps % accum == 0
        assert steps >= steps_per_epoch(m, 0, 3, 0, 2, 8) - accum + 1


def test_order_is_deterministic_from_seed_and_epoch():
    m = manifest()
    assert rank_units(m, 2, 3, 7, 1, 2, None) == rank_units(m, 2, 3, 7, 1, 2, None)
    other_seed = rank_units(m, 2, 3, 8, 1, 2, None)
    other_epoch = rank_units(m, 5, 3, 7, 1, 2, None)
    assert rank_units(m, 2, 3, 7, 1, 2, None) != other_seed
    assert [s for s, _ in rank_units(m, 2, 3, 7, 1, 2, None)] != [s for s, _ in other_epoch]


def test_past_the_stored_views_is_refused_unless_reuse_is_asked():
    assert epoch_views(5, 3, 6, False) == [3, 4, 5]
    with pytest.raises(InputError, match="needs view 8 but the teacher store has 6 views"):
        epoch_views(6, 3, 6, False)
    assert epoch_views(6, 3, 6, True) == [0, 1, 2]  # explicit opt-in: wraps around
    with pytest.raises(InputError, match="teacher store has 6 views"):
        rank_units(manifest(), 7, 3, 0, 0, 1, 6)


def test_too_few_shards_for_the_ranks_is_refused():
    with pytest.raises(InputError, match="shards for 3 ranks"):
        rank_units(manifest(50), 0, 1, 0, 0, 3, None)
