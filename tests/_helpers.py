"""Test helpers: paths to the real data beside the project, small synthetic GeoTIFFs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from affine import Affine

from pipeline.datasets import LEVIR_TILE_FOLDS, LabelledPair, levir_tile

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
DABANCHENG = SHARED_DATA / "dabancheng"


def load_script(name: str):
    """``scripts/<name>.py`` as a module (the scripts are not a package), registered in
    ``sys.modules`` as ``<name>_script`` (dataclasses look their module up there)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write_geotiff(path: Path, data: np.ndarray, *, crs: str = "EPSG:32645",
                  transform: Affine | None = None, nodata: float | None = 0) -> Path:
    """Write a (band, y, x) array as a tiled GeoTIFF."""
    transform = transform or Affine(10.0, 0, 600000.0, 0, -10.0, 4805000.0)
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                   dtype=data.dtype, crs=crs, transform=transform, nodata=nodata,
                   tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
    return path


def random_cnn_weights(c: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Folded weights of a network of width ``c`` (the shapes the trainer exports)."""
    rng = np.random.default_rng(seed)
    shapes = {"e1": (3, c), "e2": (c, 2 * c), "e3": (2 * c, 4 * c), "e4": (4 * c, 8 * c),
              "d3": (8 * c + 8 * c, 4 * c), "d2": (4 * c + 4 * c, 2 * c),
              "d1": (2 * c + 2 * c, c)}
    w = {}
    for name, (cin, cout) in shapes.items():
        for k, i in enumerate((cin, cout)):
            w[f"{name}.{k}.weight"] = rng.normal(0, (2 / (9 * i)) ** 0.5,
                                                 (cout, i, 3, 3)).astype(np.float32)
            w[f"{name}.{k}.bias"] = rng.normal(0, 0.1, cout).astype(np.float32)
    w["out.weight"] = rng.normal(0, 0.5, (1, c, 1, 1)).astype(np.float32)
    w["out.bias"] = np.array([-0.3], np.float32)
    return w


def roof_pair(name: str, seed: int, size: int = 48) -> LabelledPair:
    """A textured pair with two new bright 'roofs' (label 1) in the after date."""
    rng = np.random.default_rng(seed)
    before = rng.uniform(60, 120, (3, size, size)).astype(np.float32)
    after = before + rng.normal(0, 4, before.shape).astype(np.float32)
    label = np.zeros((size, size), np.uint8)
    for y, x in ((8, 8), (28, 26)):
        after[:, y:y + 10, x:x + 12] = 220.0
        label[y:y + 10, x:x + 12] = 1
    return LabelledPair("levir_cd", name, before, after, label, 0.5, group=name)


def assert_folds_hold_out_each_image_once(shipped_card: dict, fold_cards: list[dict]) -> None:
    """Each fold's held-out images are disjoint from its training images and are the whole
    LEVIR-CD tiles of its `LEVIR_TILE_FOLDS` entry; every image the shipped model was trained
    on is held out by exactly one fold."""
    assert sorted(c["fold"] for c in fold_cards) == sorted(LEVIR_TILE_FOLDS)
    held = []
    for card in fold_cards:
        trained = set(card["trained_on"])
        assert not trained & set(card["held_out"])
        assert tuple(card["held_out_tiles"]) == LEVIR_TILE_FOLDS[card["fold"]]
        tiles = {levir_tile(name.split("/")[1]) for name in trained}
        assert not tiles & set(card["held_out_tiles"])
        assert {levir_tile(name.split("/")[1]) for name in card["held_out"]} \
            == set(card["held_out_tiles"])
        held += card["held_out"]
    assert sorted(held) == sorted(shipped_card["trained_on"])


def run_guarded(call: Callable[[], Any], guard_s: float) -> tuple[Any, float]:
    """Run ``call`` on a thread joined with a timeout, so a hang fails the test instead of
    holding pytest: its result (or the exception it raised) and the seconds it took."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = call()
        except Exception as e:  # handed to the test thread
            out["result"] = e

    start = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=guard_s)
    if worker.is_alive():
        pytest.fail(f"still running after {guard_s} s: no time limit ended it")
    return out["result"], time.monotonic() - start
