"""pipeline.detect.convnet: new-building probability from a small siamese U-Net, in NumPy.

The network (trained by ``scripts/train_cnn.py`` with PyTorch, shipped as plain arrays in
``models/building_change_cnn.npz`` and loaded by `pipeline.models.load_cnn`) has one encoder
applied to each date (shared weights: four levels of two 3x3 convolutions, ReLU and 2x2 max
pooling) and a decoder that upsamples the deepest difference ``|after - before|`` and joins,
at every level, the difference of the two dates' features and the after date's features.
Batch normalisation is folded into each convolution at export, so inference here is
convolutions, ReLU, max pooling and nearest-neighbour upsampling: no deep-learning library
is needed to run it, and the arrays are the whole model.

Each date is standardised per band over its own valid pixels (zero mean, unit variance), so
the model sees relative brightness, not the sensor's scale; large images are processed in
overlapping tiles whose centres are kept, and the probability is averaged over the image and
its three mirrorings (left-right, top-bottom, both). Where nodata borders the image (a grid
larger than the image, an AOI mask), each tile is cut to its valid pixels' bounding box, so
the network sees the image's edge as in training and not a flat band of nodata
(`_valid_forward`). Nothing here reads files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Literal

import dask
import numpy as np
import xarray as xr
from scipy import ndimage as ndi

__all__ = ["ENCODER", "DECODER", "LEVELS", "standardize", "predict_change_cnn", "forward",
           "tiled_probability", "tile_windows", "window_probability", "WindowReader"]

ENCODER = ("e1", "e2", "e3", "e4")
DECODER = ("d3", "d2", "d1")
LEVELS = len(ENCODER) - 1
_ALIGN = 1 << LEVELS
TILE_PX = 512
MARGIN_PX = 64


def _conv3x3(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Zero-padded 3x3 convolution (cross-correlation, as PyTorch) of a ``(c, y, x)`` array.

    Nine matrix products, one per kernel offset, each reading the padded image flattened row
    by row at that offset: the shifted operand is a view, never a copy. Output is computed on
    the padded width and its two extra columns dropped.
    """
    c, ny, nx = x.shape
    width = nx + 2
    pad = np.zeros((c, ny + 3, width), np.float32)  # one spare row for the last offsets
    pad[:, 1:ny + 1, 1:nx + 1] = x
    flat = pad.reshape(c, -1)
    n = ny * width
    out = np.empty((weight.shape[0], n), np.float32)
    out[:] = bias[:, None]
    part = np.empty_like(out)
    for dy in range(3):
        for dx in range(3):
            off = dy * width + dx
            np.matmul(weight[:, :, dy, dx], flat[:, off:off + n], out=part)
            out += part
    return out.reshape(-1, ny, width)[:, :, :nx]


def _block(x: np.ndarray, weights: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """Two folded convolutions, each followed by ReLU."""
    for k in (0, 1):
        x = _conv3x3(x, weights[f"{name}.{k}.weight"], weights[f"{name}.{k}.bias"])
        np.maximum(x, 0.0, out=x)
    return x


def _pool(x: np.ndarray) -> np.ndarray:
    c, ny, nx = x.shape
    return x.reshape(c, ny // 2, 2, nx // 2, 2).max(axis=(2, 4))


def _up(x: np.ndarray) -> np.ndarray:
    return x.repeat(2, axis=1).repeat(2, axis=2)


def forward(before: np.ndarray, after: np.ndarray, weights: Mapping[str, np.ndarray]
            ) -> np.ndarray:
    """Logits ``(y, x)`` of the network for standardised ``(3, y, x)`` float32 images.

    ``y`` and ``x`` must be multiples of 8 (three poolings).
    """
    feats = []
    for image in (before, after):
        levels = [_block(image, weights, ENCODER[0])]
        for name in ENCODER[1:]:
            levels.append(_block(_pool(levels[-1]), weights, name))
        feats.append(levels)
    a, b = feats
    x = np.abs(a[-1] - b[-1])
    for name, level in zip(DECODER, range(LEVELS - 1, -1, -1), strict=True):
        x = np.concatenate([_up(x), np.abs(a[level] - b[level]), b[level]])
        x = _block(x, weights, name)
    out = weights["out.weight"][:, :, 0, 0] @ x.reshape(x.shape[0], -1)
    return (out[0] + weights["out.bias"][0]).reshape(x.shape[1:])


def standardize(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Each band to zero mean and unit variance over ``valid`` pixels; 0 elsewhere."""
    out = np.zeros(image.shape, np.float32)
    if not valid.any():
        return out
    for k, band in enumerate(image):
        values = band[valid].astype(np.float64)
        std = values.std()
        out[k][valid] = ((values - values.mean()) / (std if std > 0 else 1.0))
    return out


def _as_rgb(image: np.ndarray | xr.DataArray, name: str) -> np.ndarray:
    if isinstance(image, xr.DataArray):
        image = image.transpose("band", "y", "x").values
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[0] != 3:
        raise ValueError(f"'{name}' must be a (3, y, x) red-green-blue image, got shape "
                         f"{arr.shape}. Select the red, green and blue bands first.")
    return arr


def _padded_forward(a: np.ndarray, b: np.ndarray, weights: Mapping[str, np.ndarray]
                    ) -> np.ndarray:
    """`forward` on a window of any size: reflect-padded up to a multiple of 8, cropped back."""
    ny, nx = a.shape[1:]
    pad = ((0, 0), (0, (-ny) % _ALIGN), (0, (-nx) % _ALIGN))
    mode: Literal["reflect", "edge"] = "reflect" if min(ny, nx) > _ALIGN else "edge"
    return forward(np.pad(a, pad, mode=mode), np.pad(b, pad, mode=mode), weights)[:ny, :nx]


def _reflect_fill(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``x`` ``(c, y, x)`` with each invalid pixel taken from its mirror image across the
    valid region's border: ``2q - p`` for ``q`` the nearest valid pixel of ``p``, or ``q``
    itself where the mirror image is not valid. On a rectangle this is ``np.pad``'s
    ``reflect``."""
    nearest = np.asarray(ndi.distance_transform_edt(~valid, return_distances=False,
                                                    return_indices=True))
    iy, ix = nearest[0], nearest[1]
    ny, nx = valid.shape
    yy, xx = np.ogrid[:ny, :nx]
    ry, rx = 2 * iy - yy, 2 * ix - xx
    inside = (ry >= 0) & (ry < ny) & (rx >= 0) & (rx < nx)
    ry, rx = np.where(inside, ry, iy), np.where(inside, rx, ix)
    mirrored = valid[ry, rx]
    return x[:, np.where(mirrored, ry, iy), np.where(mirrored, rx, ix)]


def _valid_forward(a: np.ndarray, b: np.ndarray, valid: np.ndarray,
                   weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """`forward` on a window whose ``valid`` pixels (both dates) may not fill it.

    As in training and in the scoring on whole images, the network sees the image's own
    edge (its convolutions' zero padding), not nodata: the window is cut to the bounding box
    of its valid pixels, and the invalid ones left inside it (a mask that is not a
    rectangle) are filled by reflection across the valid border (`_reflect_fill`). Logits
    outside the box are 0 (their pixels are nodata).
    """
    if valid.all():
        return _padded_forward(a, b, weights)
    out = np.zeros(valid.shape, np.float32)
    rows, cols = np.flatnonzero(valid.any(axis=1)), np.flatnonzero(valid.any(axis=0))
    if rows.size == 0:
        return out
    box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    a, b, inner = a[(slice(None), *box)], b[(slice(None), *box)], valid[box]
    if not inner.all():
        a, b = _reflect_fill(a, inner), _reflect_fill(b, inner)
    out[box] = _padded_forward(a, b, weights)
    return out


WindowReader = Callable[[slice, slice], tuple[np.ndarray, np.ndarray, np.ndarray]]


def tile_windows(shape: tuple[int, int], tile_px: int, margin_px: int,
                 region: tuple[int, int, int, int] | None = None
                 ) -> Iterator[tuple[int, int, int, int, slice, slice]]:
    """The tiles of ``region`` ``(y0, y1, x0, x1)`` of a ``shape`` grid (default: all of it).

    Yields ``(y0, x0, h, w, ys, xs)``: a tile's corner and size (tiles start at the region's
    corner) and its window with ``margin_px`` of context each side, clipped to the grid.
    """
    ny, nx = shape
    ry0, ry1, rx0, rx1 = region if region is not None else (0, ny, 0, nx)
    for y0 in range(ry0, ry1, tile_px):
        for x0 in range(rx0, rx1, tile_px):
            ys = slice(max(0, y0 - margin_px), min(ny, y0 + tile_px + margin_px))
            xs = slice(max(0, x0 - margin_px), min(nx, x0 + tile_px + margin_px))
            yield y0, x0, min(tile_px, ry1 - y0), min(tile_px, rx1 - x0), ys, xs


_MIRRORINGS = ((False, False), (False, True), (True, False), (True, True))


def _window_probability(a: np.ndarray, b: np.ndarray, valid: np.ndarray,
                        weights: Mapping[str, np.ndarray], flips: bool) -> np.ndarray:
    """Probability of a window (`_valid_forward`, then `sigmoid`); with ``flips`` the mean of
    the window as is and its three mirrorings (each mapped back). NaN off ``valid``."""
    variants = _MIRRORINGS if flips else _MIRRORINGS[:1]
    prob = np.zeros(valid.shape, np.float32)
    for flip in variants:
        logits = _valid_forward(_flip(a, flip), _flip(b, flip), _flip(valid, flip), weights)
        prob += _flip(sigmoid(logits), flip)
    prob /= len(variants)
    return np.where(valid, prob, np.float32(np.nan))


def window_probability(read: WindowReader, shape: tuple[int, int],
                       weights: Mapping[str, np.ndarray], tile_px: int, margin_px: int,
                       region: tuple[int, int, int, int] | None = None, *,
                       flips: bool = True) -> np.ndarray:
    """The network's probability over the tiles of ``region`` (`tile_windows`), centres kept;
    NaN where a pixel is not valid in both dates.

    ``read(ys, xs)`` gives a window's standardised ``(3, h, w)`` before and after and its
    ``(h, w)`` pixels valid in both (`_valid_forward`: the network sees the valid region's
    edge, not nodata), so a caller decides where the pixels come from (arrays in memory, or
    a Dask array read one window at a time, which bounds memory to one window a thread).
    ``flips``: each window's probability is the mean over it and its three mirrorings
    (`predict_change_cnn`), four times the work.
    """
    ny, nx = shape
    ry0, ry1, rx0, rx1 = region if region is not None else (0, ny, 0, nx)
    prob = np.empty((ry1 - ry0, rx1 - rx0), np.float32)
    for y0, x0, h, w, ys, xs in tile_windows(shape, tile_px, margin_px, region):
        a, b, valid = read(ys, xs)
        out = _window_probability(a, b, valid, weights, flips)
        prob[y0 - ry0:y0 - ry0 + h, x0 - rx0:x0 - rx0 + w] = out[
            y0 - ys.start:y0 - ys.start + h, x0 - xs.start:x0 - xs.start + w]
    return prob


def tiled_probability(a: np.ndarray, b: np.ndarray, weights: Mapping[str, np.ndarray],
                      tile_px: int, margin_px: int,
                      region: tuple[int, int, int, int] | None = None,
                      valid: np.ndarray | None = None, *, flips: bool = True) -> np.ndarray:
    """`window_probability` of arrays in memory.

    ``region`` ``(y0, y1, x0, x1)``: only those rows and columns are computed (tiles start at
    its corner; the rest of the arrays is context). ``valid``: pixels valid in both dates
    (default all; the probability is NaN off them).
    """
    if valid is None:
        valid = np.ones(a.shape[1:], bool)

    def read(ys: slice, xs: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return a[:, ys, xs], b[:, ys, xs], valid[ys, xs]

    return window_probability(read, a.shape[1:], weights, tile_px, margin_px, region,
                              flips=flips)


def _parallel_probability(a: np.ndarray, b: np.ndarray, weights: Mapping[str, np.ndarray],
                          tile_px: int, margin_px: int, valid: np.ndarray | None = None, *,
                          flips: bool = True) -> np.ndarray:
    """`tiled_probability`, one task per tile on the configured Dask scheduler; same values.

    Each task computes one tile's centre from the same windows as the loop would (NumPy's
    matrix products release the GIL, so threads run tiles side by side).
    """
    ny, nx = a.shape[1:]
    regions = [(y0, min(ny, y0 + tile_px), x0, min(nx, x0 + tile_px))
               for y0 in range(0, ny, tile_px) for x0 in range(0, nx, tile_px)]
    if len(regions) == 1:
        return tiled_probability(a, b, weights, tile_px, margin_px, valid=valid, flips=flips)
    run = dask.delayed(tiled_probability, pure=False)
    parts = dask.compute(*[run(a, b, weights, tile_px, margin_px, region=r, valid=valid,
                               flips=flips) for r in regions])
    prob = np.empty((ny, nx), np.float32)
    for (y0, y1, x0, x1), part in zip(regions, parts, strict=True):
        prob[y0:y1, x0:x1] = part
    return prob


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """The network's probability from its logits (clipped against overflow), float32."""
    return (1.0 / (1.0 + np.exp(-np.clip(logits, -60.0, 60.0)))).astype(np.float32)


def _flip(x: np.ndarray, flip: tuple[bool, bool]) -> np.ndarray:
    """``x`` mirrored along y and/or x (its own inverse): a view, no copy (the network's
    padding copies each window anyway)."""
    if flip[0]:
        x = x[..., ::-1, :]
    if flip[1]:
        x = x[..., ::-1]
    return x


def predict_change_cnn(
    before: np.ndarray | xr.DataArray,
    after: np.ndarray | xr.DataArray,
    *,
    weights: Mapping[str, np.ndarray],
    flips: bool = True,
    tile_px: int = TILE_PX,
    margin_px: int = MARGIN_PX,
) -> np.ndarray:
    """Per-pixel probability that a building appeared between ``before`` and ``after``.

    Parameters
    ----------
    before, after
        Red-green-blue images ``(3, y, x)`` (NumPy or a ``("band", "y", "x")`` DataArray) on
        one grid, any scale, NaN nodata; about 0.3-1 m pixels, as in training. The network
        sees the valid pixels' edge, not nodata (`_valid_forward`).
    weights
        The network's folded arrays, e.g. ``pipeline.models.load_cnn(...).weights``.
    flips
        Average the probabilities of each tile's window (with its margin) as is, mirrored
        left-right, mirrored top-bottom and turned by 180 degrees (each mapped back): four
        times the work for a steadier map. Per window, so a chunked run
        (`pipeline.detect.cnn_change.cnn_probability`) gives the same values.
    tile_px, margin_px
        Images larger than ``tile_px`` are run in tiles of that size (multiples of 8) with
        ``margin_px`` of context on each side, of which only the centre is kept; the tiles run
        as tasks on the configured Dask scheduler (threads side by side, same values).

    Returns
    -------
    numpy.ndarray
        ``(y, x)`` float32 in [0, 1]; NaN where either date is nodata.
    """
    a, b = _as_rgb(before, "before"), _as_rgb(after, "after")
    if a.shape != b.shape:
        raise ValueError(f"before {a.shape} and after {b.shape} must be on one grid.")
    if tile_px % _ALIGN or margin_px % _ALIGN or tile_px <= 0:
        raise ValueError(f"tile_px and margin_px must be positive multiples of {_ALIGN}.")
    valid = np.isfinite(a).all(axis=0) & np.isfinite(b).all(axis=0)
    a, b = standardize(a, valid), standardize(b, valid)
    return _parallel_probability(a, b, weights, tile_px, margin_px, valid=valid, flips=flips)
