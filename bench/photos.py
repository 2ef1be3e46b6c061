"""ImageNet-like JPEGs for benchmarks where no ImageNet is at hand: an ImageFolder of 500x375 photos at q90.

    python bench/photos.py DEST --images 600 --classes 10

Each image is smooth colour regions (low-frequency noise, upsampled) with fine texture on top, so it compresses
and decodes like a photo (about 60-120 KB at q90, ImageNet's mean is about 110 KB), not like flat noise or a
flat colour. Seeded: the same arguments give the same files (photo i of a split from its own seed, so a pool of
processes writes them, whatever their number).
"""

from __future__ import annotations

import argparse
import io
import os
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image


def photo(rng: np.random.Generator, width: int = 500, height: int = 375) -> bytes:
    coarse = rng.uniform(0, 255, (height // 25 + 2, width // 25 + 2, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    texture = rng.normal(0, 12, (height, width, 1)).astype(np.float32)
    pixels = np.clip(base + texture, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def _write(dest: Path, split: str, i: int, classes: int, seed: int) -> None:
    path = dest / split / f"class{i % classes:03d}" / f"{i:06d}.JPEG"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(photo(np.random.default_rng([seed, split == "val", i])))


def write_folder(dest: Path, images: int, classes: int, seed: int = 0) -> Path:
    """DEST/train/class<c>/<i>.JPEG (and a small val split), written by a process per core; returns DEST."""
    jobs = [(split, i) for split, count in (("train", images), ("val", max(classes, images // 20)))
            for i in range(count)]
    with ProcessPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        list(pool.map(partial(_write, dest, classes=classes, seed=seed), *zip(*jobs, strict=True), chunksize=64))
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--classes", type=int, default=10)
    args = ap.parse_args()
    write_folder(args.dest, args.images, args.classes)


if __name__ == "__main__":
    main()
