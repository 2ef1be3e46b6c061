"""What the shard stage does to one image file: pure functions on bytes, no I/O.

`inspect_image` decides once, at scan time, whether a file is kept as it is, converted (with the
reason) or rejected (with the reason); `prepare_image` turns the bytes into what the shard stores.
Every stored image decodes as the format its stored extension says: JPEG or PNG, 8-bit, RGB or L.
"""

from __future__ import annotations

import contextlib
import io
import posixpath
import struct
import warnings
import zlib
from collections.abc import Iterator
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


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_PNG_FILTERS = bytes(range(5))  # the filter types a scanline may start with


def _png_chunks(data: bytes) -> Iterator[tuple[bytes, memoryview]]:
    """(type, body) of each chunk up to IEND, each checked against its CRC (PIL's decode checks no IDAT CRC)."""
    view, pos = memoryview(data), 8
    while True:
        if pos + 8 > len(data):
            raise ValueError("PNG ends before its IEND chunk")
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 8 + length
        if end + 4 > len(data):
            raise ValueError(f"PNG ends inside its {kind!r} chunk")
        body = view[pos + 8 : end]
        if zlib.crc32(body, zlib.crc32(kind)) != struct.unpack_from(">I", data, end)[0]:
            raise ValueError(f"PNG {kind!r} chunk fails its CRC")
        yield kind, body
        if kind == b"IEND":
            return
        pos = end + 4


def _png_is_complete(data: bytes) -> bool:
    """Every chunk's CRC, then the whole IDAT stream inflated (zlib checks its Adler-32) to exactly the scanlines
    IHDR's width, height, bit depth and colour type call for, each with a known filter type: what PIL's decode
    would find wrong and more (its decoder accepts a stream a row short, never checks an IDAT CRC), at about a
    third of its cost. Raises ValueError on damage. False where PIL must still decode: interlaced images (rare),
    and chunks after the image data, which PIL's load reads into the image."""
    ihdr, stream, after_image = None, [], False
    for kind, body in _png_chunks(data):
        if kind == b"IDAT" and not after_image:
            stream.append(body)
        elif stream and kind != b"IEND":
            after_image = True  # PIL decodes the first run of IDAT chunks only
        elif kind == b"IHDR":
            ihdr = body  # the last before IDAT, as PIL reads it (Image.open has checked it)
    width, height, bit_depth, colour_type, _, _, interlace = struct.unpack_from(">IIBBBBB", ihdr)
    if interlace:
        return False
    row = 1 + (width * bit_depth * _PNG_CHANNELS[colour_type] + 7) // 8  # the filter type, then the pixels
    inflate = zlib.decompressobj()
    try:
        # At most one byte past the image: a stream that inflates further is damage, not memory to spend on it.
        scanlines = inflate.decompress(b"".join(stream), height * row + 1)
    except zlib.error as exc:
        raise ValueError(f"PNG image data: {exc}") from None
    if len(scanlines) > height * row:
        raise ValueError(f"PNG image data inflates to more than the {height * row} bytes IHDR calls for")
    if not inflate.eof:
        raise ValueError("PNG image data is a truncated zlib stream")
    if len(scanlines) < height * row:
        raise ValueError(f"PNG image data inflates to less than the {height * row} bytes IHDR calls for")
    if scanlines[::row].translate(None, _PNG_FILTERS):
        raise ValueError("PNG image data has a scanline of unknown filter type")
    return not after_image


def check_image_data(img: Image.Image, data: bytes) -> None:
    """Raise where the image data of `img` (`data` as Image.open read its header) is truncated or damaged, having
    read every byte of it. PNGs by _png_is_complete (where it finds damage, PIL's own error is the reason when PIL
    finds one too); JPEGs decoded at 1/8 scale, which still reads the whole entropy-coded stream."""
    if img.format == "PNG":
        try:
            if _png_is_complete(data):
                return
        except ValueError:
            img.load()
            raise
    elif img.format == "JPEG":
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
            check_image_data(img, data)
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
