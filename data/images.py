"""What the shard stage does to one image file: pure functions on bytes, no I/O.

`inspect_image` decides once, at scan time, whether a file is kept as it is, converted (with the
reason) or rejected (with the reason); `prepare_image` turns the bytes into what the shard stores.
Every stored image decodes as the format its stored extension says: JPEG or PNG, 8-bit, RGB or L.
"""

from __future__ import annotations

import contextlib
import io
import posixpath
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

# torchvision's ImageFolder extensions, plus GIF; anything else in a class folder is ignored.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's own bomb threshold (about 89.5 Mpixels)
DEFAULT_JPEG_QUALITY = 90

KEEP, CONVERT, REJECT = "keep", "convert", "reject"
_STORED_EXT = {"JPEG": "jpg", "PNG": "png"}
_KEPT_MODES = ("RGB", "L")
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


@dataclass(frozen=True)
class Inspection:
    """The scan's verdict on one file: KEEP, CONVERT or REJECT; why (empty when kept as it is); and the
    extension it is stored under without --max-side ("jpg" or "png"; empty when rejected)."""

    action: str
    reason: str = ""
    ext: str = ""


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


@contextlib.contextmanager
def _pixel_limit(max_pixels: int | None):
    """Image.open checks width*height from the header, before any pixel is decoded: it warns above
    MAX_IMAGE_PIXELS and raises above twice that.

    That threshold is set to ours so that --max-pixels, not PIL's default, decides (None: no check, for
    files the scan already passed), and the warning is turned into an error: every image over the limit
    is rejected undecoded. Other warnings (e.g. palette transparency notes) say nothing
    about the verdict and are silenced.
    """
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _png_bit_depth(data: bytes) -> int:
    # IHDR is always the first chunk; PIL reports 16-bit RGB(A) as 8-bit modes, so read it directly.
    return data[24] if data[12:16] == b"IHDR" else 8


def _conversion_reasons(img: Image.Image, data: bytes) -> list[str]:
    reasons = []
    if img.format not in _STORED_EXT:
        reasons.append(f"{img.format} format")
    if img.mode not in _KEPT_MODES:
        reasons.append(f"mode {img.mode}")
    if img.format == "PNG" and _png_bit_depth(data) != 8:
        reasons.append(f"{_png_bit_depth(data)}-bit PNG")
    if "transparency" in img.info:
        reasons.append("transparency")
    if getattr(img, "is_animated", False):
        reasons.append("animated (first frame kept)")
    return reasons


def _decode_fully(img: Image.Image) -> None:
    """Decode every byte so truncation shows; JPEGs at 1/8 scale, which still reads the whole stream."""
    if img.format == "JPEG":
        img.draft(None, (max(1, img.width // 8), max(1, img.height // 8)))
    img.load()


def inspect_image(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Inspection:
    """Keep, convert or reject the file `name` with contents `data` (never raises for bad content)."""
    if not data:
        return Inspection(REJECT, "empty file")
    with _pixel_limit(max_pixels):
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            return Inspection(REJECT, f"decompression bomb (--max-pixels {max_pixels}): {exc}".splitlines()[0])
        except UnidentifiedImageError:
            return Inspection(REJECT, "not an image")
        except Exception as exc:  # PIL's plugins raise OSError, ValueError, SyntaxError, ... on bad headers
            return Inspection(REJECT, f"unreadable header: {type(exc).__name__}: {exc}".splitlines()[0])
        try:
            _decode_fully(img)
        except Exception as exc:
            return Inspection(REJECT, f"truncated or corrupt: {type(exc).__name__}: {exc}".splitlines()[0])
    reasons = _conversion_reasons(img, data)
    if reasons:
        return Inspection(CONVERT, ", ".join(reasons) + ": converted to 8-bit RGB", "png")
    stored = _STORED_EXT[img.format]
    suffix = posixpath.splitext(name)[1]
    if suffix.lower() not in (f".{stored}", ".jpeg" if stored == "jpg" else f".{stored}"):
        return Inspection(KEEP, f"{img.format} data named {suffix}: bytes kept, stored as .{stored}", stored)
    return Inspection(KEEP, "", stored)


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB the way torchvision's ImageFolder loader sees it (convert("RGB")), except 16-bit gray,
    which PIL would clip to white instead of scaling."""
    if img.mode in _SIXTEEN_BIT_MODES:
        gray = (np.asarray(img, dtype=np.float64) / 257.0).round().clip(0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return img.convert("RGB")


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    scale = max_side / max(size)
    if scale >= 1:
        return size
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def prepare_image(
    data: bytes, inspection: Inspection, max_side: int = 0, jpeg_quality: int = DEFAULT_JPEG_QUALITY
) -> tuple[bytes, str]:
    """(stored bytes, stored extension) for an accepted file; deterministic for given inputs.

    max_side 0 keeps JPEG/PNG bytes as they are and writes conversions as lossless PNG; max_side N
    resizes every image so its longer side is at most N and re-encodes it as JPEG at `jpeg_quality`.
    """
    if inspection.action == REJECT:
        raise ValueError(f"cannot prepare a rejected image ({inspection.reason})")
    if inspection.action == KEEP and not max_side:
        return data, inspection.ext
    with _pixel_limit(None):
        img = Image.open(io.BytesIO(data))
        target = _fit(img.size, max_side) if max_side else img.size
        if img.format == "JPEG" and target != img.size:
            img.draft(None, target)  # DCT-domain downscaling (never below target): big JPEGs shrink cheaply
        img.load()
    if inspection.action == CONVERT:
        img = _to_rgb(img)
    out = io.BytesIO()
    if max_side:
        if img.size != target:
            img = img.resize(target, Image.Resampling.LANCZOS)
        img.save(out, "JPEG", quality=jpeg_quality)
        return out.getvalue(), "jpg"
    img.save(out, "PNG")
    return out.getvalue(), "png"
