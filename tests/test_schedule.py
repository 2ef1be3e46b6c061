"""The epoch -> view schedule (DESIGN invariant 4): DeiT's RASampler placement over whole shards.

The expectations are derived here from DeiT's samplers.py, not from the code under test: RASampler repeats
each index R times side by side and deals the list round-robin to the ranks, so with at least R ranks the
R copies of an image sit on R different ranks at the same local position (the same step), and with fewer
ranks several copies share one rank's batch; an epoch keeps about N of the R*N copies.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict

import numpy as np
import pytest

from deit_pipe.data.recipe import ViewRecipe
from deit_pipe.data.schedule import EpochPlan, GroupWalk, epoch_views, rank_items, teams, views_needed
from deit_pipe.data.views import ViewMaker
from deit_pipe.errors import InputError
from deit_pipe.storage.manifest import ShardManifest
from deit_pipe.storage.shards import ShardInfo

SAMPLES_PER_SHARD = 25
IMAGENET_TRAIN = 1_281_167


def manifest(num_samples: int = 290) -> ShardManifest:
    """A manifest of `num_samples` ids in shards of 25 (the last one short), no files behind it."""
    n_shards = math.ceil(num_samples / SAMPLES_PER_SHARD)
    shards = [ShardInfo(f"train-{s:06d}.tar", min(SAMPLES_PER_SHARD, num_samples - s * SAMPLES_PER_SHARD), 0, "")
              for s in range(n_shards)]
    return ShardManifest("train", [str(c) for c in range(10)], num_samples, SAMPLES_PER_SHARD, 0, shards)


MAKER = ViewMaker(ViewRecipe(img_size=32, pairing_views=6), "train")  # serves R = 1, 2, 3, 6


def placements(m: ShardManifest, epoch: int, repeats: int, world: int, batch: int, seed: int = 0):
    """{(idx, v): [(rank, step), ...]} for every view the epoch's plan uses, and the plans themselves."""
    plan = EpochPlan(m.num_samples, epoch, repeats, world, batch)
    where: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    items = {}
    for rank in range(world):
        items[rank] = rank_items(MAKER, m, plan, rank, seed, None)
        for step, item in enumerate(items[rank]):
            for piece in item:
                for pos in piece.positions:
                    where[(m.shard_range(piece.shard)[pos], piece.v)].append((rank, step))
    return plan, where, items


@pytest.mark.parametrize("epochs,repeats", [(1, 1), (5, 1), (3, 3), (4, 3), (300, 3), (7, 2)])
def test_epochs_use_ceil_e_over_r_times_r_views(epochs, repeats):
    used = {v for e in range(epochs) for v in epoch_views(e, repeats, None, False)}
    assert views_needed(epochs, repeats) == math.ceil(epochs / repeats) * repeats
    assert used == set(range(views_needed(epochs, repeats)))


@pytest.mark.parametrize("world,repeats,expected", [
    (1, 1, [range(0, 1)]),
    (4, 1, [range(0, 1), range(1, 2), range(2, 3), range(3, 4)]),  # R = 1: each rank alone, plain DDP sampling
    (2, 3, [range(0, 2)]),  # fewer ranks than copies: one team of all of them
    (3, 3, [range(0, 3)]),
    (7, 3, [range(0, 4), range(4, 7)]),  # floor(7/3) = 2 teams; the one spare rank joins the first
    (11, 3, [range(0, 4), range(4, 8), range(8, 11)]),  # 11 = 3 * 3 + 2: the first two teams get one more
])
def test_teams_are_floor_w_over_r_contiguous_ranges_spares_first(world, repeats, expected):
    assert teams(world, repeats) == expected


def test_with_w_equal_r_ranks_get_rasamplers_deal():
    """One team of exactly R ranks: DeiT's RASampler repeats each index R times side by side and gives rank r
    the elements r, r + W, r + 2W, ...; the plan must deal the same (the R copies of a position in one step)."""
    plan = EpochPlan(num_samples=12, epoch=0, repeats=3, world=3, batch=2)
    assert (plan.num_elements, plan.steps, plan.quota) == (12, 2, 4)  # positions 0..3, 12 // (3 * 2) = 2 steps
    for rank in range(3):
        assert [x for batch in plan.rank_elements(rank) for x in batch] == list(range(rank, 12, 3))
    assert plan.rank_elements(1) == [[1, 4], [7, 10]]  # copy 1 of positions 0, 1, then of positions 2, 3


def test_teams_take_consecutive_quotas_of_the_epoch():
    """N = 40, R = 3: epoch 0 holds positions 0..12 (39 elements); 10 ranks x batch 2 -> 39 // 20 = 1 step,
    quota 2. Teams of 4, 3, 3 ranks start at elements 0, 4 * 2, 7 * 2; a rank outside the world is refused."""
    plan = EpochPlan(num_samples=40, epoch=0, repeats=3, world=10, batch=2)
    assert (plan.num_elements, plan.steps, plan.quota) == (39, 1, 2)
    assert [plan.team_of(r) for r in (0, 3, 4, 6, 7, 9)] == [
        (range(0, 4), 0), (range(0, 4), 0), (range(4, 7), 8), (range(4, 7), 8), (range(7, 10), 14), (range(7, 10), 14)]
    # Rank 8, member 1 of the last team: its block is elements 14..19, copy-major 15, 18 | 16, 19 | 14, 17.
    assert plan.rank_elements(8) == [[16, 19]]
    with pytest.raises(ValueError, match="rank 10 is outside world 10"):
        plan.team_of(10)


def test_group_shard_order_is_frozen_for_a_seed():
    """The walk's shard order is numpy's legacy RandomState permutation (a stream numpy keeps frozen) seeded
    from SeedSequence(blake2b-128 of '["walk",seed,group]'): a run resumed under another numpy or deit-pipe
    version sees the same data order. The numbers are that stream's, pinned."""
    m = manifest(290)  # 12 shards
    for group, seed in [(0, 0), (1, 0), (0, 7)]:
        blob = json.dumps(["walk", seed, group], separators=(",", ":")).encode()
        entropy = int.from_bytes(hashlib.blake2b(blob, digest_size=16).digest(), "little")
        words = np.random.SeedSequence(entropy).generate_state(4)
        expected = np.random.RandomState(words).permutation(12).tolist()
        assert GroupWalk(MAKER, m, group, 0, seed=seed).shards == expected
    assert GroupWalk(MAKER, m, 0, 0, seed=0).shards == [2, 5, 11, 3, 9, 0, 1, 4, 10, 8, 6, 7]
    assert GroupWalk(MAKER, m, 1, 0, seed=0).shards == [9, 5, 1, 6, 7, 11, 3, 2, 0, 10, 8, 4]
    assert GroupWalk(MAKER, m, 0, 0, seed=7).shards == [2, 10, 8, 3, 4, 9, 11, 7, 0, 5, 1, 6]


@pytest.mark.parametrize("world,repeats", [(1, 1), (1, 3), (2, 3), (3, 3), (4, 3), (5, 3), (7, 3), (6, 2), (3, 1)])
def test_a_group_of_r_epochs_uses_each_sample_r_times_once_per_view(world, repeats):
    """Over a group, each (idx, v) with v in the group's views appears at most once, and all but at most one
    global micro batch per epoch appear; each epoch holds about N views (N/R images x R copies)."""
    m, batch = manifest(), 4
    seen: set[tuple[int, int]] = set()
    for epoch in range(repeats, 2 * repeats):  # the second group: views R..2R-1
        plan, where, _ = placements(m, epoch, repeats, world, batch)
        assert all(len(w) == 1 for w in where.values())
        assert seen.isdisjoint(where)
        seen |= set(where)
        assert plan.num_elements in (m.num_samples // repeats * repeats, -(-m.num_samples // repeats) * repeats)
        assert len(where) > plan.num_elements - world * batch
    assert {v for _, v in seen} == set(range(repeats, 2 * repeats))
    assert len(seen) >= m.num_samples * repeats - repeats * world * batch


@pytest.mark.parametrize("world", [3, 4, 5, 6, 8])
def test_copies_share_a_step_on_r_different_ranks(world):
    """World >= R: RASampler's placement, the copies of an image on R ranks in one step."""
    plan, where, _ = placements(manifest(600), 0, 3, world, 8)
    by_sample: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for (idx, _v), w in where.items():
        by_sample[idx] += w
    together = [s for s, w in by_sample.items() if len(w) == 3 and len({r for r, _ in w}) == 3
                and len({step for _, step in w}) == 1]
    # Only samples cut by a team's or a step's edge may be split.
    assert len(together) >= 0.9 * len(by_sample)
    for w in by_sample.values():  # never two copies in one rank's batch
        assert len(set(w)) == len(w)


@pytest.mark.parametrize("world", [1, 2])
def test_a_world_smaller_than_r_puts_copies_in_one_batch(world):
    plan, where, _ = placements(manifest(600), 1, 3, world, 12)
    by_sample: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for (idx, _v), w in where.items():
        by_sample[idx] += w
    steps_of = [{step for _, step in w} for w in by_sample.values() if len(w) == 3]
    assert sum(len(s) == 1 for s in steps_of) >= 0.9 * len(by_sample)
    if world == 1:
        assert all(len(s) == 1 for s in steps_of)  # one rank: the three copies in one batch


@pytest.mark.parametrize("num_samples,world", [(25, 1), (25, 2), (7, 1), (290, 7)])
def test_any_number_of_shards_works_a_single_one_included(num_samples, world):
    m = manifest(num_samples)
    elements = 0
    for epoch in range(3):
        plan, where, items = placements(m, epoch, 3, world, 2)
        # the most whole steps of `world` ranks x 2 that the epoch's elements fill
        assert plan.steps == plan.num_elements // (world * 2) >= 1
        assert all(len(items[r]) == plan.steps for r in range(world))
        assert all(sum(len(p.positions) for p in item) == 2 for r in range(world) for item in items[r])
        elements += plan.num_elements
    assert elements == num_samples * 3  # the group's 3 epochs split its walk: every sample's 3 copies, once


@pytest.mark.parametrize("world,repeats,batch", [(1, 3, 8), (3, 3, 8), (4, 3, 6), (8, 3, 4), (2, 1, 5)])
def test_ranks_read_few_shards_and_rebuild_few_unmixed_views(world, repeats, batch):
    """Each rank walks runs of one shard's cycle in one view: few shards per rank (O(shards) reads in all),
    few runs per batch (n + 1 unmixed views per run of n)."""
    m = manifest(600)
    plan, _, items = placements(m, 0, repeats, world, batch)
    team_size = max(len(t) for t in teams(world, repeats))
    shards_per_team = plan.num_elements / repeats / SAMPLES_PER_SHARD / len(teams(world, repeats))
    for r in range(world):
        shards_read = {p.shard for item in items[r] for p in item}
        assert len(shards_read) <= shards_per_team + 2
        runs = sum(len(item) for item in items[r])
        # A piece of B elements covers at most ceil(B / row) + 1 copy rows, row = team_size * B / R.
        rows = math.ceil(batch / max(team_size * batch // repeats, 1)) + 1
        assert runs <= plan.steps * rows + len(shards_read) * repeats * 2
    total_reads = sum(len({p.shard for item in items[r] for p in item}) for r in range(world))
    assert total_reads <= team_size * (m.num_shards / repeats + 2) * len(teams(world, repeats))


@pytest.mark.parametrize("world", range(1, 513))
def test_at_imagenet_scale_an_epoch_uses_995_permille_of_its_views(world):
    """Pure arithmetic: ImageNet's 1,281,167 samples, R = 3, a per-rank batch of 8 (global up to 4,096)."""
    for epoch in range(3):
        plan = EpochPlan(IMAGENET_TRAIN, epoch, 3, world, 8)
        used = plan.steps * plan.batch * world
        assert used >= 0.995 * plan.num_elements
        assert abs(plan.num_elements - IMAGENET_TRAIN) <= 3
        starts = [plan.team_of(t.start)[1] for t in plan.teams]
        sizes = [len(t) for t in plan.teams]
        assert sum(sizes) == world and all(s >= min(3, world) for s in sizes)
        assert starts == [sum(sizes[:i]) * plan.quota for i in range(len(sizes))]  # contiguous, disjoint


@pytest.mark.parametrize("world", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_deits_1024_global_batch_uses_995_permille(world, grad_accum):
    batch = 1024 // world // grad_accum
    for epoch in range(3):
        plan = EpochPlan(IMAGENET_TRAIN, epoch, 3, world, batch, grad_accum)
        assert plan.steps % grad_accum == 0
        assert plan.steps * batch * world >= 0.995 * plan.num_elements


def test_order_is_deterministic_from_seed_and_epoch():
    m = manifest()
    plan = EpochPlan(m.num_samples, 2, 3, 2, 4)
    first = rank_items(MAKER, m, plan, 1, 7, None)
    assert first == rank_items(MAKER, m, plan, 1, 7, None)
    assert first != rank_items(MAKER, m, plan, 1, 8, None)
    other_group = rank_items(MAKER, m, EpochPlan(m.num_samples, 5, 3, 2, 4), 1, 7, None)
    assert [p.shard for i in first for p in i] != [p.shard for i in other_group for p in i]


def test_past_the_stored_views_is_refused_unless_reuse_is_asked():
    assert epoch_views(5, 3, 6, False) == [3, 4, 5]
    # The refusal names the view needed and the --views that makes the store cover the whole group.
    with pytest.raises(InputError, match=r"needs view 8 but the teacher store has 6 views: run "
                                         r"`deit-pipe teacher-logits --views 9`"):
        epoch_views(6, 3, 6, False)
    assert epoch_views(6, 3, 6, True) == [0, 1, 2]  # explicit opt-in: wraps whole groups
    assert epoch_views(9, 3, 7, True) == [3, 4, 5]
    assert epoch_views(4, 3, 3, True) == [0, 1, 2]  # exactly R stored views: every group reuses them
    with pytest.raises(InputError, match="--repeats 3 needs at least 3 stored views, the store has 2"):
        epoch_views(0, 3, 2, True)  # not even one group's worth: reuse cannot help
    m = manifest()
    with pytest.raises(InputError, match="teacher store has 6 views"):
        rank_items(MAKER, m, EpochPlan(m.num_samples, 7, 3, 1, 4), 0, 0, 6)
    # rank_items passes the opt-in on: epoch 7 (group 2) then reads group 0's views.
    reused = rank_items(MAKER, m, EpochPlan(m.num_samples, 7, 3, 1, 4), 0, 0, 6, allow_reuse=True)
    assert {p.v for item in reused for p in item} == {0, 1, 2}


def test_repeats_must_divide_the_recipes_pairing_views():
    m = manifest()
    deit = ViewMaker(ViewRecipe(img_size=32), "train")  # pairing_views 3: R = 1 or 3
    with pytest.raises(InputError, match="--repeats 2 .* pairing_views is 3"):
        rank_items(deit, m, EpochPlan(m.num_samples, 0, 2, 1, 4), 0, 0, None)
    assert rank_items(deit, m, EpochPlan(m.num_samples, 0, 3, 1, 4), 0, 0, None)
    assert rank_items(MAKER, m, EpochPlan(m.num_samples, 0, 2, 1, 4), 0, 0, None)


@pytest.mark.parametrize("num_samples,repeats,world,batch", [(40, 3, 10, 2), (300, 3, 3, 8), (300, 3, 8, 6),
                                                              (290, 3, 2, 5), (200, 2, 5, 4), (120, 1, 4, 3)])
def test_a_team_exchange_makes_each_sample_once_and_delivers_every_rank_its_own_micro_batch(
        num_samples, repeats, world, batch):
    """Routes, checked by carrying out all_to_all_single by hand (rank j's output: what each rank i sends to j,
    in rank order, each in i's send order): every rank ends with exactly its `rank_elements` micro batch, row for
    row; within a team each element is made once, and all copies of a position by one member."""
    plan = EpochPlan(num_samples, 0, repeats, world, batch)
    for step in range(plan.steps):
        for team in plan.teams:
            routes = {rank: plan.routes(rank, step) for rank in team}
            made = [x for rank in team for x in routes[rank].made]
            assert sorted(made) == sorted(x for rank in team for x in plan.rank_elements(rank)[step])
            maker = {x // repeats: rank for rank in team for x in routes[rank].made}
            assert all(maker[x // repeats] == rank for rank in team for x in routes[rank].made)
            sent = {}  # (source, destination) -> the elements, in send order
            for i in team:
                bounds = np.cumsum([0, *routes[i].send_splits])
                for m, j in enumerate(team):
                    sent[(i, j)] = routes[i].made[bounds[m] : bounds[m + 1]]
            for j in team:
                received = [x for i in team for x in sent[(i, j)]]
                assert [len(sent[(i, j)]) for i in team] == routes[j].recv_splits
                assert [received[k] for k in routes[j].order] == plan.rank_elements(j)[step]
