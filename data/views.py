"""Training views (DESIGN invariant 2): view v of sample idx, a pure function of (recipe seed, split, idx, v).

A view is made in three steps, each from its own key (a numpy SeedSequence hashed from its inputs):
1. unmixed view of (idx, v): decode to RGB, then timm's DeiT train transform (RandomResizedCrop,
   flip, RandAugment, normalise, random erasing), key ("view", seed, split, idx, v);
2. partner: the next sample in a permutation of the shard's positions, key ("pair", seed, split, shard,
   v // pairing_views), so every partner is in the same image shard (a shard of one pairs a sample with
   itself), and the views of one block of `pairing_views` share the pairing: repeated augmentation's R
   copies of a sample are mixed with copies of one partner, as in DeiT, where a batch's mixing partner is
   its mirror position and the copies of an image sit side by side;
3. mix of the unmixed views of (idx, v) and (partner, v): Mixup or CutMix, lambda and box drawn like
   timm's per-element Mixup, key ("mix", seed, split, idx, v); CutMix lambda is 1 - clipped box area.

timm's transforms draw from the process's global generators; they run inside data.rng's
`seeded_global_rngs`, which seeds them from the key and restores their states afterwards.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch
from isal import isal_zlib
from PIL import Image
from timm.data.mixup import cutmix_bbox_and_lam

from deit_pipe.data.mixing import NO_MIX, MixParams, mix_views
from deit_pipe.data.recipe import ViewRecipe
from deit_pipe.data.rng import global_rngs_restored, permutation, seed_sequence, seeded_global_rngs
from deit_pipe.errors import InputError
from deit_pipe.storage.shards import ShardSample
from deit_pipe.tensor_fields import TensorFields


def decode_rgb(image: bytes) -> Image.Image:
    """Stored image bytes -> PIL RGB (grayscale and palette images are converted here; an RGB one is not copied,
    35 of a 500x375 JPEG's 900 us)."""
    img = Image.open(io.BytesIO(image))
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


@dataclass
class ViewBatch(TensorFields):
    """Mixed views with their replay records (one shard and view each, or several joined by a loader)."""

    idx: torch.Tensor  # [n] int64
    v: torch.Tensor  # [n] int64
    images: torch.Tensor  # [n, 3, H, W] float32, normalised, mixed
    label: torch.Tensor  # [n] int64
    partner: torch.Tensor  # [n] int64 partner idx
    partner_label: torch.Tensor  # [n] int64
    lam: torch.Tensor  # [n] float32, weight of the sample's own label
    digest: torch.Tensor  # [n] int64 holding the uint32 pixel digest


# How a view's pixels are digested (view_digest), by name; a store records the one its views carry. crc32 since
# store provenance names it: a drift check needs no signature, and it costs a fraction of blake2b's 220 us a
# 224 px view. Stores made before name none: blake2b. crc32 is zlib's, computed by ISA-L (13 us, zlib's own 95).
VIEW_DIGESTS: dict[str, Callable[[bytes], int]] = {
    "blake2b": lambda data: int.from_bytes(hashlib.blake2b(data, digest_size=4).digest(), "little"),
    "crc32": isal_zlib.crc32,
}
VIEW_DIGEST = "crc32"  # what new stores use


class ViewMaker:
    def __init__(self, recipe: ViewRecipe, split: str, digest: str = VIEW_DIGEST):
        if digest not in VIEW_DIGESTS:
            raise InputError(f"view digest {digest!r} is not one this deit-pipe knows ({', '.join(VIEW_DIGESTS)}): "
                             f"the store was made by a newer deit-pipe")
        self.recipe = recipe
        self.split = split
        self.digest = digest
        self._transform = recipe.train_transform()

    @classmethod
    def for_store(cls, recipe: ViewRecipe, split: str, attrs: dict | None) -> ViewMaker:
        """A maker whose digests are those of the teacher store with attributes `attrs` (its provenance names
        them; one that names none is blake2b); without a store, the default's."""
        if attrs is None:
            return cls(recipe, split)
        return cls(recipe, split, attrs.get("provenance", {}).get("view_digest", "blake2b"))

    def _key(self, purpose: str, unit: int, v: int) -> np.random.SeedSequence:
        return seed_sequence(purpose, self.recipe.seed, self.split, unit, v)

    def pairing_block(self, v: int) -> int:
        """The block of views that share view v's mixing pairing (and so its cycle through each shard)."""
        return v // self.recipe.pairing_views

    def partner_positions(self, shard_index: int, n: int, v: int) -> np.ndarray:
        """Partner position of each of a shard's n positions in view v: one cycle through all of them."""
        order = permutation(n, "pair", self.recipe.seed, self.split, shard_index, self.pairing_block(v))
        partner = np.empty(n, dtype=np.int64)
        partner[order] = np.roll(order, -1)
        return partner

    def partners(self, shard_index: int, idxs: list[int], v: int) -> list[int]:
        """Partner idx of each idx; `idxs` are all of the shard's ids in stored (ascending) order."""
        _check_ascending(idxs)
        return [idxs[p] for p in self.partner_positions(shard_index, len(idxs), v)]

    def unmixed(self, sample: ShardSample, v: int, image: Image.Image | None = None) -> torch.Tensor:
        """[3, H, W] float32: the view before mixing; `image` is the sample already decoded (else decoded here)."""
        image = decode_rgb(sample.image) if image is None else image
        with seeded_global_rngs(self._key("view", sample.idx, v)):
            return self._transform(image)

    def mix_params(self, idx: int, v: int) -> MixParams:
        r = self.recipe
        if not r.mixing:
            return NO_MIX
        with seeded_global_rngs(self._key("mix", idx, v)):
            # The draws of timm's per-element Mixup for one element: mode, lambda, apply-or-not, box.
            use_cutmix = r.cutmix_alpha > 0 and (r.mixup_alpha <= 0 or np.random.rand() < r.switch_prob)
            alpha = r.cutmix_alpha if use_cutmix else r.mixup_alpha
            lam = float(np.random.beta(alpha, alpha))
            if np.random.rand() >= r.mix_prob:
                return NO_MIX
            if not use_cutmix:
                return MixParams("mixup", float(np.float32(lam)))
            box, lam = cutmix_bbox_and_lam((r.img_size, r.img_size), lam, correct_lam=True)
            return MixParams("cutmix", float(np.float32(lam)), tuple(int(b) for b in box))

    @global_rngs_restored()  # once for the batch: each view's seeded scopes then only seed
    def shard_views(
        self, samples: list[ShardSample], shard_index: int, v: int, positions: Sequence[int] | None = None,
        decoded: Callable[[int], Image.Image] | None = None, out: torch.Tensor | None = None,
    ) -> ViewBatch:
        """Mixed views of samples[positions] (default all); `samples` is the whole shard in stored order.

        Each unmixed view needed (the requested samples' and their partners') is computed once. Work goes
        along the pairing cycle so that an unmixed view is dropped as soon as both its users are done.
        `decoded` (position -> RGB image) lets a caller decode a sample once for several views of it; `out`
        ([len(positions), 3, H, W] float32) is where the images go, else a new tensor.
        """
        idxs = [s.idx for s in samples]
        _check_ascending(idxs)
        positions = list(range(len(samples)) if positions is None else positions)
        partner_pos = self.partner_positions(shard_index, len(samples), v)
        size = self.recipe.img_size
        images = torch.empty((len(positions), 3, size, size), dtype=torch.float32) if out is None else out
        slot = {p: i for i, p in enumerate(positions)}
        params = {p: self.mix_params(idxs[p], v) for p in positions}
        uses = Counter(positions)
        uses.update(int(partner_pos[p]) for p in positions if params[p].mode != "none")
        cache: dict[int, torch.Tensor] = {}

        def take(p: int) -> torch.Tensor:
            if p not in cache:
                cache[p] = self.unmixed(samples[p], v, decoded(p) if decoded else None)
            uses[p] -= 1
            return cache[p] if uses[p] else cache.pop(p)

        for p in _cycle_order(positions, partner_pos):
            own = take(p)
            partner = take(int(partner_pos[p])) if params[p].mode != "none" else own
            mix_views(own, partner, params[p], out=images[slot[p]])

        partner_idx = [idxs[partner_pos[p]] for p in positions]
        return ViewBatch(
            idx=torch.tensor([idxs[p] for p in positions], dtype=torch.int64),
            v=torch.full((len(positions),), v, dtype=torch.int64),
            images=images,
            label=torch.tensor([samples[p].label for p in positions], dtype=torch.int64),
            partner=torch.tensor(partner_idx, dtype=torch.int64),
            partner_label=torch.tensor([samples[partner_pos[p]].label for p in positions], dtype=torch.int64),
            lam=torch.tensor([params[p].lam for p in positions], dtype=torch.float32),
            digest=view_digest(images, self.digest),
        )


def _check_ascending(idxs: Sequence[int]) -> None:
    # The pairing is over stored positions: another order would silently give other partners.
    if any(a >= b for a, b in pairwise(idxs)):
        raise InputError("shard samples must be given in stored (ascending idx) order")


def cycle_walk(partner_pos: np.ndarray, start: int = 0) -> list[int]:
    """Every position along the pairing cycle from `start`: start, partner(start), partner(partner(start)), ..."""
    order, p = [], start
    for _ in range(len(partner_pos)):
        order.append(p)
        p = int(partner_pos[p])
    return order


def _cycle_order(positions: list[int], partner_pos: np.ndarray) -> list[int]:
    """`positions` along the pairing cycle from the first of them (a run of the cycle keeps its order)."""
    wanted = set(positions)
    return [p for p in cycle_walk(partner_pos, positions[0] if positions else 0) if p in wanted]


def view_digest(images: torch.Tensor, kind: str = VIEW_DIGEST) -> torch.Tensor:
    """[n] int64 holding a uint32 per view: VIEW_DIGESTS[kind] of the view's pixels rounded to float16 (little
    endian).

    Rounding to float16 keeps the digest stable across machines whose float32 results differ in the last
    bits (SIMD paths, library builds), while any real drift (another crop, flip, op, partner) changes it.
    A float32 -0.0 is hashed as +0.0, so a sign-only difference of zero does not count; a tiny negative
    that rounds to -0.0 in float16 keeps its sign (the definition every existing store was written with).
    """
    pixels = images.detach().to("cpu", torch.float32).contiguous()
    # One view's float16 buffer, reused: a batch-sized one is fresh memory each batch, whose first touch cost
    # more than the rounding (0.2 against 0.1 ms a 224 px view in the loader).
    half = torch.empty(pixels.shape[1:], dtype=torch.float16)
    bits, digest = half.numpy().view(np.int16), VIEW_DIGESTS[kind]
    digests = []
    for view in pixels:
        half.copy_(view)
        # float16 -0.0 is the int16 minimum (0x8000), and almost never there: a numpy min finds out (10 us a 224
        # px view, against 150 for torch's == and any() on one thread); only then the float32 check.
        if bits.size and bits.min() == -0x8000:
            bits[(bits == -0x8000) & (view == 0).numpy()] = 0
        digests.append(digest(half.numpy().astype("<f2", copy=False).data))
    return torch.tensor(digests, dtype=torch.int64)
