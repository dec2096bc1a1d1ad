"""pipeline.report.chipread: chip windows read from an input file opened once.

The chips show each input on the working grid with exactly the values
``fetch.local.read_to_grid`` gives (a test compares them on aligned and warped sources).
read_to_grid's lazy array opens the file again for every chunk it computes, so the source
blocks under a chip window were decoded once per grid tile that touched them, and again in
each batch of windows that needed the tile (8192 px bench: 190 tile reads, 5.5 CPU s, for
the 75 distinct tiles under 17 chip windows). :class:`GridWindows` opens the file once for
all the chips of a run:

- a source already on the plan's pixel grid is read window by window from that one dataset
  (GDAL's block cache keeps the blocks neighbouring windows share);
- a warped source is read through the plan's fixed warp tiles (``WARP_TILE_PX``, the same
  tiles read_to_grid warps, each through its own VRT, so values do not depend on the
  window), each tile warped once while it stays in a small cache.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from types import TracebackType

import numpy as np
import rasterio
from rasterio.windows import Window

from pipeline.errors import FetchError
from pipeline.fetch.local import (
    READ_ERRORS,
    WARP_TILE_PX,
    corrupt_message,
    grid_offset,
    inf_to_nan,
    inspect_raster,
    read_direct,
    resampling_method,
    warp_tile,
)
from pipeline.model import GridPlan

__all__ = ["GridWindows", "TILE_CACHE"]

# warped tiles kept for later windows (3 bands of 512 x 512 float32: 3 MB each)
TILE_CACHE = 48


class GridWindows:
    """Windows of one local raster on ``plan``, read from one open dataset.

    Parameters
    ----------
    path
        The input file (GeoTIFF/COG, any CRS and resolution).
    plan
        The working grid.
    resampling
        GDAL warp resampling name, as the run read the file.

    Use as a context manager (or call :meth:`close`); not thread-safe.
    """

    def __init__(self, path: str | Path, plan: GridPlan, *, resampling: str = "bilinear"
                 ) -> None:
        method = resampling_method(resampling)
        info, self._bands = inspect_raster(path)
        self._path = info.path
        self._plan = plan
        self._method = method
        self._tiles: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._src = rasterio.open(info.path)
        try:
            self._floats = any(np.issubdtype(np.dtype(d), np.floating)
                               for d in self._src.dtypes)
            self._offset = grid_offset(self._src, plan)
        except BaseException:
            self._src.close()
            raise

    def read(self, window: tuple[int, int, int, int]) -> np.ndarray:
        """The pixels of a grid window ``(row0, col0, rows, cols)``.

        Returns
        -------
        numpy.ndarray
            ``(band, rows, cols)`` float32, NaN = nodata: read_to_grid's values there.

        Raises
        ------
        FetchError
            The file cannot be decoded there.
        """
        row0, col0, rows, cols = window
        try:
            if self._offset is not None:
                data = read_direct(self._src, self._bands, self._offset,
                                   (col0, row0, cols, rows))
                return inf_to_nan(data) if self._floats else data
            return self._from_tiles(row0, col0, rows, cols)
        except READ_ERRORS as e:
            raise FetchError(corrupt_message(self._path, e)) from e

    def _from_tiles(self, row0: int, col0: int, rows: int, cols: int) -> np.ndarray:
        """A window assembled from the plan's warp tiles (each warped once while cached)."""
        out = np.empty((len(self._bands), rows, cols), np.float32)
        size = WARP_TILE_PX
        for tile_row in range(row0 // size, (row0 + rows - 1) // size + 1):
            for tile_col in range(col0 // size, (col0 + cols - 1) // size + 1):
                tile = self._tile(tile_row, tile_col)
                top, left = tile_row * size, tile_col * size
                r_lo, r_hi = max(row0, top), min(row0 + rows, top + tile.shape[1])
                c_lo, c_hi = max(col0, left), min(col0 + cols, left + tile.shape[2])
                out[:, r_lo - row0:r_hi - row0, c_lo - col0:c_hi - col0] = \
                    tile[:, r_lo - top:r_hi - top, c_lo - left:c_hi - left]
        return out

    def _tile(self, tile_row: int, tile_col: int) -> np.ndarray:
        """One warp tile of the plan, as read_to_grid warps it (from the cache if there)."""
        key = (tile_row, tile_col)
        if key in self._tiles:
            self._tiles.move_to_end(key)
            return self._tiles[key]
        size = WARP_TILE_PX
        col, row = tile_col * size, tile_row * size
        tile = Window(col, row, min(size, self._plan.width - col),
                      min(size, self._plan.height - row))
        data = np.asarray(warp_tile(self._src, self._plan, self._method, self._bands, tile),
                          np.float32)
        if self._floats:
            data = inf_to_nan(data)
        self._tiles[key] = data
        if len(self._tiles) > TILE_CACHE:
            self._tiles.popitem(last=False)
        return data

    def close(self) -> None:
        """Close the dataset and drop the cached tiles."""
        self._tiles.clear()
        self._src.close()

    def __enter__(self) -> GridWindows:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()
