"""Training views: a pure function of (recipe seed, split, idx, v), and really the DeiT mix (invariant 2)."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import RandAugment
from timm.data.mixup import mixup_target
from torch.utils.data import DataLoader, Dataset

from deit_pipe.data.recipe import ViewRecipe
from deit_pipe.data.views import ViewMaker, decode_rgb, mixed_targets, view_digest
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
    assert all(np.array_equal(x, y) for x, y in zip(before[1], after[1]))
    assert torch.equal(before[2], after[2])


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
            assert all(p != i for p, i in zip(partners, idxs))  # one cycle through all: nobody pairs with self
            nxt = dict(zip(idxs, partners))
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


def test_grayscale_and_palette_images_decode_to_rgb(shards):
    for sample in shards[0][:4]:
        assert decode_rgb(sample.image).mode == "RGB"


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


def test_view_digest_is_pinned():
    """The digest binds existing stores: blake2b-32 of float16 pixels (little endian), float32 -0.0 as +0.0.

    The constants were computed with the first definition, (x + 0.0).to(float16); a float32 -1e-9 rounds
    to a float16 -0.0 and keeps its sign, so it differs from +0.0.
    """
    x = torch.linspace(-3, 3, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    x[0, 0, 0, :3] = torch.tensor([-0.0, -1e-9, 1e-9])
    x[1, 2, 3, 3] = -0.0
    assert view_digest(x).tolist() == [3671270465, 2333853036]
    signless = x.clone()
    signless[0, 0, 0, 0] = signless[1, 2, 3, 3] = 0.0
    assert torch.equal(view_digest(signless), view_digest(x))
    underflow_sign = x.clone()
    underflow_sign[0, 0, 0, 1] = 0.0
    assert view_digest(underflow_sign).tolist() == [2393573723, 2333853036]
