"""Training views: a pure function of (recipe seed, split, idx, v), and really the DeiT mix (invariant 2)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import weakref
import zlib
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import RandAugment
from timm.data.mixup import cutmix_bbox_and_lam, mixup_target
from torch.utils.data import DataLoader, Dataset

from deit_pipe.data.mixing import MixParams, mixed_targets
from deit_pipe.data.recipe import ViewRecipe
from deit_pipe.data.rng import seed_sequence
from deit_pipe.data.views import VIEW_DIGESTS, ViewMaker, cycle_walk, decode_rgb, view_digest
from deit_pipe.errors import InputError
from deit_pipe.pipeline.fashion_mnist import write_image_folder
from deit_pipe.storage.shards import ShardSample, read_shard, write_shard

RECIPE = ViewRecipe(img_size=32, seed=7)
SPLIT = "train"
PER_SHARD = 6


def _encode(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


_FORMATS = [("JPEG", "jpg", None), ("PNG", "png", None), ("PNG", "png", "L"), ("PNG", "png", "P")]


def _synthetic_sample(idx: int) -> ShardSample:
    """A structured noisy image; formats cycle through RGB JPEG, RGB PNG, grayscale PNG, palette PNG."""
    rs = np.random.RandomState(idx)
    h, w = 24 + 3 * idx, 40 - idx
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([yy * 255 // h, xx * 255 // w, (yy + xx) * 127 // (h + w)], -1)
    array = np.clip(base + rs.randint(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    fmt, ext, mode = _FORMATS[idx % len(_FORMATS)]
    image = _encode(array, fmt, mode)
    return ShardSample(key=f"synthetic/{idx:04d}", idx=idx, label=idx % 5, image=image, ext=ext)


@pytest.fixture(scope="module")
def shards() -> list[list[ShardSample]]:
    """Two synthetic shards of a split with 11 samples, S = 6."""
    samples = [_synthetic_sample(i) for i in range(11)]
    return [samples[s : s + PER_SHARD] for s in range(0, len(samples), PER_SHARD)]


@pytest.fixture(scope="module")
def fmnist_shard(tmp_path_factory) -> list[ShardSample]:
    """Eight real Fashion-MNIST images (grayscale PNGs) as shard 0."""
    root = tmp_path_factory.mktemp("fmnist")
    write_image_folder(str(root), limit=40, val_limit=10)
    paths = sorted((root / "train").rglob("*.png"))[::5][:8]
    classes = sorted(p.name for p in (root / "train").iterdir())
    return [
        ShardSample(key=p.stem, idx=i, label=classes.index(p.parent.name), image=p.read_bytes(), ext="png")
        for i, p in enumerate(paths)
    ]


def _assert_same(a, b):
    assert torch.equal(a.v, b.v)
    for name in ("idx", "images", "label", "partner", "partner_label", "lam", "digest"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def _global_rng_state():
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _assert_rng_state_equal(before, after):
    assert before[0] == after[0]
    assert all(np.array_equal(x, y) for x, y in zip(before[1], after[1], strict=True))
    assert torch.equal(before[2], after[2])


@contextmanager
def _global_rngs_seeded_for(*parts):
    """The module's seeding rule written out: the key's first six 32-bit words seed python `random` (words
    0-1), numpy (words 2-3) and torch's CPU generator (words 4-5); the process's states come back after."""
    words = seed_sequence(*parts).generate_state(6)
    before = _global_rng_state()
    random.seed(int(words[0]) | int(words[1]) << 32)
    np.random.seed(words[2:4])
    torch.default_generator.manual_seed(int(words[4]) | int(words[5]) << 32)
    try:
        yield
    finally:
        random.setstate(before[0])
        np.random.set_state(before[1])
        torch.set_rng_state(before[2])


def _track_unmixed(maker):
    """Wrap maker.unmixed: returns (computed, held), filled per call with the idx computed and the number of
    the views computed before it that are still referenced somewhere (weak references tell)."""
    computed, held, refs = [], [], []
    unmixed = maker.unmixed

    def tracking(sample, v, image=None):
        held.append(sum(ref() is not None for ref in refs))
        view = unmixed(sample, v, image)
        refs.append(weakref.ref(view))
        computed.append(sample.idx)
        return view

    maker.unmixed = tracking
    return computed, held


# ---- recipe -------------------------------------------------------------------------------------------------


def test_recipe_round_trip_hash_and_small_image_hparams():
    d = json.loads(json.dumps(RECIPE.to_dict()))
    again = ViewRecipe.from_dict(d)
    assert again == RECIPE and again.hash() == RECIPE.hash()
    assert ViewRecipe(img_size=32, seed=8).hash() != RECIPE.hash()
    assert ViewRecipe().auto_augment == "rand-m9-mstd0.5-inc1" and ViewRecipe().img_size == 224
    with pytest.raises(InputError, match="unknown"):
        ViewRecipe.from_dict({**d, "colour": 1})

    # RandAugment's fill and translation follow the recipe's mean and (small) image size.
    rand_augment = next(t for t in RECIPE.train_transform().transforms if isinstance(t, RandAugment))
    hparams = rand_augment.ops[0].hparams
    assert hparams["translate_const"] == int(32 * 0.45)
    assert hparams["img_mean"] == tuple(round(255 * m) for m in RECIPE.mean)

    val = RECIPE.eval_transform()(decode_rgb(_synthetic_sample(2).image))
    assert val.shape == (3, 32, 32)


# ---- purity: order, subsets, global RNG, processes, workers ------------------------------------------------


def test_views_independent_of_order_subsets_and_global_rng(shards):
    maker = ViewMaker(RECIPE, SPLIT)
    reference = [maker.shard_views(samples, s, v=0) for s, samples in enumerate(shards)]
    reference_unmixed = maker.unmixed(shards[1][0], v=0)

    random.seed(123)
    np.random.seed(5)
    torch.manual_seed(99)
    before = _global_rng_state()
    fresh = ViewMaker(RECIPE, SPLIT)
    for s in reversed(range(len(shards))):
        samples = shards[s]
        for p in reversed(range(len(samples))):  # one at a time, last first
            one = fresh.shard_views(samples, s, v=0, positions=range(p, p + 1))
            assert torch.equal(one.images[0], reference[s].images[p])
            assert one.digest[0] == reference[s].digest[p] and one.lam[0] == reference[s].lam[p]
        sub = fresh.shard_views(samples, s, v=0, positions=range(1, 4))
        assert torch.equal(sub.images, reference[s].images[1:4])
        assert torch.equal(sub.partner, reference[s].partner[1:4])
    assert torch.equal(fresh.unmixed(shards[1][0], v=0), reference_unmixed)
    _assert_rng_state_equal(before, _global_rng_state())


def test_a_batch_saves_and_restores_the_global_generators_once_not_once_per_view(shards, monkeypatch):
    """numpy's state copied out and back cost more than the seeding itself when every view did it."""
    saves = []
    get_state = np.random.get_state
    monkeypatch.setattr(np.random, "get_state", lambda *args: saves.append(1) or get_state(*args))
    before = _global_rng_state()
    batch = ViewMaker(RECIPE, SPLIT).shard_views(shards[0], 0, v=0)
    assert len(batch.idx) > 1 and len(saves) == 2  # the batch's own save, and `before`'s
    _assert_rng_state_equal(before, _global_rng_state())


def test_a_process_forked_while_another_thread_holds_the_rng_lock_still_makes_views(shards):
    """A loader worker forked while the lease's watcher held the lock for an object-store call would have inherited
    it held by a thread it does not have, and waited forever at its first view."""
    from deit_pipe.rng_lock import GLOBAL_RNG_LOCK

    held = threading.Event()

    def hold():
        with GLOBAL_RNG_LOCK:
            held.set()
            time.sleep(1)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    pid = os.fork()
    if pid == 0:  # the worker: one view, then out
        ViewMaker(RECIPE, SPLIT).unmixed(shards[0][0], v=0)
        os._exit(0)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    holder.join()
    assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0


_FRESH_PROCESS = """
import sys, torch
from deit_pipe.data.recipe import ViewRecipe
from deit_pipe.data.views import ViewMaker
from deit_pipe.storage.shards import read_shard
recipe = ViewRecipe.from_dict(__import__("json").loads(sys.argv[1]))
batch = ViewMaker(recipe, "train").shard_views(list(read_shard(sys.argv[2])), 1, v=3)
torch.save(vars(batch), sys.argv[3])
"""


def test_views_identical_in_fresh_process(shards, tmp_path):
    shard_path = str(tmp_path / "train-000001.tar")
    write_shard(shard_path, "train-000001.tar", shards[1])
    out = tmp_path / "views.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-c", _FRESH_PROCESS, json.dumps(RECIPE.to_dict()), shard_path, str(out)]
    subprocess.run(args, check=True, env=env, timeout=120)
    theirs = torch.load(out)
    ours = ViewMaker(RECIPE, SPLIT).shard_views(list(read_shard(shard_path)), 1, v=3)
    for name, value in vars(ours).items():
        assert torch.equal(torch.as_tensor(theirs[name]), torch.as_tensor(value)), name


class _ViewUnits(Dataset):
    """Work units (shard, v, positions) as a loader would read them."""

    def __init__(self, shards, units):
        self.maker = ViewMaker(RECIPE, SPLIT)
        self.shards = shards
        self.units = units

    def __len__(self):
        return len(self.units)

    def __getitem__(self, i):
        s, v, positions = self.units[i]
        return self.maker.shard_views(self.shards[s], s, v, positions)


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_views_identical_with_loader_workers(shards, num_workers):
    units = [(1, 2, range(0, 3)), (0, 1, None), (1, 2, range(3, 5)), (0, 2, range(2, 6))]
    maker = ViewMaker(RECIPE, SPLIT)
    torch.manual_seed(num_workers)  # the loader's own seeding must not matter either
    loader = DataLoader(_ViewUnits(shards, units), batch_size=None, num_workers=num_workers)
    for (s, v, positions), got in zip(units, loader, strict=True):
        _assert_same(got, maker.shard_views(shards[s], s, v, positions))


# ---- what each draw is keyed by ----------------------------------------------------------------------------


def test_seed_sequence_is_blake2b_of_the_compact_json_of_its_parts():
    """Every draw's key: SeedSequence(blake2b-128, little endian, of the compact JSON of its parts); numpy
    integers (a shard index from an array) count as the Python int they hold.

    Teacher logits are stored against the views they saw, so this derivation must never drift.
    """
    entropy = int.from_bytes(hashlib.blake2b(b'["view",7,"train",3,2]', digest_size=16).digest(), "little")
    assert seed_sequence("view", 7, "train", 3, 2).entropy == entropy
    assert seed_sequence("view", np.int64(7), "train", np.uint32(3), 2).entropy == entropy
    for loose in (7.0, True):  # would be rounded or read as 1: refused instead
        with pytest.raises(TypeError):
            seed_sequence("view", loose)


def test_unmixed_view_is_timms_transform_under_its_own_key(shards):
    """View v of sample idx is the recipe's timm train transform run under the key ("view", recipe seed,
    split, idx, v): the recipe seed, the split, the sample and v all feed it, and nothing else does."""
    maker = ViewMaker(RECIPE, SPLIT)
    for sample, v in [(shards[0][1], 0), (shards[1][2], 4)]:
        with _global_rngs_seeded_for("view", RECIPE.seed, SPLIT, sample.idx, v):
            expected = RECIPE.train_transform()(Image.open(io.BytesIO(sample.image)).convert("RGB"))
        assert torch.equal(maker.unmixed(sample, v), expected)


def test_mix_params_are_the_draws_under_the_mix_key():
    """Under the key ("mix", seed, split, idx, v): CutMix or Mixup (switch_prob), lambda ~ Beta(alpha, alpha)
    of that mode, mix or not (mix_prob), then timm's CutMix box with lambda corrected to 1 - clipped box
    area; lam is kept as a float32 value (what the batch stores)."""
    recipe = ViewRecipe(img_size=32, seed=7, mix_prob=0.5)
    maker = ViewMaker(recipe, SPLIT)
    modes = set()
    for idx in range(6):
        for v in range(2):
            with _global_rngs_seeded_for("mix", recipe.seed, SPLIT, idx, v):
                cutmix = np.random.rand() < recipe.switch_prob
                alpha = recipe.cutmix_alpha if cutmix else recipe.mixup_alpha
                lam = np.random.beta(alpha, alpha)
                if np.random.rand() >= recipe.mix_prob:
                    expected = MixParams("none", 1.0)
                elif cutmix:
                    box, lam = cutmix_bbox_and_lam((32, 32), lam)
                    expected = MixParams("cutmix", float(np.float32(lam)), tuple(int(b) for b in box))
                else:
                    expected = MixParams("mixup", float(np.float32(lam)))
            assert maker.mix_params(idx, v) == expected, (idx, v)
            modes.add(expected.mode)
    assert modes == {"none", "mixup", "cutmix"}


def test_pairing_is_the_permutation_under_the_pair_key_of_a_block_of_views():
    """Position p's partner is the one after p, cyclically, in RandomState(key ("pair", seed, split, shard,
    v // pairing_views)).permutation(n): views 0-2 share one pairing (DeiT's repeats), views 3-5 the next."""
    maker = ViewMaker(RECIPE, SPLIT)
    assert RECIPE.pairing_views == 3
    for shard, n in [(0, 6), (1, 5)]:
        for v in range(6):
            key = seed_sequence("pair", RECIPE.seed, SPLIT, shard, v // 3)
            order = np.random.RandomState(key.generate_state(4)).permutation(n).tolist()
            following = {p: order[(i + 1) % n] for i, p in enumerate(order)}
            assert maker.partner_positions(shard, n, v).tolist() == [following[p] for p in range(n)], (shard, v)


# ---- what the views are ------------------------------------------------------------------------------------


def test_different_v_gives_different_views(fmnist_shard):
    maker = ViewMaker(RECIPE, SPLIT)
    digests = torch.stack([maker.shard_views(fmnist_shard, 0, v).digest for v in range(3)])
    for i in range(digests.shape[1]):
        assert len(set(digests[:, i].tolist())) == 3
    unmixed = [maker.unmixed(fmnist_shard[0], v) for v in range(3)]
    assert not torch.equal(unmixed[0], unmixed[1]) and not torch.equal(unmixed[1], unmixed[2])
    assert unmixed[0].shape == (3, 32, 32) and unmixed[0].dtype == torch.float32


def test_partners_are_a_cyclic_pairing_within_the_shard(shards):
    maker = ViewMaker(RECIPE, SPLIT)
    for s, samples in enumerate(shards):
        idxs = [x.idx for x in samples]
        pairings = set()
        for v in range(4):
            partners = maker.partners(s, idxs, v)
            assert sorted(partners) == idxs  # a permutation of the shard's own ids
            # one cycle through all: nobody pairs with self
            assert all(p != i for p, i in zip(partners, idxs, strict=True))
            nxt = dict(zip(idxs, partners, strict=True))
            walk, i = [], idxs[0]
            for _ in idxs:
                walk.append(i)
                i = nxt[i]
            assert sorted(walk) == idxs
            batch = maker.shard_views(samples, s, v)
            assert batch.partner.tolist() == partners
            assert batch.partner_label.tolist() == [samples[idxs.index(p)].label for p in partners]
            pairings.add(tuple(partners))
        assert len(pairings) > 1  # the pairing is drawn per view

    lone = [shards[0][0]]
    assert maker.partners(0, [lone[0].idx], 0) == [lone[0].idx]
    assert maker.shard_views(lone, 0, 0).partner.tolist() == [lone[0].idx]
    with pytest.raises(InputError, match="ascending"):
        maker.shard_views(list(reversed(shards[0])), 0, 0)


def test_out_of_order_or_repeated_ids_are_refused():
    """The pairing is over stored positions, so ids that are not strictly ascending are refused: a single
    swapped neighbour pair, or one idx given twice."""
    maker = ViewMaker(RECIPE, SPLIT)
    for idxs in ([0, 2, 1, 3], [0, 1, 1, 2]):
        with pytest.raises(InputError, match=r"^shard samples must be given in stored \(ascending idx\) order$"):
            maker.partners(0, idxs, 0)


def test_cycle_walk_starts_at_position_0_by_default():
    """view_plan orders a shard's work as cycle_walk(partner_pos): 0, partner(0), partner(partner(0)), ..."""
    partner_pos = np.array([2, 0, 3, 1])  # 0 -> 2 -> 3 -> 1 -> 0
    assert cycle_walk(partner_pos) == [0, 2, 3, 1]
    assert cycle_walk(partner_pos, 3) == [3, 1, 0, 2]


def test_no_positions_give_an_empty_batch(shards):
    """A work unit's empty slice gives an empty batch, not an error, also in a shard of one sample."""
    maker = ViewMaker(RECIPE, SPLIT)
    for samples in (shards[0], shards[0][:1]):
        batch = maker.shard_views(samples, 0, 0, positions=[])
        assert batch.images.shape == (0, 3, 32, 32)
        assert batch.idx.tolist() == batch.partner.tolist() == batch.digest.tolist() == []


@pytest.mark.parametrize(
    "recipe, expected_modes",
    [
        (RECIPE, {"mixup", "cutmix"}),
        (ViewRecipe(img_size=32, seed=1, cutmix_alpha=0.0), {"mixup"}),
        (ViewRecipe(img_size=40, seed=2, mixup_alpha=0.0), {"cutmix"}),
    ],
    ids=["default", "mixup-only", "cutmix-only"],
)
def test_mixed_view_is_the_mix_of_the_unmixed_views(fmnist_shard, recipe, expected_modes):
    maker = ViewMaker(recipe, SPLIT)
    h = w = recipe.img_size
    modes = set()
    for v in range(3):
        batch = maker.shard_views(fmnist_shard, 0, v)
        assert batch.images.shape == (len(fmnist_shard), 3, h, w)
        assert torch.equal(batch.digest, view_digest(batch.images))
        for i, sample in enumerate(fmnist_shard):
            partner = fmnist_shard[int(batch.partner[i])]
            own_view, partner_view = maker.unmixed(sample, v), maker.unmixed(partner, v)
            params = maker.mix_params(sample.idx, v)
            lam = batch.lam[i]
            assert lam.item() == params.lam and 0.0 <= params.lam <= 1.0
            modes.add(params.mode)
            if params.mode == "mixup":
                assert torch.equal(batch.images[i], own_view * lam + partner_view * (1 - lam))
            else:
                assert params.mode == "cutmix"
                yl, yh, xl, xh = params.box
                assert 0 <= yl <= yh <= h and 0 <= xl <= xh <= w
                assert lam.item() == np.float32(1 - (yh - yl) * (xh - xl) / (h * w))
                inside = torch.zeros(h, w, dtype=torch.bool)
                inside[yl:yh, xl:xh] = True
                assert torch.equal(batch.images[i], torch.where(inside, partner_view, own_view))
    assert modes == expected_modes


def test_no_mixing_keeps_the_unmixed_view(shards):
    maker = ViewMaker(ViewRecipe(img_size=32, mix_prob=0.0), SPLIT)
    batch = maker.shard_views(shards[0], 0, 0)
    assert torch.equal(batch.lam, torch.ones(len(shards[0])))
    for i, sample in enumerate(shards[0]):
        assert torch.equal(batch.images[i], maker.unmixed(sample, 0))


@pytest.mark.parametrize("mix_prob", [1.0, 0.0])
def test_each_unmixed_view_is_made_once_and_dropped_after_its_last_use(shards, mix_prob):
    """shard_views makes each unmixed view it needs exactly once (the requested samples', and their partners'
    when mixed) and lets go of it once its users are done: along the pairing cycle at most two earlier views
    are alive when the next is made (one without mixing), so memory does not grow with the shard."""
    for positions in (None, range(1, 4)):
        maker = ViewMaker(ViewRecipe(img_size=32, seed=7, mix_prob=mix_prob), SPLIT)
        computed, held = _track_unmixed(maker)
        batch = maker.shard_views(shards[0], 0, 1, positions)
        needed = set(batch.idx.tolist()) | (set(batch.partner.tolist()) if mix_prob else set())
        assert sorted(computed) == sorted(needed)
        assert max(held) <= (2 if mix_prob else 1), held


def test_work_goes_along_the_pairing_cycle_from_the_first_position_asked_for(shards):
    """Unmixed views are made along the pairing cycle from the first position asked for, each right before
    its first use: a run of the cycle (here one that passes position 0) costs its own views and then the
    last one's partner, in that order, so none is held longer than its two users need."""
    maker = ViewMaker(RECIPE, SPLIT)
    walk = cycle_walk(maker.partner_positions(0, len(shards[0]), 1))
    run = walk[3:] + walk[:2]
    computed, _ = _track_unmixed(maker)
    maker.shard_views(shards[0], 0, 1, positions=run)
    assert computed == [shards[0][p].idx for p in run + [walk[2]]]


def test_grayscale_and_palette_images_decode_to_rgb(shards):
    """RGB JPEG and PNG, grayscale and palette PNG: PIL's own convert("RGB") of the decoded file, pixel for pixel."""
    for sample in shards[0][:4]:
        decoded = decode_rgb(sample.image)
        assert decoded.mode == "RGB"
        assert np.array_equal(np.asarray(decoded), np.asarray(Image.open(io.BytesIO(sample.image)).convert("RGB")))


# ---- targets -----------------------------------------------------------------------------------------------


def test_mixed_targets_match_formula_and_timm():
    label = torch.tensor([0, 3, 9, 4])
    partner_label = torch.tensor([3, 3, 1, 7])
    lam = torch.tensor([0.25, 0.6, 1.0, 0.0])
    targets = mixed_targets(label, partner_label, lam, num_classes=10, smoothing=0.1)
    assert targets.shape == (4, 10) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    off, on = 0.1 / 10, 1 - 0.1 + 0.1 / 10
    for i in range(4):
        own = torch.full((10,), off)
        own[label[i]] = on
        other = torch.full((10,), off)
        other[partner_label[i]] = on
        torch.testing.assert_close(targets[i], lam[i] * own + (1 - lam[i]) * other)

    # timm's batch Mixup pairs each sample with the flipped batch under one lambda: same numbers.
    flipped = mixed_targets(label, label.flip(0), torch.full((4,), 0.3), num_classes=10, smoothing=0.1)
    torch.testing.assert_close(flipped, mixup_target(label, 10, lam=0.3, smoothing=0.1))


def test_mixed_targets_are_float32_on_the_labels_device():
    """Targets are float32 on the labels' device however lam comes: as float64 numpy, or as a CPU list while the
    labels sit on an accelerator (the meta device stands in for one here). C = 3, smoothing 0.3: off 0.1, on 0.8."""
    label, partner_label = torch.tensor([2, 0]), torch.tensor([1, 2])
    targets = mixed_targets(label, partner_label, np.array([0.3, 0.9]), num_classes=3, smoothing=0.3)
    # row 0: 0.3 * [.1, .1, .8] + 0.7 * [.1, .8, .1]; row 1: 0.9 * [.8, .1, .1] + 0.1 * [.1, .1, .8]
    torch.testing.assert_close(targets, torch.tensor([[0.1, 0.59, 0.31], [0.73, 0.1, 0.17]]))
    on_device = mixed_targets(label.to("meta"), partner_label.to("meta"), [0.3, 0.9], num_classes=3, smoothing=0.3)
    assert on_device.device.type == "meta" and on_device.dtype == torch.float32 and on_device.shape == (2, 3)


def test_view_digest_is_pinned():
    """The digests bind existing stores: blake2b-32 (stores that name no digest) or crc32 (the default) of the
    float16 pixels (little endian), float32 -0.0 as +0.0.

    The blake2b constants were computed with the first definition, (x + 0.0).to(float16); a float32 -1e-9
    rounds to a float16 -0.0 and keeps its sign, so it differs from +0.0. crc32's are zlib's own of those bytes.
    """
    x = torch.linspace(-3, 3, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    x[0, 0, 0, :3] = torch.tensor([-0.0, -1e-9, 1e-9])
    x[1, 2, 3, 3] = -0.0
    assert view_digest(x, "blake2b").tolist() == [3671270465, 2333853036]
    signless = x.clone()
    signless[0, 0, 0, 0] = signless[1, 2, 3, 3] = 0.0
    underflow_sign = x.clone()
    underflow_sign[0, 0, 0, 1] = 0.0
    for kind in VIEW_DIGESTS:
        assert torch.equal(view_digest(signless, kind), view_digest(x, kind))
    assert view_digest(underflow_sign, "blake2b").tolist() == [2393573723, 2333853036]
    halves = signless.to(torch.float16)  # -1e-9 keeps its sign: float16 -0.0
    assert view_digest(x, "crc32").tolist() == [zlib.crc32(h.numpy().astype("<f2").tobytes()) for h in halves]
    assert view_digest(x).tolist() == view_digest(x, "crc32").tolist()  # the default


def test_a_store_names_its_view_digest_and_one_that_names_none_is_blake2b():
    assert ViewMaker.for_store(RECIPE, SPLIT, {"provenance": {"recipe": {}, "view_digest": "crc32"}}).digest == "crc32"
    assert ViewMaker.for_store(RECIPE, SPLIT, {"provenance": {"recipe": {}}}).digest == "blake2b"
    assert ViewMaker.for_store(RECIPE, SPLIT, None).digest == ViewMaker(RECIPE, SPLIT).digest == "crc32"
    with pytest.raises(InputError, match=r"view digest 'xxh3' is not one this deit-pipe knows \(blake2b, crc32\)"):
        ViewMaker(RECIPE, SPLIT, "xxh3")
