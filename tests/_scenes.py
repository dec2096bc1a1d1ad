"""Backgrounds for the synthetic-compound tests: real LEVIR-CD ground when the shared data is
there (tests that need it skip otherwise), synthetic texture always."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest

from pipeline.testing import (
    make_existing_compound,
    make_field_boundaries,
    make_new_roofs,
    make_road_grid,
    resample_background,
    synthetic_background,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL = [DATA / "levir_cd_tiles" / "A" / "levircd_test_1.png",
        DATA / "levir_cd" / "A" / "train_386_0512_0768.png"]
PAIR = [DATA / "levir_cd_tiles" / d / "levircd_test_5.png" for d in ("A", "B")]
SIZE_PX = 480  # 240 m of ground at 0.5 m
# Scenes that look like a walled compound to a naive detector, and are not a new one.
LOOK_ALIKES = {
    "road_grid": make_road_grid,
    "field_boundaries": make_field_boundaries,
    "new_roofs": make_new_roofs,
    "existing_compound": make_existing_compound,
}


@cache
def _real_image() -> np.ndarray | None:
    """A 480 x 480 crop (0.5 m, RGB) of real LEVIR-CD ground, or None without the data."""
    from skimage import io

    for path in REAL:
        if path.exists():
            img = io.imread(path)[:SIZE_PX, :SIZE_PX, :3].transpose(2, 0, 1).astype(np.float32)
            pad = [(0, 0), (0, SIZE_PX - img.shape[1]), (0, SIZE_PX - img.shape[2])]
            return np.pad(img, pad, mode="reflect")
    return None


def background(kind: str, res_m: float) -> np.ndarray:
    """Ground at ``res_m``: a real crop (skips the test when absent) or synthetic texture."""
    if kind == "synthetic":
        return synthetic_background((int(240 / res_m),) * 2, res_m=res_m, seed=3)
    img = _real_image()
    if img is None:
        pytest.skip(f"no real background under {DATA} (levir_cd_tiles or levir_cd)")
    return img if res_m == 0.5 else resample_background(img, from_res_m=0.5, to_res_m=res_m)


@cache
def real_pair(res_m: float) -> tuple[np.ndarray, np.ndarray]:
    """Real ground at two dates (LEVIR-CD A and B, no change in this corner), B matched to A.

    Grass, crops and trees changed with the season between the dates: every texture differs.
    """
    if not all(p.exists() for p in PAIR):
        pytest.skip(f"no real date pair under {DATA} (levir_cd_tiles A and B)")
    from skimage import io

    a, b = (io.imread(p)[:SIZE_PX, 500:500 + SIZE_PX, :3].transpose(2, 0, 1).astype(np.float32)
            for p in PAIR)
    q = np.linspace(0, 100, 257)
    b = np.stack([np.interp(bb, np.percentile(bb, q), np.percentile(aa, q))
                  for aa, bb in zip(a, b, strict=True)]).astype(np.float32)
    return tuple(resample_background(x, from_res_m=0.5, to_res_m=res_m) for x in (a, b))


LEVIR_TILES = ("test_1", "test_3", "test_4", "test_5")


@cache
def levir_tile(name: str) -> tuple[np.ndarray, np.ndarray]:
    """A whole LEVIR-CD tile pair (0.5 m, ``(3, y, x)`` float32): real new housing between
    the dates, no walled compound."""
    paths = [DATA / "levir_cd_tiles" / d / f"levircd_{name}.png" for d in ("A", "B")]
    if not all(p.exists() for p in paths):
        pytest.skip(f"no LEVIR-CD tile {name} under {DATA / 'levir_cd_tiles'}")
    from skimage import io

    a, b = (io.imread(p)[..., :3].transpose(2, 0, 1).astype(np.float32) for p in paths)
    return a, b
