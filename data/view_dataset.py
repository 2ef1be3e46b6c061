"""Map-style datasets over shards: training views joined with the teacher store, and eval images; and
`TrainViews`, one rank's training loaders epoch by epoch.

Map-style so the order is the plan's whatever the number of workers (and a resumed run can start at
any item); each worker keeps the last two shards and the last few store units it read (a training batch
can hold the end of one shard and the start of the next, in R views), and plans walk one shard at a time.
Training steps on an object store come with their shards' bytes, read once a rank (data.shard_feed); otherwise
workers read their shards themselves.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from deit_pipe.data.schedule import EpochPlan, rank_items
from deit_pipe.data.shard_feed import ShardFeed
from deit_pipe.data.view_plan import ViewPiece
from deit_pipe.data.views import ViewBatch, ViewMaker, decode_rgb
from deit_pipe.distributed.context import RankContext
from deit_pipe.errors import InputError
from deit_pipe.loss.teacher_targets import StoreEntry
from deit_pipe.storage.manifest import ShardManifest, shard_url
from deit_pipe.storage.shards import ShardSample, read_shard, shard_samples
from deit_pipe.storage.teacher_store import TeacherStore, ViewRecord


class RecentlyRead:
    """The last `size` values read, by key: consecutive items of a plan mostly come from one shard."""

    def __init__(self, size: int, read):
        self.size, self.read = size, read
        self._values: OrderedDict = OrderedDict()

    def __getitem__(self, key):
        if key not in self._values:
            self._values[key] = self.read(key)
            if len(self._values) > self.size:
                self._values.popitem(last=False)
        self._values.move_to_end(key)
        return self._values[key]


class ShardReader:
    """A shard's samples in stored order; the last two shards read are kept. A shard whose bytes were offered
    (the step being made came with them) is indexed where they lie, in shared memory, any other is read from its
    URL (a local one mapped). Either way its images stay where they are until a view decodes one.

    A shard must hold the ids the manifest gives it: a tar that ends early yet well formed (its tail zeroed from a
    header on) or another shard set's would otherwise pass for it, its partners and positions astray."""

    def __init__(self, shards_root: str, manifest: ShardManifest):
        self.shards_root, self.manifest = shards_root, manifest
        self._recent = RecentlyRead(2, self._read)
        self.offered: dict[int, torch.Tensor] = {}

    def _read(self, shard: int) -> list[ShardSample]:
        url = shard_url(self.shards_root, self.manifest.split, shard)
        samples = shard_samples(self.offered[shard].numpy(), url) if shard in self.offered else read_shard(url)
        ids = self.manifest.shard_range(shard)
        if [x.idx for x in samples] != list(ids):
            raise InputError(f"read {url}: {len(samples)} samples, not the {len(ids)} of ids {ids.start}-"
                             f"{ids.stop - 1} the manifest lists (damaged, or another shard set's: shard it again)")
        return samples

    def samples(self, shard: int) -> list[ShardSample]:
        return self._recent[shard]


class ViewDataset(Dataset):
    """Item i: the mixed views of plan[i]'s pieces; with a store, joined with its rows by (idx, v)."""

    def __init__(self, shards_root: str, manifest: ShardManifest, maker: ViewMaker, plan: list[list[ViewPiece]],
                 store_url: str | None = None):
        self.reader = ShardReader(shards_root, manifest)
        self.maker = maker
        self.plan = plan
        self.store_url = store_url
        self._store: TeacherStore | None = None
        # Two shards' worth of one repeated-augmentation group's views (R <= 4 is the common case).
        self._units = RecentlyRead(8, self._read_unit)

    def __len__(self) -> int:
        return len(self.plan)

    def _read_unit(self, unit: tuple[int, int]) -> ViewRecord:
        if self._store is None:  # opened in the worker: zarr handles do not travel between processes
            self._store = TeacherStore.open(self.store_url, self.maker.split)
        return self._store.read_unit(*unit)

    def _record(self, shard: int, v: int) -> ViewRecord:
        return self._units[(shard, v)]

    def _joined(self, piece: ViewPiece, batch: ViewBatch) -> StoreEntry:
        rec = self._record(piece.shard, piece.v)
        rows = np.asarray(piece.positions)
        # The replay record and pixel digest must match what we just rebuilt: otherwise the stored teacher
        # outputs belong to other pixels (another library version, another recipe).
        same = (
            np.array_equal(rec.partner[rows], batch.partner.numpy())
            and np.array_equal(rec.lam[rows], batch.lam.numpy())
            and np.array_equal(rec.digest[rows].astype(np.int64), batch.digest.numpy())
        )
        if not same:
            raise InputError(
                f"replay drift in shard {piece.shard} view {piece.v}: the views rebuilt here differ from the "
                f"ones the teacher scored (run `deit-pipe verify-store`)"
            )
        return StoreEntry.of_record(rec, rows)

    def __getitem__(self, i: int) -> tuple[list[ViewPiece], ViewBatch, StoreEntry | None]:
        pieces = self.plan[i]
        samples = {p.shard: self.reader.samples(p.shard) for p in pieces}
        decoded = ItemDecodes(self.maker, pieces, samples)
        size = self.maker.recipe.img_size
        images = _item_tensor((sum(len(p.positions) for p in pieces), 3, size, size))
        starts = np.cumsum([0] + [len(p.positions) for p in pieces]).tolist()
        batches = [
            self.maker.shard_views(samples[p.shard], p.shard, p.v, positions=list(p.positions),
                                   decoded=decoded.of(p.shard), out=images[a:b])
            for p, (a, b) in zip(pieces, pairwise(starts), strict=True)
        ]
        views = ViewBatch.cat(batches, images=images)
        if self.store_url is None:
            return pieces, views, None
        stored = [self._joined(p, b) for p, b in zip(pieces, batches, strict=True)]
        return pieces, views, StoreEntry.cat(stored)


def _item_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """An empty float32 tensor; inside a loader worker in shared memory (as torch's default_collate makes its
    batches), so handing it to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.float32)
    nbytes = math.prod(shape) * torch.float32.itemsize
    return torch.empty(0, dtype=torch.float32).set_(torch.UntypedStorage._new_shared(nbytes), 0, shape)


class ItemDecodes:
    """Each sample of an item decoded once, however many of its pieces use it.

    An item's pieces share samples in two cases: a training item when the world is smaller than R (the R copies
    of its samples, one piece per view of the group), and a teacher-logits item (one piece per view of a
    pairing block); either way views of one pairing, so the pieces share partners too. An image that two or
    more pieces use is kept until the last of them took it (at most an item's samples: about B/R full-size
    images per worker at world 1), one used once is not kept at all. A partner counts as used by every piece
    that holds its sample, mixed or not: one a piece leaves unmixed (mix_prob < 1) stays until the item ends.
    """

    def __init__(self, maker: ViewMaker, pieces: list[ViewPiece], samples: dict[int, list[ShardSample]]):
        self._uses: Counter = Counter()
        for piece in pieces:
            partner = maker.partner_positions(piece.shard, len(samples[piece.shard]), piece.v)
            self._uses.update((piece.shard, q) for q in {*piece.positions, *(int(partner[p]) for p in piece.positions)})
        self._samples = samples
        self._kept: dict[tuple[int, int], Image.Image] = {}

    @property
    def held(self) -> int:
        """How many decoded images are kept for pieces still to come."""
        return len(self._kept)

    def of(self, shard: int) -> Callable[[int], Image.Image]:
        return lambda position: self._take(shard, position)

    def _take(self, shard: int, position: int) -> Image.Image:
        key = (shard, position)
        image = self._kept.get(key)
        if image is None:
            image = decode_rgb(self._samples[shard][position].image)
        self._uses[key] -= 1
        if self._uses[key] > 0:
            self._kept[key] = image
        else:
            self._kept.pop(key, None)
        return image


class EpochSteps(Sampler):
    """The (epoch, step, its shards' bytes) items of one loader pass, set before each pass: one persistent loader,
    whose workers keep their processes and caches, serves every epoch. A pass may run through several epochs, so
    that workers make the next epoch's first batches while this one's last are trained on and evaluated."""

    def __init__(self, feed: ShardFeed):
        self.feed = feed
        self.spans: list[tuple[int, range]] = []

    def set(self, spans: list[tuple[int, range]]) -> None:
        self.spans = spans

    def __iter__(self):
        return self.feed.steps(self.spans)

    def __len__(self) -> int:
        return sum(len(steps) for _, steps in self.spans)


class EpochViews(Dataset):
    """Item (epoch, i): item i of the epoch's plan, which each worker computes once per epoch."""

    def __init__(self, views: ViewDataset, plan_of: Callable[[int], list[list[ViewPiece]]]):
        self.views, self.plan_of, self.epoch = views, plan_of, None

    def __getitem__(self, item: tuple[int, int, dict[int, torch.Tensor]]):
        epoch, i, shards = item
        if epoch != self.epoch:
            self.views.plan, self.epoch = self.plan_of(epoch), epoch
        self.views.reader.offered = shards
        try:
            return self.views[i]
        finally:
            self.views.reader.offered = {}  # a shard's shared memory goes once no step nor reader's cache holds it


@dataclass
class TrainViews:
    """One rank's training batches, epoch by epoch: its share of each epoch's view schedule (data.schedule),
    rebuilt from the shards and, when targets are cached, joined with the store's rows."""

    shards: str
    manifest: ShardManifest
    maker: ViewMaker
    plans: Callable[[int], EpochPlan]  # epoch -> the whole world's plan of it
    rank: int
    seed: int
    store_url: str | None  # None without cached targets
    store_views: int | None
    allow_view_reuse: bool
    workers: int
    pin_memory: bool = False  # a GPU run: batches in page-locked memory, so its non_blocking copies overlap
    exchange: bool = False  # make the views of the rank's share of its team's samples (EpochPlan.routes)

    def __post_init__(self):
        self._steps = EpochSteps(ShardFeed(self.shards, self.manifest.split, self.rank_plan))
        self._pass = None
        dataset = EpochViews(ViewDataset(self.shards, self.manifest, self.maker, [], self.store_url), self.rank_plan)
        # Persistent workers: started once per run, not once per epoch (and their shard caches survive).
        self._loader = DataLoader(dataset, batch_size=None, sampler=self._steps, num_workers=self.workers,
                                  prefetch_factor=4 if self.workers else None, pin_memory=self.pin_memory,
                                  persistent_workers=self.workers > 0)

    def steps_in(self, epoch: int) -> int:
        return self.plans(epoch).steps

    def rank_plan(self, epoch: int) -> list[list[ViewPiece]]:
        return rank_items(self.maker, self.manifest, self.plans(epoch), self.rank, self.seed, self.store_views,
                          self.allow_view_reuse, self.exchange)

    def loader(self, epoch: int, start_step: int, end_epoch: int | None = None) -> DataLoader:
        """(pieces, views, store rows or None) of this rank's steps start_step, start_step + 1, ... of `epoch`,
        then every step of the epochs after it up to `end_epoch` (exclusive; default: `epoch` alone).

        One pass through the epochs of a run keeps the workers busy across their ends: a pass per epoch would
        start the next epoch's batches only when asked for its first, and wait a whole batch's work for it (a
        batch is made by one worker: about 0.7 s at 224 px and 128 views), once an epoch."""
        end_epoch = epoch + 1 if end_epoch is None else end_epoch
        self._steps.set([(e, range(start_step if e == epoch else 0, self.steps_in(e)))
                         for e in range(epoch, end_epoch)])
        return self._loader

    def walk(self, epoch: int, start_step: int, end_epoch: int) -> Iterator[tuple]:
        """One pass of `loader(epoch, start_step, end_epoch)` that close() ends, whoever still holds it: a frame
        kept alive after the run (matplotlib's first import leaves tracebacks in pyparsing that reach the train
        loop's; an exception's traceback does too) would otherwise keep the workers."""
        if end_epoch <= epoch:
            return iter(())  # nothing to walk: the workers are not even started
        self._pass = (item for item in self.loader(epoch, start_step, end_epoch))
        return self._pass

    def close(self) -> None:
        """Stop the persistent workers now: a process that goes on after the run (a sweep, a benchmark) must not
        keep them, nor fork them into its next loader's workers. The loader is referenced here only (and by the
        pass, closed here), so dropping it shuts its workers down at once."""
        if self._pass is not None:
            self._pass.close()
        self._pass = self._loader = None


class EvalDataset(Dataset):
    """Item i: (images, labels) of one slice of a shard, through the recipe's eval transform.

    `length` pads the dataset with repeats of the split's first slice whose labels are -1 (no class: never a
    hit, never counted): ranks of a ZeRO-3 run must run as many forwards as each other, since every forward
    gathers the parameters from all of them."""

    def __init__(self, shards_root: str, manifest: ShardManifest, shards: list[int], transform, batch: int,
                 length: int = 0):
        self.reader = ShardReader(shards_root, manifest)
        self.transform = transform
        self.items = _slices(manifest, shards, batch)
        self.padding = _slices(manifest, [0], batch)[0]
        self.length = max(length, len(self.items))

    @classmethod
    def for_rank(cls, shards_root: str, manifest: ShardManifest, ctx: RankContext, transform,
                 batch: int) -> EvalDataset:
        """This rank's shards (round-robin), padded to the item count of the rank with the most."""
        shards = list(range(manifest.num_shards))
        most = max(len(_slices(manifest, shards[r :: ctx.world_size], batch)) for r in range(ctx.world_size))
        return cls(shards_root, manifest, ctx.my_units(shards), transform, batch, most)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        real = i < len(self.items)
        shard, start, end = self.items[i] if real else self.padding
        samples = self.reader.samples(shard)[start:end]
        images = torch.stack([self.transform(decode_rgb(s.image)) for s in samples])
        return images, torch.tensor([s.label if real else -1 for s in samples], dtype=torch.int64)


def _slices(manifest: ShardManifest, shards: list[int], batch: int) -> list[tuple[int, int, int]]:
    """(shard, start, end) of each batch of each shard, in order; none crosses a shard."""
    return [(s, a, min(a + batch, len(manifest.shard_range(s))))
            for s in shards for a in range(0, len(manifest.shard_range(s)), batch)]
