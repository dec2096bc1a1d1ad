"""pipeline.datasets: read the labelled change-detection pairs in ../shared/data (I/O only).

The benchmark imagery (LEVIR-CD, DSIFN) is for research use only: it is read from the shared
data folder beside the project at run time and never copied into the repository. Each reader
returns `LabelledPair`s with float32 ``(band, y, x)`` images and a uint8 ``(y, x)`` reference:
1 change, 0 no change, `IGNORE` not evaluated (Nanjing's reference is sparse).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["IGNORE", "LabelledPair", "DEFAULT_DATA_DIR", "LEVIR_TILE_FOLDS", "read_png_pairs",
           "read_levir_crops", "read_levir_tiles", "read_dsifn", "read_nanjing",
           "levir_crop_origin",           "levir_tile"]

IGNORE = 255
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# The held-out folds of both learned models (scripts/train.py, scripts/train_cnn.py): fold name
# -> the LEVIR-CD tiles (`LabelledPair.group`) it holds out. Every fold holds out one or two of
# the five tile files and two or three of the nine crops; a tile's images are held out
# together, so no held-out image is adjacent to a training image of its own tile. Fixed before
# any model was trained on them.
LEVIR_TILE_FOLDS = {
    "a": ("test_1", "test_2", "test_121"),
    "b": ("test_3", "test_55", "test_77"),
    "c": ("test_4", "train_36", "train_386"),
    "d": ("test_5", "train_412", "val_27"),
}


@dataclass(frozen=True)
class LabelledPair:
    """A before/after image pair with its change reference.

    ``before``/``after`` are float32 ``(band, y, x)`` in the file's units (RGB for the PNG
    sets, six Landsat TM bands for Nanjing); ``rgb`` indexes the red, green, blue bands;
    ``label`` is uint8 1/0/`IGNORE`; ``res_m`` the pixel size; ``group`` the source tile.
    """

    dataset: str
    name: str
    before: np.ndarray
    after: np.ndarray
    label: np.ndarray
    res_m: float
    rgb: tuple[int, int, int] = (0, 1, 2)
    group: str = ""
    extra: dict = field(default_factory=dict, compare=False)


def _read_png(path: Path) -> np.ndarray:
    """A PNG as (band, y, x) float32 (RGB) or (y, x) uint8 (mask)."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB") if im.mode not in ("L", "1", "P") else im.convert("L"))
    return np.moveaxis(arr, -1, 0).astype(np.float32) if arr.ndim == 3 else arr


def read_png_pairs(folder: Path, dataset: str, res_m: float) -> Iterator[LabelledPair]:
    """Pairs from ``folder/{A,B,label}/<name>.png`` (labels 0/255), sorted by name."""
    names = sorted(p.stem for p in (folder / "A").glob("*.png"))
    if not names:
        raise FileNotFoundError(f"No pairs found in {folder / 'A'}: is the shared data there?")
    for name in names:
        label = (_read_png(folder / "label" / f"{name}.png") > 127).astype(np.uint8)
        yield LabelledPair(dataset, name, _read_png(folder / "A" / f"{name}.png"),
                           _read_png(folder / "B" / f"{name}.png"), label, res_m,
                           group=levir_tile(name) if dataset.startswith("levir") else name)


def levir_tile(name: str) -> str:
    """LEVIR-CD tile of a crop or tile file name: 'test_2_0000_0512' -> 'test_2'."""
    name = name.removeprefix("levircd_").removesuffix("_r0256")
    parts = name.split("_")
    return "_".join(parts[:2])


def levir_crop_origin(name: str) -> tuple[str, int, int]:
    """``(tile, row, col)`` of a LEVIR-CD crop named ``<split>_<tile>_<row>_<col>``."""
    parts = name.split("_")
    if len(parts) != 4 or not (parts[2].isdigit() and parts[3].isdigit()):
        raise ValueError(f"{name!r} is not a LEVIR-CD crop name <split>_<tile>_<row>_<col>")
    return f"{parts[0]}_{parts[1]}", int(parts[2]), int(parts[3])


def read_levir_crops(data_dir: Path = DEFAULT_DATA_DIR) -> list[LabelledPair]:
    """The nine 256 x 256 LEVIR-CD crops (0.5 m)."""
    return list(read_png_pairs(data_dir / "levir_cd", "levir_cd", 0.5))


def read_levir_tiles(data_dir: Path = DEFAULT_DATA_DIR) -> list[LabelledPair]:
    """The five larger LEVIR-CD tiles (test_2 without its top 256 rows), 0.5 m."""
    pairs = []
    for p in read_png_pairs(data_dir / "levir_cd_tiles", "levir_cd_tiles", 0.5):
        row0 = 256 if p.name.endswith("_r0256") else 0
        pairs.append(LabelledPair(p.dataset, p.name, p.before, p.after, p.label, p.res_m,
                                  group=p.group, extra={"row0": row0}))
    return pairs


def read_dsifn(data_dir: Path = DEFAULT_DATA_DIR) -> list[LabelledPair]:
    """The ten DSIFN-CD 256 x 256 crops (Google Earth, about 2 m; general land-cover change)."""
    return list(read_png_pairs(data_dir / "dsifn", "dsifn", 2.0))


def _read_envi(path: Path) -> np.ndarray:
    """An ENVI BSQ uint8 file as (band, y, x) float32, shape from its .hdr."""
    hdr = {}
    for line in path.with_suffix(".hdr").read_text().splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            hdr[key.strip()] = value.strip()
    shape = (int(hdr["bands"]), int(hdr["lines"]), int(hdr["samples"]))
    if hdr.get("data type") != "1" or hdr.get("interleave", "bsq").lower() != "bsq":
        raise ValueError(f"{path}: only uint8 BSQ ENVI files are supported")
    offset = int(hdr.get("header offset", "0"))
    raw = np.fromfile(path, dtype=np.uint8, offset=offset, count=int(np.prod(shape)))
    return raw.reshape(shape).astype(np.float32)


def read_nanjing(data_dir: Path = DEFAULT_DATA_DIR) -> list[LabelledPair]:
    """Landsat-5 TM Nanjing 2000/2002 (30 m, 6 bands) with its sparse reference pixels."""
    folder = data_dir / "landsat_nanjing"
    before = _read_envi(folder / "LT51200382000124BJC00_Nanjing")
    after = _read_envi(folder / "LT51200382002193BJC00_Nanjing")
    change = _read_png(folder / "change.bmp") > 127
    same = _read_png(folder / "unchanged.bmp") > 127
    label = np.full(change.shape, IGNORE, np.uint8)
    label[same] = 0
    label[change] = 1
    return [LabelledPair("landsat_nanjing", "nanjing_2000_2002", before, after, label, 30.0,
                         rgb=(2, 1, 0), group="nanjing")]
