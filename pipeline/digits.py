"""scikit-learn's handwritten digits -> an ImageFolder of PNGs: the demo's transfer data set.

1,797 real 8x8 digits (UCI's optical recognition of handwritten digits, 16 grey levels), bundled inside the
scikit-learn wheel, so nothing is downloaded. Every sixth image goes to val, the rest to train; the images are
written at their own 8x8 size: the transfer recipe resizes them to the model's resolution.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from deit_pipe.errors import InputError

VAL_EVERY = 6


def write_image_folder(dest: str) -> dict[str, int]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise InputError("the digits data set comes with scikit-learn: pip install 'deit-pipe[demo]'") from None
    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
    counts = {"train": 0, "val": 0}
    for i, (image, label) in enumerate(zip(pixels, digits.target, strict=True)):
        split = "val" if i % VAL_EVERY == VAL_EVERY - 1 else "train"
        folder = os.path.join(dest, split, f"digit_{label}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{i:04d}.png")
        if not os.path.exists(path):
            Image.fromarray(image, mode="L").save(path)
        counts[split] += 1
    return counts
