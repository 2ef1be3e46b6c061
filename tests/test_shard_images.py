"""data/images: the verdict on every odd input, and stored bytes that decode as their extension says."""

from __future__ import annotations

import io
import re
import struct
import zlib

import numpy as np
import pytest
from conftest import odd_inputs, png_bytes, png_chunk
from PIL import Image, PngImagePlugin

from deit_pipe.data.images import (
    CONVERT,
    KEEP,
    REJECT,
    Inspection,
    _png_is_complete,
    inspect_image,
    is_image_name,
    prepare_image,
)

ODD = odd_inputs(np.random.default_rng(1))
FORMAT_OF_EXT = {"jpg": "JPEG", "png": "PNG"}


@pytest.mark.parametrize("name", sorted(ODD))
def test_verdict_and_stored_bytes(name):
    data, expected = ODD[name]
    verdict = inspect_image(data, name)
    assert verdict.action == expected, verdict
    if expected == REJECT:
        assert verdict.reason and verdict.ext == ""
        with pytest.raises(ValueError):
            prepare_image(data, verdict)
        return
    for max_side in (0, 8):
        stored, ext = prepare_image(data, verdict, max_side=max_side, jpeg_quality=80)
        img = Image.open(io.BytesIO(stored))
        assert img.format == FORMAT_OF_EXT[ext]
        assert img.mode in ("RGB", "L") and img.getbands() in (("R", "G", "B"), ("L",))
        img.load()
        if max_side:
            assert ext == "jpg" and max(img.size) <= max_side
        assert prepare_image(data, verdict, max_side=max_side, jpeg_quality=80) == (stored, ext)  # deterministic


def test_reasons_name_the_problem():
    reason = {name: inspect_image(data, name).reason for name, (data, _) in ODD.items()}
    assert "CMYK" in reason["cmyk.JPEG"]
    assert "16-bit" in reason["gray16.png"] and "16-bit" in reason["rgb48.png"]
    assert "mode P" in reason["palette.png"] and "RGBA" in reason["rgba.png"] and "LA" in reason["la.png"]
    assert "PNG data named .JPEG" in reason["png_named.JPEG"]
    assert reason["empty.JPEG"] == "empty file" and reason["text.jpg"] == "not an image"
    assert reason["truncated.JPEG"].startswith("truncated")
    assert reason["bomb.png"].startswith("decompression bomb")


def test_plain_jpeg_and_png_are_kept_byte_for_byte():
    rng = np.random.default_rng(2)
    for mode, shape in (("RGB", (10, 12, 3)), ("L", (10, 12))):
        for fmt, ext in (("JPEG", "jpg"), ("PNG", "png")):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, fmt)
            verdict = inspect_image(buf.getvalue(), f"x.{ext}")
            assert (verdict.action, verdict.reason, verdict.ext) == (KEEP, "", ext)
            assert prepare_image(buf.getvalue(), verdict) == (buf.getvalue(), ext)


def test_sixteen_bit_gray_is_scaled_not_clipped():
    values = np.array([[0, 257, 65535], [32896, 1000, 60000]], dtype=np.uint16)
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)
    data = png_bytes(3, 2, 16, 0, rows)
    verdict = inspect_image(data, "g.png")
    assert verdict.action == CONVERT
    stored, ext = prepare_image(data, verdict)
    got = np.asarray(Image.open(io.BytesIO(stored)).convert("L"))
    np.testing.assert_array_equal(got, np.round(values / 257).astype(np.uint8))


def test_max_pixels_rejects_from_the_header_before_decoding():
    rng = np.random.default_rng(3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    assert inspect_image(buf.getvalue(), "a.png", max_pixels=1200).action == KEEP
    # Just over the limit (PIL's warning) and far over it (PIL's error) are both rejections.
    for limit in (1199, 100):
        verdict = inspect_image(buf.getvalue(), "a.png", max_pixels=limit)
        assert verdict.action == REJECT and verdict.reason.startswith("decompression bomb"), verdict
    # The header alone decides: this PNG's pixel data could never be decoded.
    assert inspect_image(png_bytes(50_000, 50_000, 8, 0, b"\x00"), "b.png").action == REJECT
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # the process-wide limit is restored


def test_image_names():
    assert is_image_name("n01440764_10026.JPEG") and is_image_name("a.png") and is_image_name("b.TIFF")
    assert not is_image_name("notes.txt") and not is_image_name("x.json") and not is_image_name("JPEG")


# ----------------------------------------------------------------------------- the PNG check (_png_is_complete)

# A 5x4 8-bit RGB image: 4 scanlines of a filter type byte (0) and 15 pixel bytes.
SCANLINES = b"".join(b"\x00" + bytes(np.random.default_rng(5).integers(0, 256, 15, dtype=np.uint8)) for _ in range(4))
STREAM = zlib.compress(SCANLINES)
IEND = png_chunk(b"IEND", b"")


def _png(stream: bytes, end: bytes = IEND) -> bytes:
    """The 5x4 RGB PNG's signature and IHDR, one IDAT chunk holding `stream`, then `end`."""
    return png_bytes(5, 4, 8, 2, b"")[:33] + png_chunk(b"IDAT", stream) + end


def _pixel_flipped_after_its_crc() -> bytes:
    """One pixel byte flipped inside a stored (uncompressed) IDAT stream, its Adler-32 patched to match, the chunk's
    CRC left as it was: zlib and PIL's decoder see a valid stream, only the CRC tells."""
    stored = zlib.compress(SCANLINES, 0)
    damaged = bytearray(stored)
    damaged[2 + 5 + 3] ^= 0xFF  # past zlib's 2-byte header and the stored block's 5: a pixel byte
    damaged[-4:] = struct.pack(">I", zlib.adler32(damaged[7:-4]))
    return _png(stored).replace(stored, bytes(damaged))


def pil_error(data: bytes, check: str) -> str:
    """PIL's own verdict on the same bytes, by "verify" (every chunk's CRC up to IEND) or "load" (a full decode):
    its error, or "" when it finds none."""
    try:
        getattr(Image.open(io.BytesIO(data)), check)()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


DAMAGED = {  # name -> (bytes, what the check says)
    "a flipped byte in IDAT": (_pixel_flipped_after_its_crc(), "b'IDAT' chunk fails its CRC"),
    "a truncated stream": (_png(STREAM[: len(STREAM) // 2]), "truncated zlib stream"),
    "a file cut inside IDAT": (_png(STREAM)[:-20], "ends inside its b'IDAT' chunk"),
    "a partial last scanline": (_png(zlib.compress(SCANLINES[:-3])), "inflates to less than the 64 bytes"),
    "a damaged Adler-32": (_png(STREAM[:-1] + bytes([STREAM[-1] ^ 1])), "incorrect data check"),
    "an unknown filter type": (_png(zlib.compress(b"\x05" + SCANLINES[1:])), "unknown filter type"),
    "no IEND": (_png(STREAM, end=b""), "ends before its IEND chunk"),
}


@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_a_damaged_png_is_rejected_as_pil_rejects_it(name):
    data, found = DAMAGED[name]
    assert pil_error(data, "verify") or pil_error(data, "load")
    with pytest.raises(ValueError, match=re.escape(found)):
        _png_is_complete(data)
    # The reason is PIL's decode error where it has one (the reason given when PIL decoded every PNG), else ours.
    reason = pil_error(data, "load") or found
    verdict = inspect_image(data, "x.png")
    assert verdict.action == REJECT and verdict.reason.startswith("truncated or corrupt: ") and reason in verdict.reason


_CUT = zlib.compressobj()
STRICTER = {  # damage PIL's verify() and decode let through: name -> (bytes, what the check says)
    "whole scanlines missing": (_png(zlib.compress(SCANLINES[:-16])), "inflates to less"),  # PIL leaves them black
    "an extra scanline": (_png(zlib.compress(SCANLINES + SCANLINES[:16])), "inflates to more"),
    "a stream that never ends": (_png(_CUT.compress(SCANLINES) + _CUT.flush(zlib.Z_SYNC_FLUSH)), "truncated zlib"),
}


@pytest.mark.parametrize("name", sorted(STRICTER))
def test_png_damage_that_pil_decodes_anyway_is_rejected(name):
    data, found = STRICTER[name]
    assert pil_error(data, "verify") == pil_error(data, "load") == ""
    with pytest.raises(ValueError, match=re.escape(found)):
        _png_is_complete(data)
    verdict = inspect_image(data, "x.png")  # the reason is the check's: PIL has none
    assert verdict.action == REJECT and verdict.reason.startswith("truncated or corrupt: ValueError: PNG image data")
    assert found in verdict.reason


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"])
def test_every_png_pil_writes_passes_the_check(mode):
    """PIL's encoder, not our arithmetic, says how many bytes each size, bit depth and colour type inflates to;
    several IDAT chunks (a large image) and text chunks before the image data included."""
    rng = np.random.default_rng(6)
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "before IDAT")
    for width, height in ((1, 1), (9, 3), (31, 17), (700, 500)):
        img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
        for options in ({}, {"optimize": True, "pnginfo": info}):
            data = _encode_png(img, **options)
            assert pil_error(data, "verify") == pil_error(data, "load") == ""
            assert _png_is_complete(data) is True, (mode, width, height, options)


def test_pil_decodes_what_the_check_leaves_to_it():
    """Interlaced images, and chunks after the image data: PIL's load reads those into the image (a tRNS there makes
    the image one to convert)."""
    interlaced = png_bytes(1, 1, 8, 0, b"")[:8] + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 1))
    interlaced += png_chunk(b"IDAT", zlib.compress(b"\x00\x7f")) + IEND  # 1x1: Adam7's first pass is the image
    assert _png_is_complete(interlaced) is False
    assert inspect_image(interlaced, "i.png") == Inspection(KEEP, "", "png")
    gray = png_bytes(2, 2, 8, 0, b"\x00\x01\x02\x00\x03\x04")
    transparent_after = gray[:-12] + png_chunk(b"tRNS", b"\x00\x03") + IEND
    assert _png_is_complete(transparent_after) is False
    verdict = inspect_image(transparent_after, "t.png")
    assert verdict.action == CONVERT and "transparency" in verdict.reason, verdict


def _encode_png(img: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **options)
    return buf.getvalue()
