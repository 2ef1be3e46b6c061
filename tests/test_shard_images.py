"""data/images: the verdict on every odd input, and stored bytes that decode as their extension says."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import odd_inputs, png_bytes
from PIL import Image

from deit_pipe.data.images import CONVERT, KEEP, REJECT, inspect_image, is_image_name, prepare_image

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
