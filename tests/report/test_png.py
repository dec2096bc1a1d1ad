"""Tests for pipeline.report.png: PNG bytes that decode to the picture and text given."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pipeline.report.png import encode_png


def _text() -> PngInfo:
    info = PngInfo()
    info.add_itxt("Description", "BEFORE 2019-05-02\nlocal:b.tif \u00b7 0.5 m grid")
    info.add_text("Sitewatch-Scale-Bar", "200 m")
    info.add_text("Sitewatch-North-Deg", "-0.731")
    return info


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 5, 3), (120, 333, 3)])
def test_encode_png_same_pixels_and_text_as_pillow(shape):
    """Decoded, the PNG holds the same RGB pixels and text chunks as Pillow's own PNG."""
    rgb = np.random.default_rng(len(shape) + shape[1]).integers(0, 256, shape, dtype=np.uint8)
    rgb[:, : shape[1] // 2] = rgb[:, :1]  # flat runs as well as noise
    data = encode_png(rgb, text=_text())
    ours = Image.open(io.BytesIO(data))
    ours.load()
    buffer = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buffer, format="PNG", compress_level=3,
                                     compress_type=zlib.Z_RLE, pnginfo=_text())
    pillow = Image.open(io.BytesIO(buffer.getvalue()))
    pillow.load()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert ours.mode == "RGB" and ours.size == (shape[1], shape[0])
    np.testing.assert_array_equal(np.asarray(ours), rgb)
    assert ours.text == pillow.text
    assert ours.text["Sitewatch-Scale-Bar"] == "200 m"


def test_encode_png_without_text():
    """No text: a PNG with the pixels only."""
    rgb = np.full((4, 4, 3), 200, np.uint8)
    image = Image.open(io.BytesIO(encode_png(rgb)))
    assert image.text == {}
    np.testing.assert_array_equal(np.asarray(image), rgb)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8),
                                 np.zeros((4, 4, 3), np.float32), np.zeros((0, 4, 3), np.uint8)])
def test_encode_png_refuses_other_arrays(bad):
    """Only uint8 (y, x, 3) pictures are encoded."""
    with pytest.raises(ValueError, match="uint8"):
        encode_png(bad)


def test_encode_png_refuses_other_chunks():
    """A chunk that is not text is refused (it would need its own place in the file)."""
    info = PngInfo()
    info.add(b"pHYs", b"\x00" * 9)
    with pytest.raises(ValueError, match="text chunks"):
        encode_png(np.zeros((2, 2, 3), np.uint8), text=info)
