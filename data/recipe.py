"""The view recipe: every setting that shapes a training view, hashed to bind a teacher store to it.

Defaults are DeiT's (Touvron et al., 2021, main.py): RandomResizedCrop bicubic, flip, RandAugment
rand-m9-mstd0.5-inc1, random erasing 0.25 (pixel), Mixup 0.8 / CutMix 1.0 with switch prob 0.5,
label smoothing 0.1. Small images (img_size <= 32, CIFAR's size) follow DeiT's build_transform: a random
crop with 4 px of padding instead of the random resized crop, and evaluation without resizing. The
recipe is a plain value: CLI code elsewhere builds it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torchvision import transforms

from deit_pipe.errors import InputError

_TUPLE_FIELDS = ("mean", "std", "scale", "ratio")
SMALL_IMAGES = 32  # DeiT's threshold: at or below it, no resizing


@dataclass(frozen=True)
class ViewRecipe:
    img_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    interpolation: str = "bicubic"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    # DeiT's color jitter; as in timm and DeiT it only applies when auto_augment is off.
    color_jitter: float = 0.3
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    smoothing: float = 0.1
    # Consecutive views that share one mixing pairing: DeiT's 3 repeated-augmentation copies of an image are
    # mixed with copies of one partner, and train's --repeats must divide this.
    pairing_views: int = 3
    seed: int = 0

    def __post_init__(self):
        # JSON round trips give lists; keep tuples so equal recipes compare and hash equal.
        for name in _TUPLE_FIELDS:
            object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))
        if self.auto_augment in ("", "none"):  # DeiT's CLI spells "off" as "none"
            object.__setattr__(self, "auto_augment", None)
        if self.img_size <= 0:
            raise InputError(f"recipe img_size must be positive, got {self.img_size}")
        for name in ("hflip", "reprob", "mix_prob", "switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"recipe {name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.smoothing < 1.0:
            raise InputError(f"recipe smoothing must be in [0, 1), got {self.smoothing}")
        if self.pairing_views < 1:
            raise InputError(f"recipe pairing_views must be at least 1, got {self.pairing_views}")
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise InputError("recipe mixup_alpha and cutmix_alpha must be >= 0")

    @property
    def mixing(self) -> bool:
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> ViewRecipe:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise InputError(f"unknown view recipe fields: {sorted(unknown)}")
        return cls(**d)

    def with_overrides(self, overrides: dict) -> ViewRecipe:
        """This recipe with some fields replaced (unknown fields refused)."""
        return ViewRecipe.from_dict({**self.to_dict(), **overrides})

    def refuse_conflicts(self, overrides: dict, flag: str, owner: str) -> None:
        """Refuse `overrides` that would change this recipe, naming the first field that differs."""
        wanted = self.with_overrides(overrides)
        for f in fields(self):
            if getattr(wanted, f.name) != getattr(self, f.name):
                raise InputError(
                    f"{flag} conflicts with {owner}: {f.name} is {getattr(self, f.name)!r} there but "
                    f"{getattr(wanted, f.name)!r} here"
                )

    def hash(self) -> str:
        """sha256 of the canonical JSON (sorted keys, no spaces): equal settings give equal hashes."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def train_transform(self):
        """timm's DeiT train transform of a PIL RGB image, up to random erasing (mixing comes after)."""
        transform = create_transform(
            input_size=self.img_size,
            is_training=True,
            scale=self.scale,
            ratio=self.ratio,
            hflip=self.hflip,
            color_jitter=self.color_jitter,
            auto_augment=self.auto_augment,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            re_prob=self.reprob,
            re_mode=self.remode,
            re_count=self.recount,
        )
        if self.img_size <= SMALL_IMAGES:
            transform.transforms[0] = transforms.RandomCrop(self.img_size, padding=4, pad_if_needed=True)
        return _tabulated(transform)

    def eval_transform(self, crop_pct: float | None = None, crop_mode: str | None = None):
        """timm's eval transform (resize to img_size / crop_pct, centre crop, normalise) for validation images;
        small images are not resized (DeiT), only padded to img_size when smaller (28 px Fashion-MNIST).

        crop_pct and crop_mode default to timm's (0.875, as DeiT's main.py, and "center"): what a training run
        evaluates with; `deit-pipe eval` passes the model's own, as timm's validate.py does."""
        transform = create_transform(
            input_size=self.img_size,
            is_training=False,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            crop_pct=crop_pct,
            crop_mode=crop_mode,
        )
        if self.img_size <= SMALL_IMAGES:
            transform.transforms[:2] = [transforms.CenterCrop(self.img_size)]
        return _tabulated(transform)


class TabulatedNormalize:
    """timm's MaybeToTensor then Normalize of an 8-bit RGB image, looked up in a [3, 256] table of what those two
    give for each channel and byte value.

    Each output pixel depends only on its channel and byte (every step is one correctly rounded float32 operation
    per element), so the lookup is bit-identical to running them: the table is their own output. One gather a
    channel instead of four float passes over the view: 0.29 ms a 224 px view against 0.42 on one core. Views
    are made of RGB images only (decode_rgb converts the others).
    """

    def __init__(self, to_tensor, normalize):
        self.steps = (to_tensor, normalize)
        ramp = Image.fromarray(np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2))
        self.table = normalize(to_tensor(ramp))[:, 0, :].numpy().copy()  # [3, 256]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            raise ValueError(f"a view's image must be RGB, not {image.mode}")
        pixels = np.asarray(image)
        out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
        for c in range(3):
            np.take(self.table[c], pixels[:, :, c], out=out[c], mode="clip")  # a byte is in range: no check
        return torch.from_numpy(out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self.steps!r}"


def _tabulated(transform: transforms.Compose) -> transforms.Compose:
    """`transform` with its to-tensor and Normalize pair read from a table (TabulatedNormalize)."""
    steps = transform.transforms
    at = next((i for i, step in enumerate(steps) if isinstance(step, transforms.Normalize)), 0)
    if not at or not isinstance(steps[at - 1], transforms.ToTensor):  # timm's MaybeToTensor is one
        raise RuntimeError(f"timm's transform has no to-tensor step just before Normalize: {transform}")
    steps[at - 1 : at + 1] = [TabulatedNormalize(steps[at - 1], steps[at])]
    return transform
