"""pipeline.evaluate_sites: the compound detector on real pairs, with and without a compound.

Two checks of `make eval` that run the default `run_detect` end to end: the IoU of the top
compound on the Dabancheng pair with its hand-drawn wall (`dabancheng_iou`), and what it
reports on real fine-resolution pairs that hold no walled compound: the LEVIR-CD suburbs of
Texas (0.5 m, new houses and roads) and a 0.3 m Maxar tile of Puerto Rico before and after
Hurricane Maria (`compounds_on_negatives`). Every compound reported there is a false one.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.datasets import LabelledPair
from pipeline.evaluate_detect import write_pair

__all__ = ["FilePair", "dabancheng_iou", "read_puerto_rico", "compounds_on_negatives"]

# The Puerto Rico tile's dates: Hurricane Maria made landfall on 2017-09-20; the files carry
# no date (the source names the pre- and post-event grids only).
_MARIA = (date(2017, 9, 1), date(2017, 10, 1))


@dataclass(frozen=True)
class FilePair:
    """A georeferenced before/after pair of files with their dates."""

    name: str
    before: Path
    after: Path
    before_date: date
    after_date: date


def read_puerto_rico(data_dir: Path) -> list[FilePair]:
    """The 0.3 m pre/post Maria tile(s) of ``data_dir/puerto_rico_maria_prepost`` (none if
    absent)."""
    folder = data_dir / "puerto_rico_maria_prepost"
    pre = sorted((folder / "Pre_Event_Grids_In_TIFF").glob("*.tif"))
    return [FilePair(f"puerto_rico/{p.stem}", p,
                     folder / "Post_Event_Grids_In_TIFF" / p.name, *_MARIA)
            for p in pre if (folder / "Post_Event_Grids_In_TIFF" / p.name).exists()]


def dabancheng_iou(data_dir: Path, out_root: Path) -> tuple[float, str]:
    """IoU of the top-scoring compound of a default ``run_detect`` with the hand-drawn wall."""
    import json

    import shapely
    from pyproj import Transformer
    from shapely.geometry import shape

    from pipeline.aoi import load_sites, parse_aoi
    from pipeline.config import load_config
    from pipeline.run import run_detect

    folder = data_dir / "dabancheng"
    config = load_config(None)
    sites = load_sites(config.sites_path) if config.sites_path.exists() else {}
    area = parse_aoi("dabancheng", radius_m=config.radius_m, sites=sites)
    result = run_detect(area, folder / "dabancheng_2017-03-02.tif",
                        folder / "dabancheng_2018-10-11.tif", config=config, out_root=out_root)
    compounds = sorted((e for e in result.evidence if e.kind == "compound"),
                       key=lambda e: -e.score)
    if not compounds:
        return 0.0, "no compound found"
    features = json.loads((folder / "compound_label.geojson").read_text())["features"]
    wall = next(f for f in features if f["properties"].get("role") == "main_compound")
    to_grid = Transformer.from_crs("EPSG:4326", result.grid.crs, always_xy=True)
    label = shapely.transform(shape(wall["geometry"]), lambda xy: np.column_stack(
        to_grid.transform(xy[:, 0], xy[:, 1])))
    top = compounds[0].geometry
    iou = top.intersection(label).area / top.union(label).area
    return float(iou), f"top of {len(compounds)} compound(s), score {compounds[0].score:.2f}"


def _run(before: Path, after: Path, dates: tuple[date | None, date | None]) -> dict[str, Any]:
    """A default `run_detect` over the whole of ``before``: its compounds and walls."""
    import rasterio
    from rasterio.warp import transform_bounds

    from pipeline.aoi import parse_aoi
    from pipeline.config import load_config
    from pipeline.run import run_detect

    with rasterio.open(before) as src:
        lonlat = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    aoi = parse_aoi(",".join(f"{v:.7f}" for v in lonlat))
    with tempfile.TemporaryDirectory(prefix="sitewatch-eval-") as tmp:
        result = run_detect(aoi, before, after, config=load_config(None),
                            out_root=Path(tmp) / "out", before_date=dates[0],
                            after_date=dates[1])
    compounds = [e for e in result.evidence if e.kind == "compound"]
    return {"compounds": len(compounds),
            "graded": sum(int(e.measurements.get("grade") or 0) >= 1 for e in compounds),
            "watchtowers": sum(e.kind == "watchtower" for e in result.evidence),
            "new_buildings": sum(e.kind == "new_building" for e in result.evidence),
            "megapixels": result.grid.height * result.grid.width / 1e6}


def compounds_on_negatives(pairs: Sequence[LabelledPair | FilePair], *,
                           progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """What the default detect reports on real pairs that hold no walled compound.

    A `LabelledPair` is written as two GeoTIFFs on a made-up UTM grid (as the detect rows of
    `pipeline.evaluate_detect` do); a `FilePair` is read as it is. Returns ``images``,
    ``megapixels`` and the totals of ``compounds``, ``graded`` (grade 1 or more),
    ``watchtowers`` and ``new_buildings``, and ``per_image`` (name -> the same counts).
    """
    per_image: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        name = pair.name if isinstance(pair, FilePair) else f"{pair.dataset}/{pair.name}"
        if progress:
            progress(f"no-compound pairs: run_detect: {name}")
        if isinstance(pair, FilePair):
            per_image[name] = _run(pair.before, pair.after, (pair.before_date, pair.after_date))
            continue
        with tempfile.TemporaryDirectory(prefix="sitewatch-eval-") as tmp:
            before, after, _ = write_pair(pair, Path(tmp))
            per_image[name] = _run(before, after, (None, None))
    keys = ("compounds", "graded", "watchtowers", "new_buildings", "megapixels")
    totals = {k: sum(r[k] for r in per_image.values()) for k in keys}
    return {"images": len(per_image), **totals, "per_image": per_image}
