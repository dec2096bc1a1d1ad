"""pipeline.report.chips: before/after image chips with a caption band (arrays to images).

Nothing here reads or writes files: the functions turn pixel arrays into Pillow images. A chip
is one window of the working grid, north up, shown with a display stretch shared by both
dates (the 2nd and 98th percentiles of each band over the two dates together), so a
difference in brightness between the chips is a difference in the data, not in the stretch.
Below the picture a caption band carries the date, source, provider or sensor and resolution,
a north arrow (true north, which on a UTM grid differs from the image's up by the meridian
convergence) and a scale bar.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from PIL import Image, ImageDraw, ImageFont

from pipeline.core.quantiles import linear_quantiles

__all__ = ["Outline", "stretch_pair", "compose_chip", "nice_length_m", "NODATA_RGB"]

NODATA_RGB = (255, 0, 255)  # magenta: unmistakably not image
MIN_WIDTH_PX = 560
FONT_PX = 13
LINE_PX = 17
PAD_PX = 6


@dataclass(frozen=True)
class Outline:
    """A geometry to draw, in chip pixel coordinates (x right, y down), with its colour."""

    geometry: Any
    colour: tuple[int, int, int]
    width_px: int = 2


def stretch_pair(
    before: np.ndarray, after: np.ndarray, *, percentiles: tuple[float, float] = (2.0, 98.0)
) -> tuple[np.ndarray, np.ndarray]:
    """Scale two ``(band, y, x)`` windows to 8-bit RGB with one stretch for both.

    Parameters
    ----------
    before, after
        Same shape, float, NaN = nodata. The first three bands are shown as red, green, blue;
        a single band is shown as grey.
    percentiles
        Low and high percentile of each band over the valid pixels of both dates; values
        outside are clipped.

    Returns
    -------
    tuple
        ``(before_rgb, after_rgb)``: uint8 ``(y, x, 3)`` arrays; nodata pixels are
        :data:`NODATA_RGB`.
    """
    if before.shape != after.shape or before.ndim != 3:
        raise ValueError(f"before and after must be (band, y, x) of one shape, got "
                         f"{before.shape} and {after.shape}")
    bands = [0, 1, 2] if before.shape[0] >= 3 else [0, 0, 0]
    out = []
    for image in (before, after):
        out.append(np.zeros((*image.shape[1:], 3), np.uint8))
    for channel, band in enumerate(bands):
        pair = (before[band], after[band])
        codes = _integer_codes(*pair)
        if codes is not None:  # integer values (an integer source read on its grid): counts
            low, high = _counted_percentiles(codes, percentiles, before.dtype)
        else:
            both = np.concatenate([pair[0].ravel(), pair[1].ravel()])
            both = both[np.isfinite(both)]
            low, high = np.percentile(both, percentiles) if both.size else (0.0, 1.0)
        span = high - low if high > low else 1.0
        if codes is not None:  # each of the 65536 values scaled once: a lookup table
            table = _scaled(np.arange(1 << 16, dtype=before.dtype), low, span).astype(np.uint8)
            for (code, _), rgb in zip(codes, out, strict=True):
                rgb[..., channel] = table[code]
        else:
            for image, rgb in zip(pair, out, strict=True):
                rgb[..., channel] = _scaled(image, low, span)
    for image, rgb in zip((before, after), out, strict=True):
        rgb[~np.isfinite(image[bands]).all(axis=0)] = NODATA_RGB
    return out[0], out[1]


def _scaled(values: np.ndarray, low: Any, span: Any) -> np.ndarray:
    """``round(clip((values - low) / span, 0, 1) * 255)`` in float64; NaN becomes 0."""
    # in place, in float64 as ``(values - low)`` with NumPy's float64 ``low`` gives
    scaled = np.subtract(values, low, dtype=np.float64)
    scaled /= span
    np.clip(scaled, 0.0, 1.0, out=scaled)
    scaled *= 255.0
    np.round(scaled, out=scaled)
    scaled[np.isnan(scaled)] = 0.0  # clipped: no infinity is left, only NaN
    return scaled


_Codes = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _integer_codes(before: np.ndarray, after: np.ndarray) -> _Codes | None:
    """``((codes, finite), (codes, finite))`` when every finite value of both windows is an
    integer in 0..65535 (``codes`` uint16; anything at non-finite pixels), else None.

    Such windows (uint8 or uint16 imagery read on its own grid) are stretched from value
    counts and a lookup table: the same numbers as the float path, in a third of the time.
    """
    found = []
    for values in (before, after):
        if values.dtype.kind != "f":
            return None
        with np.errstate(invalid="ignore"):
            codes = values.astype(np.uint16)
        finite = np.isfinite(values)
        if not np.logical_or(codes == values, ~finite).all():
            return None
        found.append((codes, finite))
    return found[0], found[1]


def _counted_percentiles(codes: _Codes, percentiles: tuple[float, float], dtype: Any
                         ) -> tuple[Any, Any]:
    """``np.percentile`` of the finite values of both windows (its 'linear' method), from the
    counts of their integer values: the same numbers (a test compares them).

    The order statistics come from the counts; the interpolation is NumPy's
    (`pipeline.core.quantiles.linear_quantiles`).
    """
    counts = sum(np.bincount(c.ravel() if finite.all() else c[finite], minlength=1 << 16)
                 for c, finite in codes)
    ends = np.cumsum(counts)
    n = int(ends[-1])
    if n == 0:
        return 0.0, 1.0
    if not 0 <= min(percentiles) <= max(percentiles) <= 100:
        np.percentile(np.zeros(1, dtype), percentiles)  # NumPy's own error
    q = np.true_divide(np.asarray(percentiles, np.float64), 100)
    result = linear_quantiles(
        n, q, lambda i: np.searchsorted(ends, i % n, side="right").astype(dtype))
    return result[0], result[1]


def nice_length_m(max_m: float) -> float:
    """The largest 1, 2 or 5 x 10^n metres not above ``max_m`` (a scale-bar length)."""
    if not max_m > 0:
        raise ValueError(f"max_m must be positive, got {max_m}")
    exponent = math.floor(math.log10(max_m))
    for step in (5, 2, 1):
        length = step * 10.0**exponent
        if length <= max_m:
            return length
    return 10.0**exponent


def compose_chip(
    rgb: np.ndarray,
    *,
    caption: Sequence[str],
    metres_per_px: float,
    north_deg: float = 0.0,
    outlines: Sequence[Outline] = (),
) -> Image.Image:
    """An RGB picture with outlines drawn on it and a caption band below.

    Parameters
    ----------
    rgb
        uint8 ``(y, x, 3)`` picture, already at display size.
    caption
        Lines of text for the band (cut with an ellipsis when too long).
    metres_per_px
        Ground size of one picture pixel, for the scale bar.
    north_deg
        Direction of true north, degrees clockwise from the picture's up.
    outlines
        Geometries in picture pixel coordinates, drawn in order.

    Returns
    -------
    PIL.Image.Image
        RGB image, at least :data:`MIN_WIDTH_PX` wide (the picture is centred on a dark
        background when narrower). Its ``info`` names what the band shows, as text:
        ``caption`` (the lines), ``scale_bar`` (e.g. ``"200 m"``) and ``north_deg``.
    """
    height, width = rgb.shape[:2]
    total_w = max(width, MIN_WIDTH_PX)
    band_h = PAD_PX * 2 + LINE_PX * max(len(caption), 3)
    image = Image.new("RGB", (total_w, height + band_h), (24, 24, 24))
    left = (total_w - width) // 2
    picture = Image.fromarray(rgb, "RGB")
    draw_pic = ImageDraw.Draw(picture)
    for outline in outlines:
        _draw_geometry(draw_pic, outline)
    image.paste(picture, (left, 0))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=FONT_PX)
    tools_w = 150
    for i, line in enumerate(caption):
        draw.text((PAD_PX, height + PAD_PX + i * LINE_PX),
                  _fit(draw, line, font, total_w - tools_w - PAD_PX * 2),
                  fill=(240, 240, 240), font=font)
    bar = _scale_bar(draw, font, x=total_w - tools_w + 4, y=height + band_h - PAD_PX - 14,
                     metres_per_px=metres_per_px, max_px=tools_w - 48)
    _north_arrow(draw, font, centre=(total_w - 22, height + band_h // 2), north_deg=north_deg)
    image.info.update(caption="\n".join(caption), scale_bar=bar, north_deg=f"{north_deg:.3f}")
    return image


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width_px: int) -> str:
    """``text``, cut with an ellipsis to fit ``width_px``."""
    if draw.textlength(text, font=font) <= width_px:
        return text
    while text and draw.textlength(text + "…", font=font) > width_px:
        text = text[:-1]
    return text + "…"


def _draw_geometry(draw: ImageDraw.ImageDraw, outline: Outline) -> None:
    """Rings of polygons, lines as polylines, points as small squares."""
    for part in shapely.get_parts(outline.geometry):
        if isinstance(part, shapely.Polygon):
            for ring in (part.exterior, *part.interiors):
                draw.line(list(ring.coords), fill=outline.colour, width=outline.width_px,
                          joint="curve")
        elif isinstance(part, shapely.LineString):
            draw.line(list(part.coords), fill=outline.colour, width=outline.width_px)
        elif isinstance(part, shapely.Point):
            r = 3 + outline.width_px
            draw.rectangle([part.x - r, part.y - r, part.x + r, part.y + r],
                           outline=outline.colour, width=outline.width_px)


def _scale_bar(draw: ImageDraw.ImageDraw, font: Any, *, x: int, y: int, metres_per_px: float,
               max_px: int) -> str:
    """A black-and-white bar of a round length with its label above; returns the label."""
    length_m = nice_length_m(max_px * metres_per_px)
    length_px = int(round(length_m / metres_per_px))
    half = length_px // 2
    draw.rectangle([x, y, x + half, y + 6], fill=(255, 255, 255), outline=(255, 255, 255))
    draw.rectangle([x + half, y, x + length_px, y + 6], fill=(0, 0, 0), outline=(255, 255, 255))
    label = f"{length_m / 1000:g} km" if length_m >= 1000 else f"{length_m:g} m"
    draw.text((x, y - LINE_PX), label, fill=(240, 240, 240), font=font)
    return label


def _north_arrow(draw: ImageDraw.ImageDraw, font: Any, *, centre: tuple[int, int],
                 north_deg: float) -> None:
    """An arrow pointing to true north with an ``N`` at its tip."""
    cx, cy = centre
    angle = math.radians(north_deg)
    ux, uy = math.sin(angle), -math.cos(angle)  # unit vector to north, y down
    px, py = -uy, ux

    def at(along: float, across: float) -> tuple[float, float]:
        return (cx + ux * along + px * across, cy + uy * along + py * across)

    draw.polygon([at(14, 0), at(-10, 7), at(-5, 0), at(-10, -7)], fill=(255, 255, 255))
    nx, ny = at(24, 0)
    draw.text((nx, ny), "N", fill=(255, 255, 255), font=font, anchor="mm")
