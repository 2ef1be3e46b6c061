"""Debian's dataset-fashion-mnist (IDX files) -> an ImageFolder of PNGs: the demo and test data."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
from PIL import Image

from deit_pipe.errors import InputError

CLASSES = (
    "t-shirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)
DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"
_FILES = {"train": "train", "val": "t10k"}


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _take(labels: np.ndarray, limit: int) -> np.ndarray:
    """The first `limit` images, balanced over classes (limit 0 = all)."""
    if limit <= 0 or limit >= len(labels):
        return np.arange(len(labels))
    per_class = [np.flatnonzero(labels == c)[: -(-limit // len(CLASSES))] for c in range(len(CLASSES))]
    return np.sort(np.concatenate(per_class))[:limit]


def write_image_folder(dest: str, source: str = DEFAULT_SOURCE, limit: int = 0, val_limit: int = 0) -> dict:
    src = Path(source)
    if not (src / "train-images-idx3-ubyte.gz").exists():
        raise InputError(f"Fashion-MNIST not found in {source} (apt-get install dataset-fashion-mnist)")
    counts = {}
    for split, stem in _FILES.items():
        images = _read_idx(src / f"{stem}-images-idx3-ubyte.gz")
        labels = _read_idx(src / f"{stem}-labels-idx1-ubyte.gz")
        chosen = _take(labels, limit if split == "train" else val_limit)
        for name in CLASSES:
            os.makedirs(os.path.join(dest, split, name), exist_ok=True)
        for i in chosen:
            path = os.path.join(dest, split, CLASSES[labels[i]], f"{stem}_{i:05d}.png")
            if not os.path.exists(path):
                Image.fromarray(images[i], mode="L").save(path)
        counts[split] = len(chosen)
    return counts
