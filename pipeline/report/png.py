"""pipeline.report.png: RGB pictures as PNG bytes, encoded faster than Pillow does.

Pillow chooses a filter for every row by trying four of them on the row (about half of its
encoding time for the chips). Here every row gets PNG's "Sub" filter (each byte minus the
same channel of the pixel to its left, modulo 256), computed for the whole picture with
NumPy, and zlib compresses the rows with its run-length strategy. Decoders see the same
pixels; the files are a few per cent larger (bench chips: 1.03 MB where Pillow wrote 0.97 MB)
and take about 40 % less time. Text chunks (``PngInfo``) are written as Pillow writes them,
before the image data.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
from PIL.PngImagePlugin import PngInfo

__all__ = ["encode_png"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SUB = 1  # PNG filter type "Sub"
_TEXT_CHUNKS = (b"iTXt", b"tEXt", b"zTXt")


def encode_png(rgb: np.ndarray, *, text: PngInfo | None = None, level: int = 3) -> bytes:
    """A PNG (8-bit RGB, not interlaced) of ``rgb`` with the text chunks of ``text``.

    Parameters
    ----------
    rgb
        uint8 ``(y, x, 3)`` picture.
    text
        Text chunks (``add_text``/``add_itxt``); other chunk types are refused.
    level
        zlib compression level.

    Returns
    -------
    bytes
        The file's bytes.

    Raises
    ------
    ValueError
        If ``rgb`` is not uint8 ``(y, x, 3)`` or ``text`` holds a chunk that is not text.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise ValueError(f"Expected a uint8 (y, x, 3) picture, got {rgb.dtype} {rgb.shape}")
    height, width = rgb.shape[:2]
    chunks = [_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))]
    for cid, data, *_ in (text.chunks if text is not None else []):
        if cid not in _TEXT_CHUNKS:
            raise ValueError(f"Only text chunks can be added, got {cid!r}")
        chunks.append(_chunk(cid, data))
    rows = np.empty((height, 1 + width * 3), np.uint8)
    rows[:, 0] = _SUB
    flat = rgb.reshape(height, width * 3)
    rows[:, 1:4] = flat[:, :3]
    np.subtract(flat[:, 3:], flat[:, :-3], out=rows[:, 4:])  # uint8: modulo 256, as PNG
    packer = zlib.compressobj(level, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    chunks.append(_chunk(b"IDAT", packer.compress(rows.data) + packer.flush()))
    chunks.append(_chunk(b"IEND", b""))
    return _SIGNATURE + b"".join(chunks)


def _chunk(cid: bytes, data: bytes) -> bytes:
    """Length, type, data and CRC of one chunk."""
    return struct.pack(">I", len(data)) + cid + data + struct.pack(">I", zlib.crc32(cid + data))
