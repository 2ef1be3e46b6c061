"""The loader's datasets (data/view_dataset.py): which samples an item holds, the join of rebuilt views with the
teacher store's rows (and its refusal when they differ), the two read caches, and the eval slices.

The store here is written by hand, not by a teacher: each row's replay record (partner, lambda, pixel digest)
is the one ViewMaker rebuilds, and its teacher outputs are a known function of (idx, v), so what the loader
returns is checked against that function. Real Fashion-MNIST images in shards of 12 (the last one short).
"""

from __future__ import annotations

import functools
import multiprocessing
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, get_worker_info
from torchvision.transforms import PILToTensor

from deit_pipe.data import view_dataset
from deit_pipe.data import views as views_module
from deit_pipe.data.recipe import ViewRecipe
from deit_pipe.data.shard_feed import shared_bytes
from deit_pipe.data.view_dataset import EvalDataset, ItemDecodes, RecentlyRead, ShardReader, ViewDataset
from deit_pipe.data.view_plan import ViewPiece
from deit_pipe.data.views import ViewBatch, ViewMaker
from deit_pipe.distributed.context import RankContext
from deit_pipe.errors import InputError
from deit_pipe.stages import shard as shard_stage
from deit_pipe.storage.manifest import ShardManifest, shard_url
from deit_pipe.storage.shards import encode_shard, read_shard
from deit_pipe.storage.teacher_store import TeacherStore, ViewRecord, store_binding

SPC = 12  # train: 16 shards of 12 and one of 8; val: 4 of 12 and one of 2
VIEWS = 4
MAKER = ViewMaker(ViewRecipe(img_size=32), "train")
# Units stored as the teacher stage would: two shards' four views, and a ninth unit.
GOOD_UNITS = [(s, v) for s in (0, 1) for v in range(VIEWS)] + [(2, 0)]
DRIFT = {"partner": 3, "lam": 4, "digest": 5}  # shard whose view 0 has one row's field changed


def teacher_rows(idx: np.ndarray, v) -> dict[str, np.ndarray]:
    """The fake teacher's outputs for samples idx in views v (k = 2, code rank 1): each a readable function of
    (idx, v), exact in its stored dtype."""
    v = np.broadcast_to(v, idx.shape)
    return {
        "logits": np.stack([idx, v], 1).astype(np.float16),
        "classes": np.stack([idx % 10, v], 1).astype(np.uint16),
        "tail_lse": (idx + v / 4).astype(np.float32),
        "code": (idx % 100 - 50).astype(np.int8)[:, None],
    }


def samples_of(shards: str, shard: int, split: str = "train") -> list:
    return list(read_shard(shard_url(shards, split, shard)))


def write_unit(store: TeacherStore, samples: list, shard: int, v: int, drift: str | None = None) -> None:
    batch = MAKER.shard_views(samples, shard, v)
    replay = {"partner": batch.partner.numpy().astype(np.int32), "lam": batch.lam.numpy(),
              "digest": batch.digest.numpy().astype(np.uint32)}
    if drift:  # row 7's field no longer what the views rebuild: another view's teacher output
        replay[drift][7] = {"partner": lambda x: x + 1, "lam": lambda x: np.nextafter(x, np.float32(2)),
                            "digest": lambda x: x ^ 1}[drift](replay[drift][7])
    store.write_unit(shard, v, ViewRecord(**teacher_rows(batch.idx.numpy(), v), **replay))


@pytest.fixture(scope="module")
def shards(fmnist_folder, tmp_path_factory) -> str:
    dest = tmp_path_factory.mktemp("vd") / "shards"
    shard_stage.run(str(fmnist_folder), str(dest), shard_stage.ShardOptions(samples_per_shard=SPC), 1, RankContext())
    return str(dest)


@pytest.fixture(scope="module")
def manifest(shards) -> ShardManifest:
    return ShardManifest.load(shards, "train")


@pytest.fixture(scope="module")
def store(shards, manifest, tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("vd") / "store")
    code = {"kind": "test", "rank": 1}
    binding = store_binding(manifest, MAKER.recipe.hash(), {"name": "fake"}, 10, 2, code)
    arrays = (np.zeros(10, np.float32), np.zeros((1, 10), np.float32), np.ones(1, np.float32))
    teacher_store = TeacherStore.create(url, "train", binding, VIEWS, {}, arrays, {})
    for shard, v in GOOD_UNITS:
        write_unit(teacher_store, samples_of(shards, shard), shard, v)
    for field, shard in DRIFT.items():
        write_unit(teacher_store, samples_of(shards, shard), shard, 0, drift=field)
    return url


# ------------------------------------------------------------------------------------ the caches


def test_recently_read_keeps_the_last_size_keys_least_recent_out_first():
    """An LRU, not a FIFO: a hit makes a key the most recent, so the next new key evicts the other one."""
    reads = []
    cache = RecentlyRead(2, lambda key: reads.append(key) or key * 10)
    assert [cache[k] for k in (1, 2, 1, 3, 1, 2)] == [10, 20, 10, 30, 10, 20]
    # 1, 2 read; 1 a hit; 3 evicts 2 (the least recent); 1 a hit; 2 read again (evicting 3).
    assert reads == [1, 2, 3, 2]


def test_shard_reader_returns_a_shard_in_idx_order_and_keeps_the_last_two(shards, manifest, monkeypatch):
    """A batch may hold the end of one shard and the start of the next: both stay read, a third evicts the
    least recent."""
    reads = []

    def counting(url):
        reads.append(url)
        return read_shard(url)

    monkeypatch.setattr(view_dataset, "read_shard", counting)
    reader = ShardReader(shards, manifest)
    for s in (0, 1, 0, 6, 0, 1):
        assert [x.idx for x in reader.samples(s)] == list(manifest.shard_range(s))
    assert reads == [shard_url(shards, "train", s) for s in (0, 1, 6, 1)]


def shard_copy(shards: str, tmp_path: Path) -> tuple[Path, ShardManifest]:
    """A copy of the shard set to damage, and its manifest."""
    copy = Path(shutil.copytree(shards, tmp_path / "shards"))
    return copy / "train", ShardManifest.load(str(copy), "train")


def test_a_shard_the_manifest_lists_that_is_gone_is_one_line_for_a_worker_too(shards, tmp_path):
    """The workers' own reads (local shards, eval, teacher-logits) say so as the rank's shard feed does."""
    split, manifest = shard_copy(shards, tmp_path)
    (split / "train-000003.tar").unlink()
    with pytest.raises(InputError, match="train-000003.tar: the manifest lists this shard, but it is not there"):
        ShardReader(str(split.parent), manifest).samples(3)


def test_an_offered_shard_is_read_where_it_lies_and_not_written(shards):
    """The bytes the rank's feed put in shared memory, which every worker of the rank sees: no copy, no writes."""
    manifest = ShardManifest.load(shards, "train")
    offered = shared_bytes(Path(shard_url(shards, "train", 1)).read_bytes())
    reader = ShardReader(shards, manifest)
    reader.offered = {1: offered}
    samples = reader.samples(1)
    assert [x.idx for x in samples] == list(manifest.shard_range(1))
    assert all(np.shares_memory(np.frombuffer(x.image, np.uint8), offered.numpy()) for x in samples)
    assert all(x.image.readonly for x in samples)


@pytest.mark.parametrize("swap", ["ends early", "another shard"])
def test_a_well_formed_shard_without_the_manifests_ids_is_one_line(shards, tmp_path, swap):
    """A tar that ends early yet well formed (its tail zeroed from a header on reads so) or another shard's bytes
    in its place: a reader that took it would walk other partners and positions."""
    split, manifest = shard_copy(shards, tmp_path)
    shard = split / "train-000002.tar"
    shard.write_bytes(encode_shard(samples_of(shards, 2)[:-2]) if swap == "ends early"
                      else (split / "train-000001.tar").read_bytes())
    ids = manifest.shard_range(2)
    count = len(ids) - 2 if swap == "ends early" else len(manifest.shard_range(1))
    with pytest.raises(InputError) as error:
        ShardReader(str(split.parent), manifest).samples(2)
    assert str(error.value) == (f"read {shard}: {count} samples, not the {len(ids)} of ids {ids.start}-{ids.stop - 1} "
                                f"the manifest lists (damaged, or another shard set's: shard it again)")


# ------------------------------------------------------------------------------ training items


def test_joined_batches_hold_every_field_in_order():
    def batch(idxs: list[int], v: int) -> ViewBatch:
        idx = torch.tensor(idxs)
        images = idx.float()[:, None, None, None].expand(-1, 3, 2, 2)
        return ViewBatch(idx=idx, v=torch.full_like(idx, v), images=images, label=idx % 10, partner=idx + 100,
                         partner_label=idx % 7, lam=idx / 10, digest=idx * 1000)

    one = batch([3], 0)
    assert ViewBatch.cat([one]) is one
    joined = ViewBatch.cat([batch([3], 0), batch([5, 4], 2)])
    idx = torch.tensor([3, 5, 4])
    assert torch.equal(joined.idx, idx) and torch.equal(joined.v, torch.tensor([0, 2, 2]))
    assert torch.equal(joined.images[:, 0, 0, 0], idx.float()) and joined.images.shape == (3, 3, 2, 2)
    assert torch.equal(joined.label, idx % 10) and torch.equal(joined.partner, idx + 100)
    assert torch.equal(joined.partner_label, idx % 7) and torch.equal(joined.lam, idx / 10)
    assert torch.equal(joined.digest, idx * 1000)
    # A field the parts were written into in place is taken as it is, the others joined.
    written = torch.zeros(3, 3, 2, 2)
    in_place = ViewBatch.cat([batch([3], 0), batch([5, 4], 2)], images=written)
    assert in_place.images is written and torch.equal(in_place.idx, idx)
    with pytest.raises(TypeError, match="ViewBatch has no field 'pixels'"):
        ViewBatch.cat([batch([3], 0)], pixels=written)


# Two pieces in two shards and views, positions out of storage order: rows must follow the pieces.
PIECES = [ViewPiece(1, 2, (5, 0, 11)), ViewPiece(0, 3, (10, 4))]


def test_an_item_is_its_pieces_views_without_a_store(shards, manifest):
    pieces, batch, targets = ViewDataset(shards, manifest, MAKER, [PIECES[:1], PIECES])[1]
    assert pieces == PIECES and targets is None
    assert batch.idx.tolist() == [SPC + 5, SPC + 0, SPC + 11, 10, 4]
    assert batch.v.tolist() == [2, 2, 2, 3, 3]
    samples = {s: samples_of(shards, s) for s in (0, 1)}
    assert batch.label.tolist() == [samples[p.shard][i].label for p in PIECES for i in p.positions]
    # The pixels are the maker's views of exactly these samples in these views.
    want = torch.cat([MAKER.shard_views(samples[p.shard], p.shard, p.v, list(p.positions)).images for p in PIECES])
    assert torch.equal(batch.images, want)


def test_an_item_decodes_each_sample_once_for_all_its_pieces(shards, manifest, monkeypatch):
    """When the world is smaller than R, an item holds the R copies of its samples as R pieces, in views of one
    pairing group (the same partners). Each sample is decoded once, not R times, and the views are still the
    maker's, piece by piece, in the pieces' order."""
    copies = [ViewPiece(2, v, (1, 6, 4)) for v in (3, 4, 5)]  # pairing_views 3: views 3, 4, 5 share one pairing
    item = [*copies, ViewPiece(0, 3, (2,))]
    decoded = []
    for module in (view_dataset, views_module):
        real = module.decode_rgb
        monkeypatch.setattr(module, "decode_rgb", lambda image, real=real: decoded.append(image) or real(image))
    _, batch, _ = ViewDataset(shards, manifest, MAKER, [item])[0]
    samples = {s: samples_of(shards, s) for s in (0, 2)}
    # Every view is mixed (mix_prob 1): each piece needs its positions and their partners.
    needed = {(p.shard, q) for p in item for q in p.positions}
    needed |= {(p.shard, int(MAKER.partner_positions(p.shard, len(samples[p.shard]), p.v)[q]))
               for p in item for q in p.positions}
    assert sorted(map(bytes, decoded)) == sorted(bytes(samples[s][q].image) for s, q in needed)
    want = [MAKER.shard_views(samples[p.shard], p.shard, p.v, list(p.positions)).images for p in item]
    assert torch.equal(batch.images, torch.cat(want))
    # An image is kept while pieces still to come use it, then dropped: none is left when the item is done.
    decodes = ItemDecodes(MAKER, item, samples)
    held = []
    for p in item:
        MAKER.shard_views(samples[p.shard], p.shard, p.v, list(p.positions), decoded=decodes.of(p.shard))
        held.append(decodes.held)
    shard_2 = sum(s == 2 for s, _ in needed)
    assert held == [shard_2, shard_2, 0, 0]


class SharedImages(Dataset):
    """Whether an item's images are in shared memory where the item is made."""

    def __init__(self, views: ViewDataset):
        self.views = views

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, i: int) -> bool:
        return self.views[i][1].images.is_shared()


def test_a_worker_makes_an_items_images_in_shared_memory(shards, manifest):
    """As torch's default_collate does with its batches: handing the item to the main process then copies no
    pixels (a tensor outside shared memory is copied into it on the way)."""
    views = ViewDataset(shards, manifest, MAKER, [PIECES, PIECES[:1]])
    assert list(DataLoader(SharedImages(views), batch_size=None, num_workers=1)) == [True, True]
    assert not SharedImages(views)[0]  # in the main process, plain memory


def test_an_item_joins_each_view_with_its_own_store_row(shards, manifest, store):
    """The teacher outputs returned are those of the rows (idx, v) of the views returned, in their order."""
    _, batch, targets = ViewDataset(shards, manifest, MAKER, [PIECES], store)[0]
    assert batch.idx.tolist() == [17, 12, 23, 10, 4] and batch.v.tolist() == [2, 2, 2, 3, 3]
    want = teacher_rows(batch.idx.numpy(), batch.v.numpy())
    assert np.array_equal(targets.topk_logits.numpy(), want["logits"])
    assert np.array_equal(targets.topk_classes.numpy(), want["classes"]) and targets.topk_classes.dtype == torch.int64
    assert np.array_equal(targets.tail_lse.numpy(), want["tail_lse"])
    assert np.array_equal(targets.codes.numpy(), want["code"])


@pytest.mark.parametrize("field", list(DRIFT))
def test_a_row_whose_replay_record_differs_is_refused(shards, manifest, store, field):
    """Each of partner, lambda and digest alone must refuse the join (the other two still agree), naming the
    unit; a piece that leaves the drifted row out joins."""
    shard = DRIFT[field]
    with pytest.raises(InputError, match=f"replay drift in shard {shard} view 0: .*verify-store"):
        ViewDataset(shards, manifest, MAKER, [[ViewPiece(shard, 0, (2, 7, 9))]], store)[0]
    _, _, targets = ViewDataset(shards, manifest, MAKER, [[ViewPiece(shard, 0, (2, 9))]], store)[0]
    assert targets.topk_logits[:, 0].tolist() == [shard * SPC + 2, shard * SPC + 9]


def test_a_worker_keeps_two_shards_of_four_views(shards, manifest, store, monkeypatch):
    """A worker keeps 8 store units (two shards x R <= 4 views), opening the store once: walking them again
    reads nothing, a ninth unit evicts the least recent."""
    reads, opens = [], []
    read_unit, open_store = TeacherStore.read_unit, TeacherStore.open
    monkeypatch.setattr(TeacherStore, "read_unit", lambda self, s, v: reads.append((s, v)) or read_unit(self, s, v))
    monkeypatch.setattr(TeacherStore, "open", lambda url, split: opens.append(url) or open_store(url, split))
    eight, ninth = GOOD_UNITS[:8], GOOD_UNITS[8]
    plan = [[ViewPiece(s, v, (3,))] for s, v in eight + eight + [ninth, (0, 0)]]
    dataset = ViewDataset(shards, manifest, MAKER, plan, store)
    for i in range(len(plan)):
        dataset[i]
    assert reads == eight + [ninth, (0, 0)]
    assert opens == [store]


# ---------------------------------------------------------------------------------- eval slices


def source_file(folder: Path, key: str) -> Path:
    """The ImageFolder file a shard sample came from: its key is the relative path with _xx escapes."""
    return folder / "val" / re.sub(r"_([0-9a-f]{2})", lambda m: chr(int(m[1], 16)), key)


def test_eval_items_are_batch_slices_of_each_shard_with_their_source_pixels(shards, fmnist_folder):
    """val shards 3 and 4 (12 and 2 samples) in slices of 5: a shard's last slice short, none crossing shards;
    an item's images are its source files' pixels through the transform, its labels their class folders."""
    val = ShardManifest.load(shards, "val")
    dataset = EvalDataset(shards, val, [3, 4], PILToTensor(), 5)
    assert dataset.items == [(3, 0, 5), (3, 5, 10), (3, 10, 12), (4, 0, 2)]
    assert len(dataset) == 4
    keys = {s: [x.key for x in samples_of(shards, s, "val")] for s in (3, 4)}
    for i, (shard, start, end) in [(2, (3, 10, 12)), (3, (4, 0, 2))]:
        images, labels = dataset[i]
        files = [source_file(fmnist_folder, k) for k in keys[shard][start:end]]
        gray = np.stack([np.asarray(Image.open(f)) for f in files])  # Fashion-MNIST PNGs are 8-bit gray
        assert images.dtype == torch.uint8 and images.shape == (end - start, 3, 28, 28)
        assert all(np.array_equal(images[:, c].numpy(), gray) for c in range(3))  # gray -> RGB: equal channels
        assert labels.dtype == torch.int64
        assert labels.tolist() == [val.classes.index(f.parent.name) for f in files]


@pytest.mark.parametrize("world", [2, 3, 7])
def test_every_rank_gets_as_many_eval_items_the_extra_ones_masked(shards, world):
    """ZeRO-3 gathers parameters in every forward, so ranks must run as many eval batches: a rank short of
    items (fewer or smaller shards, or none) repeats the split's first slice with labels -1, and the real
    items of all ranks are every slice of the split exactly once."""
    val = ShardManifest.load(shards, "val")
    ranks = [EvalDataset.for_rank(shards, val, RankContext(r, world), PILToTensor(), 5) for r in range(world)]
    assert len({len(d) for d in ranks}) == 1
    real = [item for d in ranks for item in d.items]
    everything = [(s, a, min(a + 5, len(val.shard_range(s))))
                  for s in range(val.num_shards) for a in range(0, len(val.shard_range(s)), 5)]
    assert sorted(real) == everything
    first = EvalDataset(shards, val, [0], PILToTensor(), 5)[0]
    for d in ranks:
        for i in range(len(d.items), len(d)):
            images, labels = d[i]
            assert torch.equal(images, first[0]) and labels.tolist() == [-1] * len(first[1])
        if d.items:
            assert (d[0][1] >= 0).all()


def test_a_pinned_loader_pins_every_tensor_of_views_and_store_rows(shards, manifest, store, monkeypatch):
    """DataLoader(pin_memory=True) pins what it knows (tensors, tuples, lists) and calls pin_memory() on the
    rest: our batches and store rows must answer, or a GPU run's copies stay synchronous. (Pinning needs CUDA:
    here Tensor.pin_memory marks the tensors instead.)"""
    from torch.utils.data._utils.pin_memory import pin_memory

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a: pinned.append(t) or t.clone())
    plan = [[ViewPiece(0, 0, (0, 1, 2))]]
    item = ViewDataset(shards, manifest, MAKER, plan, store)[0]
    pieces, batch, stored = pin_memory(item)
    assert pieces == plan[0] and len(pinned) == 8 + 4
    assert torch.equal(batch.images, item[1].images) and torch.equal(stored.codes, item[2].codes)


@pytest.mark.parametrize("fed", [False, True], ids=["workers-read", "fed"])
def test_one_persistent_loader_serves_every_epoch_with_the_plans_items(shards, manifest, fed, monkeypatch):
    """TrainViews keeps one loader whose worker processes live across epochs (and resumes): each pass yields
    exactly the items of that epoch's plan from the step asked for, as a fresh dataset computes them; also when
    the shards come with the steps, read by the rank (as from an object store: data.shard_feed)."""
    from deit_pipe.data.schedule import EpochPlan, rank_items
    from deit_pipe.data.shard_feed import ShardFeed
    from deit_pipe.data.view_dataset import TrainViews

    if fed:
        monkeypatch.setattr(view_dataset, "ShardFeed", functools.partial(ShardFeed, read_here=True))
        real = view_dataset.read_shard

        def main_process_only(url):
            assert get_worker_info() is None, f"a worker read {url} itself"
            return real(url)

        monkeypatch.setattr(view_dataset, "read_shard", main_process_only)

    def plans(epoch):
        return EpochPlan(manifest.num_samples, epoch, 3, 1, 16)

    views = TrainViews(shards, manifest, MAKER, plans, rank=0, seed=0, store_url=None, store_views=None,
                       allow_view_reuse=False, workers=2)
    workers = set()
    for epoch, start in ((0, 0), (1, 0), (3, 5), (1, 2)):
        loader = views.loader(epoch, start)
        got = list(loader)
        workers.add(tuple(w.pid for w in loader._iterator._workers))  # torch's own handle on its workers
        plan = rank_items(MAKER, manifest, plans(epoch), 0, 0, None)
        want = ViewDataset(shards, manifest, MAKER, plan)
        assert len(got) == len(plan) - start == views.steps_in(epoch) - start
        for i, (pieces, batch, stored) in enumerate(got, start=start):
            assert pieces == plan[i] and stored is None
            assert torch.equal(batch.images, want[i][1].images) and torch.equal(batch.idx, want[i][1].idx)
    assert len(workers) == 1 and len(next(iter(workers))) == 2  # the same two worker processes in every pass


def test_a_pass_through_epochs_makes_the_next_epochs_first_batch_before_it_is_asked_for(shards, manifest, tmp_path,
                                                                                        monkeypatch):
    """train walks one loader pass through its epochs: the pass yields each epoch's plan items in turn (from the
    start step in the first), and while the last batches of an epoch are trained on, the workers already make
    the next epoch's first (a pass per epoch would start it only when asked, a whole batch's work later)."""
    from deit_pipe.data.schedule import EpochPlan, rank_items
    from deit_pipe.data.view_dataset import EpochViews, TrainViews

    made = tmp_path / "made"
    make = EpochViews.__getitem__

    def logged(self, item):  # runs in the forked worker: the log is a file
        out = make(self, item)
        with open(made, "a") as f:
            f.write(f"{item[0]} {item[1]}\n")
        return out

    monkeypatch.setattr(EpochViews, "__getitem__", logged)

    def plans(epoch):
        return EpochPlan(manifest.num_samples, epoch, 3, 1, 16)

    views = TrainViews(shards, manifest, MAKER, plans, rank=0, seed=0, store_url=None, store_views=None,
                       allow_view_reuse=False, workers=1)
    want = [(epoch, i, item) for epoch in (0, 1, 2) for i, item in enumerate(rank_items(MAKER, manifest, plans(epoch),
                                                                                        0, 0, None))][2:]
    try:
        batches = views.walk(0, 2, 3)
        first_epoch = [next(batches) for _ in range(views.steps_in(0) - 2)]
        deadline = time.monotonic() + 30
        while "1 0" not in (made.read_text().splitlines() if made.exists() else []) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "1 0" in made.read_text().splitlines(), "epoch 1's first batch was not made ahead"
        got = first_epoch + list(batches)
        assert [pieces for pieces, _, _ in got] == [item for _, _, item in want]
        assert made.read_text().splitlines() == [f"{epoch} {i}" for epoch, i, _ in want]
    finally:
        views.close()


def test_close_ends_the_workers_of_a_pass_still_held(shards, manifest):
    """A frame that outlives a run holds its pass (a library's cached traceback): close() still ends the workers."""
    from deit_pipe.data.schedule import EpochPlan
    from deit_pipe.data.view_dataset import TrainViews

    views = TrainViews(shards, manifest, MAKER, lambda epoch: EpochPlan(manifest.num_samples, epoch, 3, 1, 16), rank=0,
                       seed=0, store_url=None, store_views=None, allow_view_reuse=False, workers=1)
    others = set(multiprocessing.active_children())  # earlier tests' loaders in this process
    batches = views.walk(0, 0, 2)
    next(batches)
    workers = set(multiprocessing.active_children()) - others
    assert len(workers) == 1
    views.close()
    assert not workers & set(multiprocessing.active_children()) and list(batches) == []


def _exchange_rank(rank: int, world: int, port: int, shards: str, batch: int, accum: int) -> None:
    """One rank of test_a_team_exchange_gives_every_rank_the_micro_batch_it_makes_alone (spawned)."""
    import torch.distributed as dist

    from deit_pipe.data.schedule import EpochPlan, rank_items
    from deit_pipe.distributed.team_exchange import TeamExchange

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        manifest = ShardManifest.load(shards, "train")
        plan = EpochPlan(manifest.num_samples, 1, 3, world, batch, accum)
        exchange = TeamExchange(plan.teams, rank)
        made = ViewDataset(shards, manifest, MAKER, rank_items(MAKER, manifest, plan, rank, 0, None, exchange=True))
        alone = ViewDataset(shards, manifest, MAKER, rank_items(MAKER, manifest, plan, rank, 0, None))
        assert plan.steps >= 2
        for step in range(plan.steps):
            got, stored = exchange.own(made[step][1], None, plan.routes(rank, step), torch.device("cpu"))
            want = alone[step][1]
            assert stored is None and len(got.idx) == batch
            for name in ("idx", "v", "images", "label", "partner", "partner_label", "lam", "digest"):
                assert torch.equal(getattr(got, name), getattr(want, name)), (rank, step, name)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_team_exchange_gives_every_rank_the_micro_batch_it_makes_alone(shards):
    """train --exchange without a model: 7 ranks joined by gloo, in RA teams of R = 3 (one of 4 ranks, one of 3),
    at batch 3 and gradient accumulation 2, each make every copy of their share of a step's samples and swap them
    by all_to_all; every rank then holds, field for field and bit for bit, the micro batch it makes alone in
    every micro step."""
    world, batch, accum = 7, 3, 2
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_exchange_rank, args=(world, port, shards, batch, accum), nprocs=world)
