"""The epoch -> view schedule: DeiT's repeated augmentation (RASampler) over whole shards (DESIGN invariant 4).

Epochs come in groups of R (the repeat count). Group g uses views gR .. gR+R-1 of every sample; those R
views share one mixing pairing (the recipe's `pairing_views` is a multiple of R), so the R copies of a
shard walk the same cycle. With R smaller than pairing_views (R = 1 on DeiT's recipe), consecutive groups
in one block of pairing_views share mixing partners and the order within each shard (views, lambdas and
shard order still differ); a store made with `--recipe '{"pairing_views": 1}'` avoids it.

The group's walk: its shards in a seeded order, each along its mixing cycle. An element is one copy of one
walk position, numbered as DeiT's RASampler numbers them, the R copies of a sample side by side: element x
is position x // R, copy x % R. Epoch gR + i takes the i-th R-th of the walk's positions, so every epoch
holds about N elements (N/R samples x R copies) whatever the number of shards, a single shard included,
and E epochs use ceil(E/R) * R views per sample.

Ranks form RA teams, because DeiT puts the R copies of an image on R different ranks: floor(W/R) teams of
R ranks (some get one rank more when R does not divide W), or one team of all ranks when W < R. Every
rank gets the same quota, the most whole optimizer steps that fit in the epoch (at most one global
step's elements are left out); team t takes the next size(t) x quota elements of the epoch. Each micro
batch block of a team (size(t) x B elements) is ordered copy-major and cut into size(t) pieces of B, one
per member: the R copies of a sample land in one micro batch on R different ranks (one rank's batch when
the world is smaller than R; a sample cut by a block's edge has its copies in two consecutive steps, as
RASampler's at its steps' edges), and a piece is a few runs along one shard's cycle in one view, so a rank
rebuilds n + 1 unmixed views for n mixed ones. A team's members read the team's shards whole: O(shards)
object requests an epoch. Everything is a pure function of (manifest, seed, epoch, world, batch).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import cached_property
from itertools import pairwise

import numpy as np

from deit_pipe.data.rng import permutation
from deit_pipe.data.view_plan import ViewPiece, cycle_order
from deit_pipe.data.views import ViewMaker
from deit_pipe.errors import InputError
from deit_pipe.storage.manifest import ShardManifest


def views_needed(epochs: int, repeats: int) -> int:
    return -(-epochs // repeats) * repeats


def epoch_views(epoch: int, repeats: int, num_views: int | None, allow_reuse: bool) -> list[int]:
    """The R view indices an epoch's group uses; past the stored views it is an error unless reuse is asked for.

    Reuse wraps whole groups, so the views of a group keep sharing one pairing."""
    group = epoch // repeats
    first = group * repeats
    if num_views is not None and first + repeats > num_views:
        if not allow_reuse:
            raise InputError(
                f"epoch {epoch} needs view {first + repeats - 1} but the teacher store has {num_views} views: run "
                f"`deit-pipe teacher-logits --views {first + repeats}` (or more) or pass --allow-view-reuse"
            )
        if num_views < repeats:
            raise InputError(f"--repeats {repeats} needs at least {repeats} stored views, the store has {num_views}")
        first = group % (num_views // repeats) * repeats
    return list(range(first, first + repeats))


def teams(world: int, repeats: int) -> list[range]:
    """Contiguous rank ranges that share the R copies of their samples: each has >= R ranks (or all of them)."""
    count = max(world // repeats, 1)
    base, extra = divmod(world, count)
    starts = [t * base + min(t, extra) for t in range(count + 1)]
    return [range(a, b) for a, b in pairwise(starts)]


@dataclass(frozen=True)
class StepRoutes:
    """One rank's part of a step's team exchange (EpochPlan.routes)."""

    made: list[int]  # the elements it makes, in the order it sends them
    send_splits: list[int]  # how many of them go to each team member
    recv_splits: list[int]  # how many of its micro batch's views come from each team member
    order: list[int]  # row i of its micro batch is the order[i]-th view received


@dataclass(frozen=True)
class EpochPlan:
    """The arithmetic of one epoch: how many elements it holds, how many each rank takes, which team takes which."""

    num_samples: int
    epoch: int
    repeats: int
    world: int
    batch: int  # micro batch per rank
    grad_accum: int = 1

    @property
    def positions(self) -> range:
        """This epoch's positions in its group's walk."""
        n, r, i = self.num_samples, self.repeats, self.epoch % self.repeats
        return range(i * n // r, (i + 1) * n // r)

    @property
    def num_elements(self) -> int:
        return len(self.positions) * self.repeats

    @property
    def steps(self) -> int:
        """Micro steps every rank runs: whole gradient accumulations, the most that fit."""
        per_step = self.world * self.batch * self.grad_accum
        return self.num_elements // per_step * self.grad_accum

    @property
    def quota(self) -> int:
        return self.steps * self.batch

    @cached_property
    def teams(self) -> list[range]:
        return teams(self.world, self.repeats)

    def team_of(self, rank: int) -> tuple[range, int]:
        """(the team's ranks, the first element it takes)."""
        start = 0
        for team in self.teams:
            if rank in team:
                return team, start
            start += len(team) * self.quota
        raise ValueError(f"rank {rank} is outside world {self.world}")

    def _block(self, team: range, start: int, step: int) -> list[int]:
        """The team's elements of a step, copy-major: member m's micro batch is the m-th run of `batch` of them."""
        size, b, r = len(team), self.batch, self.repeats
        return sorted(range(start + step * size * b, start + (step + 1) * size * b), key=lambda x: (x % r, x))

    def rank_elements(self, rank: int) -> list[list[int]]:
        """This rank's micro batches as element numbers of the epoch (x: position x // R, copy x % R)."""
        team, start = self.team_of(rank)
        member, b = rank - team.start, self.batch
        return [self._block(team, start, k)[member * b : (member + 1) * b] for k in range(self.steps)]

    def routes(self, rank: int, step: int) -> StepRoutes:
        """Who makes which of the team's views in a step when the members split its samples, not its copies.

        Member m makes every copy of the m-th of `size` contiguous slices of the block's positions (one decode a
        sample for the team, where each member's own copies would need one each); each view then goes to the
        member and row that `rank_elements` gives it."""
        team, start = self.team_of(rank)
        member, size, b, r = rank - team.start, len(team), self.batch, self.repeats
        block = self._block(team, start, step)
        positions = sorted({x // r for x in block})
        maker = {int(p): m for m, chunk in enumerate(np.array_split(positions, size)) for p in chunk}
        made = [x for x in block if maker[x // r] == member]  # block order: by destination member, then row
        slot = {x: i for i, x in enumerate(block)}
        mine = block[member * b : (member + 1) * b]
        arriving = sorted(mine, key=lambda x: (maker[x // r], slot[x]))  # all_to_all: by source, each in slot order
        where = {x: i for i, x in enumerate(arriving)}
        return StepRoutes(
            made=made,
            send_splits=[sum(slot[x] // b == m for x in made) for m in range(size)],
            recv_splits=[sum(maker[x // r] == m for x in mine) for m in range(size)],
            order=[where[x] for x in mine],
        )


class GroupWalk:
    """A group's walk: shards in a seeded order, each along its mixing cycle (computed when first needed)."""

    def __init__(self, maker: ViewMaker, manifest: ShardManifest, group: int, pairing_view: int, seed: int):
        self.maker, self.manifest, self.pairing_view = maker, manifest, pairing_view
        self.shards = [int(s) for s in permutation(manifest.num_shards, "walk", seed, group)]
        sizes = [len(manifest.shard_range(s)) for s in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        self._cycles: dict[int, list[int]] = {}

    def at(self, position: int) -> tuple[int, int]:
        """(shard, position within the shard) of a walk position."""
        i = bisect.bisect_right(self.offsets, position) - 1
        shard = self.shards[i]
        if shard not in self._cycles:
            self._cycles[shard] = cycle_order(self.maker, self.manifest, shard, self.pairing_view)
        return shard, self._cycles[shard][position - self.offsets[i]]


def check_pairing(repeats: int, pairing_views: int) -> None:
    if pairing_views % repeats:
        raise InputError(
            f"--repeats {repeats} needs views whose mixing pairing is shared by {repeats} consecutive views; the "
            f"recipe's pairing_views is {pairing_views} (use --repeats dividing it, or a store made with "
            f"--recipe '{{\"pairing_views\": {repeats}}}')"
        )


def rank_items(maker: ViewMaker, manifest: ShardManifest, plan: EpochPlan, rank: int, seed: int,
               num_views: int | None, allow_reuse: bool = False, exchange: bool = False) -> list[list[ViewPiece]]:
    """This rank's micro batches in this epoch, each a list of runs (shard, view, positions along the cycle); with
    `exchange`, the views it makes for its team in each step instead (EpochPlan.routes)."""
    check_pairing(plan.repeats, maker.recipe.pairing_views)
    views = epoch_views(plan.epoch, plan.repeats, num_views, allow_reuse)
    walk = GroupWalk(maker, manifest, plan.epoch // plan.repeats, views[0], seed)
    first = plan.positions.start
    items = []
    made = [plan.routes(rank, k).made for k in range(plan.steps)] if exchange else plan.rank_elements(rank)
    for elements in made:
        runs: list[tuple[int, int, list[int]]] = []
        for x in elements:
            shard, pos = walk.at(first + x // plan.repeats)
            v = views[x % plan.repeats]
            if not runs or runs[-1][:2] != (shard, v):
                runs.append((shard, v, []))
            runs[-1][2].append(pos)
        items.append([ViewPiece(shard, v, tuple(positions)) for shard, v, positions in runs])
    return items
