"""The chunked (Dask) run and the in-memory (NumPy) run give the same evidence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
from _helpers import ROOT
from affine import Affine
from numpy.testing import assert_allclose, assert_array_equal
from rasterio.transform import from_origin
from rasterio.warp import transform_bounds

import pipeline.run as run
from pipeline.aoi import parse_aoi
from pipeline.config import load_config
from pipeline.fetch.local import chunk_origin
from pipeline.run import run_detect
from pipeline.testing import make_pair

UTM = "EPSG:32645"
ORIGIN = (600000.0, 4805000.0)
RES_M = 2.0
SHAPE = (640, 640)
# Floats computed from per-chunk sums (object means) may differ in their last bits.
REL_TOL = 1e-6


def _draw(after: np.ndarray) -> None:
    """A walled compound of bright blocks, and a few isolated new buildings, into ``after``."""
    r0, r1, c0, c1 = 160, 280, 240, 400
    after[:, r0:r1, c0:c1] += 15.0
    after[:, r0:r0 + 2, c0:c1] = after[:, r1 - 2:r1, c0:c1] = 220.0
    after[:, r0:r1, c0:c0 + 2] = after[:, r0:r1, c1 - 2:c1] = 220.0
    for r in range(r0 + 14, r1 - 20, 30):
        for c in range(c0 + 14, c1 - 30, 38):
            after[:, r:r + 14, c:c + 24] = 205.0
    for r, c in ((450, 80), (500, 520), (60, 560), (560, 300)):
        after[:, r:r + 12, c:c + 18] = 60.0


def _write(path: Path, data: np.ndarray) -> Path:
    values = np.clip(np.nan_to_num(np.round(data), nan=0.0), 0, 255).astype(np.uint8)
    profile = dict(driver="GTiff", width=SHAPE[1], height=SHAPE[0], count=3, dtype="uint8",
                   crs=UTM, transform=from_origin(*ORIGIN, RES_M, RES_M), nodata=0, tiled=True,
                   blockxsize=256, blockysize=256, compress="deflate")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(values)
    return path


def _make_pair(folder: Path) -> tuple[Path, Path]:
    """A textured pair, shifted by a fraction of a pixel, gained, with a nodata strip."""
    before, after = make_pair(shape=SHAPE, change=None, noise=1.0, shift=(0.4, -0.3),
                              gain=1.1, offset=4.0, seed=3, res_m=RES_M, crs=UTM)
    # flatten the texture, so the new compound stands out as site-scale evidence
    b = 100.0 + 0.25 * (before.values - 100.0)
    a = 100.0 + 0.25 * (after.values - 100.0)
    for r in range(380, 620, 40):  # an old village in both dates: both have bright tails
        for c in range(60, 600, 36):
            b[:, r:r + 16, c:c + 20] = a[:, r:r + 16, c:c + 20] = 210.0
    _draw(a)
    a[:, :, :40] = 0  # nodata strip in the after date
    return (_write(folder / "before_2019-05-02.tif", b),
            _write(folder / "after_2021-06-14.tif", a))


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """The synthetic pair as two GeoTIFFs."""
    return _make_pair(tmp_path_factory.mktemp("pair"))


def _run(pair: tuple[Path, Path], out: Path, chunks: int | None):
    with rasterio.open(pair[0]) as src:
        lonlat = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    aoi = parse_aoi(",".join(f"{v:.6f}" for v in lonlat))
    result = run_detect(aoi, *pair, config=load_config(), out_root=out, chunks=chunks)
    features = json.loads((result.run_dir / "changes.geojson").read_text())["features"]
    with rasterio.open(result.run_dir / "change_mask.tif") as ds:
        mask = ds.read(1)
    with rasterio.open(result.run_dir / "change_magnitude.tif") as ds:
        magnitude = ds.read(1)
    return result, features, mask, magnitude


def _assert_same_value(a, b, where: str) -> None:
    if isinstance(a, float) or isinstance(b, float):
        assert_allclose(b, a, rtol=REL_TOL, atol=1e-9, err_msg=where)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same_value(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_value(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_run_detect_chunked_equals_in_memory(pair, tmp_path):
    """Chunked and in-memory runs: same mask, magnitude, features and measurements."""
    eager, eager_features, eager_mask, eager_mag = _run(pair, tmp_path / "eager", None)
    lazy, lazy_features, lazy_mask, lazy_mag = _run(pair, tmp_path / "lazy", 512)
    read_eager, read_lazy = eager.steps[0]["details"], lazy.steps[0]["details"]
    # the lazy chunks start on the files' tile borders (both on the grid, tiles lined up)
    origin = chunk_origin([str(p) for p in pair], lazy.grid, 512)
    assert origin != (0, 0)
    assert read_eager["chunks"] is None and read_lazy["chunks"] == [512 + o for o in origin]
    assert eager.grid.shape[0] > 512 and eager.grid.shape[1] > 512  # several chunks a side
    assert eager.coreg == lazy.coreg and eager.coreg.applied
    assert lazy.threshold == eager.threshold
    assert_array_equal(lazy_mask, eager_mask)
    assert_array_equal(lazy_mag, eager_mag)
    kinds = [f["properties"]["kind"] for f in eager_features]
    assert "compound" in kinds and "new_building" in kinds
    for e, z in zip(eager_features, lazy_features, strict=True):
        for key in ("run_id", "method"):
            e["properties"].pop(key, None)
            z["properties"].pop(key, None)
        _assert_same_value(e, z, e["properties"]["id"])


def test_run_detect_scratch_disk_full_is_a_clear_error(pair, tmp_path, monkeypatch):
    """A full scratch disk in a chunked run is an OutputError naming TMPDIR; nothing under OUT."""
    import errno

    import pipeline.run
    from pipeline.errors import OutputError

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline.run, "_save_block", full)
    with pytest.raises(OutputError, match="scratch folder .* is full.*TMPDIR"):
        _run(pair, tmp_path / "out", 512)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.*"))


def test_run_detect_scratch_disk_full_waits_for_writes_in_flight(pair, tmp_path, monkeypatch):
    """When one chunk write fails, the error is raised only after the other threads' writes
    have ended, so none writes into the scratch folder once its removal began; none is left."""
    import errno
    import threading
    import time

    from pipeline.errors import OutputError

    real_save, calls, ended = np.save, [], []
    second_started = threading.Event()

    def save(path, *args, **kwargs):
        if "sitewatch-scratch-" not in str(path):
            return real_save(path, *args, **kwargs)
        calls.append(1)
        if len(calls) == 1:  # the first write fails once a second one is under way
            second_started.wait(10)
            raise OSError(errno.ENOSPC, "No space left on device")
        second_started.set()
        time.sleep(0.5)
        real_save(path, *args, **kwargs)
        ended.append(time.monotonic())

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(np, "save", save)
    with pytest.raises(OutputError, match="scratch folder .* is full"):
        _run(pair, tmp_path / "out", 512)
    raised = time.monotonic()
    monkeypatch.undo()
    assert len(calls) >= 2, "no second write was in flight when the first failed"
    # the second write finished, in its folder (not removed under it), before the error
    assert ended and max(ended) <= raised
    assert list((tmp_path / "tmp").iterdir()) == []


def test_run_detect_scratch_peak_is_reported_and_within_the_documented_bound(pair, tmp_path):
    """The detect step reports the scratch folder's peak; at most the README's 70 bytes a
    pixel (the after image as read is deleted once the normalized one is stored)."""
    result, *_ = _run(pair, tmp_path / "out", 512)
    details = next(s["details"] for s in result.steps if s["name"] == "detect")
    per_px = details["scratch_peak_mb"] * 2**20 / (result.grid.shape[0] * result.grid.shape[1])
    assert 24 <= per_px <= 70  # at least both masked inputs (3 float32 bands each)


@pytest.mark.parametrize("chunks", [None, 512])
def test_run_detect_all_nodata_date_names_it(pair, tmp_path, chunks):
    """An after image with no valid pixel in the AOI is refused, chunked or not, by name."""
    from pipeline.errors import NoValidDataError

    empty = _write(tmp_path / "empty_2021-06-14.tif", np.zeros((3, *SHAPE)))
    with pytest.raises(NoValidDataError, match="empty_2021-06-14.tif .*nodata"):
        _run((pair[0], empty), tmp_path / "out", chunks)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.tif"))


def test_acquire_pair_reads_large_grids_chunked(pair, tmp_path, monkeypatch):
    """The CLI's reader chunks grids above CHUNKED_MIN_PX, with the same values as a whole read."""
    import dask.array

    import pipeline.fetch.local as local
    from pipeline.acquire import Acquisition, acquire_pair, fetch_context

    with rasterio.open(pair[0]) as src:
        lonlat = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    aoi = parse_aoi(",".join(f"{v:.6f}" for v in lonlat))
    config = load_config()
    wants = [Acquisition(role=role, path=path) for role, path in zip(("before", "after"), pair,
                                                                    strict=True)]
    context = fetch_context(config)
    _, whole_b, whole_a = acquire_pair(aoi, *wants, config=config, context=context)
    assert not isinstance(whole_b.data.data, dask.array.Array)  # 640 px: read whole
    monkeypatch.setattr(local, "CHUNKED_MIN_PX", 256 * 256)
    monkeypatch.setattr(local, "CHUNK_PX", 512)
    _, lazy_b, lazy_a = acquire_pair(aoi, *wants, config=config, context=context)
    assert isinstance(lazy_b.data.data, dask.array.Array)
    assert lazy_b.data.data.chunksize[-2:] == (512, 512)
    assert_array_equal(lazy_b.data.values, whole_b.data.values)
    assert_array_equal(lazy_a.data.values, whole_a.data.values)


@pytest.mark.parametrize("scheduler", ["synchronous", "threads"])
@pytest.mark.parametrize("chunks", [(16, 16), (7, 23), (64, 5)])
def test_objects_from_regions_equal_extract_objects(chunks, scheduler, monkeypatch):
    """Objects read window by window from chunked regions equal those of the whole mask, their
    batches measured one after the other or in parallel threads."""
    import dask
    import dask.array as da
    import shapely

    import pipeline.core.components as components
    from pipeline.core.components import label_regions
    from pipeline.detect.objects import extract_objects
    from pipeline.detect.region_objects import objects_from_regions

    rng = np.random.default_rng(7)
    mask = np.zeros((64, 80), np.uint8)
    mask[10:30, 12:40] = 1  # a block over chunk borders and a corner
    mask[14:18, 20:24] = 0  # with a hole
    mask[40:60, 3:6] = mask[57:60, 3:70] = 1  # an L across many chunks
    mask[33, 50] = mask[34, 51] = mask[35, 52] = 1  # a diagonal line (8-connected only)
    mask[rng.random(mask.shape) < 0.05] = 1  # speckle: small objects everywhere
    mask[:, 76:] = 255  # nodata
    magnitude = rng.normal(5.0, 2.0, mask.shape).astype(np.float32)
    magnitude[:, 76:] = np.nan
    delta = rng.normal(0.0, 10.0, mask.shape).astype(np.float32)
    transform = from_origin(*ORIGIN, RES_M, RES_M)
    kwargs = dict(transform=transform, threshold=3.0, min_area_m2=12.0)
    expected = extract_objects(mask, da.from_array(magnitude, chunks=chunks),
                               da.from_array(delta, chunks=chunks), **kwargs)
    regions = label_regions(da.from_array(mask, chunks=chunks) == 1, connectivity=2)
    monkeypatch.setattr(components, "_RECENT_BLOCKS", 1)  # every read evicts: races show
    with dask.config.set(scheduler=scheduler, num_workers=4):
        got = objects_from_regions(regions, da.from_array(magnitude, chunks=chunks),
                                   da.from_array(delta, chunks=chunks), **kwargs)
    assert len(expected) > 5 and [o.label for o in got] == [o.label for o in expected]
    for e, g in zip(expected, got, strict=True):
        assert shapely.equals_exact(e.polygon, g.polygon, tolerance=0), e.label
        for name in ("area_m2", "solidity", "rectangularity", "elongation", "mean_magnitude",
                     "contrast", "brightness_change"):
            assert getattr(g, name) == getattr(e, name), (e.label, name)


def _walled_pair(shape: tuple[int, int], res_m: float) -> tuple[np.ndarray, np.ndarray]:
    """A noisy pair whose after date has three walled rectangles (walls and shadows), some
    across chunk borders, a nodata strip in each date."""
    rng = np.random.default_rng(0)
    before = (100 + rng.normal(0, 3, (3, *shape))).astype(np.float32)
    after = before + rng.normal(0, 2, before.shape).astype(np.float32)
    s = int(round(1 / res_m))
    for r0, c0, r1, c1 in ((40, 50, 230, 300), (300, 90, 420, 180), (120, 330, 480, 470)):
        r0, c0, r1, c1, w = r0 * s, c0 * s, r1 * s, c1 * s, 2 * s
        after[:, r0:r0 + w, c0:c1] = after[:, r1 - w:r1, c0:c1] = 200.0
        after[:, r0:r1, c0:c0 + w] = after[:, r0:r1, c1 - w:c1] = 200.0
        after[:, r0 + w:r0 + 2 * w, c0:c1] = 40.0  # a shadow inside the north wall
    after[:, :, :7 * s] = np.nan
    before[:, -5 * s:, :] = np.nan
    return before, after


@pytest.mark.parametrize(("res_m", "chunk"), [(1.0, 128), (1.0, 200), (0.5, 300)])
def test_scene_walls_chunked_equal_whole(res_m, chunk):
    """A Dask pair's wall search (chunk by chunk) finds the segments and line map of the
    whole-scene search: same segments to the bit, same mask and strength everywhere."""
    import dask.array as da

    from pipeline.detect.walled import scene_walls
    from pipeline.model import DetectParams

    shape = (int(500 / res_m), int(520 / res_m))
    before, after = _walled_pair(shape, res_m)
    kwargs = dict(transform=from_origin(*ORIGIN, res_m, res_m), res_m=res_m,
                  params=DetectParams())
    whole = scene_walls(before, after, **kwargs)
    lazy = scene_walls(da.from_array(before, chunks=(3, chunk, chunk)),
                       da.from_array(after, chunks=(3, chunk, chunk)), **kwargs)
    assert len(whole.segments) >= 12 and lazy.segments == whole.segments
    height, width = whole.line_map.mask.shape
    assert whole.line_map.mask.any() and lazy.line_map.threshold == whole.line_map.threshold
    assert_array_equal(lazy.line_map.mask[0:height, 0:width], whole.line_map.mask)
    assert_array_equal(lazy.line_map.strength[0:height, 0:width], whole.line_map.strength)
    assert lazy.line_map.transform == whole.line_map.transform


def test_scene_walls_from_grey_images_equal_from_stacks():
    """The wall search given the grey images (as `detect_sites` passes its stored ones) finds
    what it finds from the band stacks, in memory and chunk by chunk."""
    import dask.array as da

    from pipeline.detect.texture import grey
    from pipeline.detect.walled import scene_walls
    from pipeline.model import DetectParams

    before, after = _walled_pair((500, 520), 0.5)
    kwargs = dict(transform=from_origin(*ORIGIN, 0.5, 0.5), res_m=0.5, params=DetectParams())
    for wrap in (np.asarray, lambda x: da.from_array(x, chunks=(3, 160, 160)[-x.ndim:])):
        stacks = scene_walls(wrap(before), wrap(after), **kwargs)
        greys = scene_walls(wrap(grey(before)), wrap(grey(after)), **kwargs)
        assert len(stacks.segments) >= 12 and greys.segments == stacks.segments
        assert greys.line_map.threshold == stacks.line_map.threshold
        height, width = stacks.line_map.mask.shape
        assert_array_equal(greys.line_map.mask[0:height, 0:width],
                           stacks.line_map.mask[0:height, 0:width])


def test_windowed_array_reads_only_what_is_asked():
    """WindowedArray: windows and points as NumPy would give them, each from one window read."""
    from pipeline.detect.stored import WindowedArray

    data = np.arange(60 * 70).reshape(60, 70)
    reads = []

    def read(rows, cols):
        reads.append((rows, cols))
        return data[rows, cols]

    arr = WindowedArray(data.shape, data.dtype, read)
    assert_array_equal(arr[5:17, 60:80], data[5:17, 60:80])
    r, c = np.array([3, 50, 7]), np.array([9, 2, 69])
    assert_array_equal(arr[r, c], data[r, c])
    assert reads[-1] == (slice(3, 51), slice(2, 70))  # the points' bounding window only
    assert arr[np.zeros(0, int), np.zeros(0, int)].shape == (0,)
    with pytest.raises(IndexError):
        arr[np.array([60]), np.array([0])]
    with pytest.raises(IndexError):
        arr[0:10:2, 0:5]


@pytest.mark.parametrize(("shape", "leaf_px"), [((300, 410), 1000), ((97, 1203), 4096),
                                                 ((1200, 1100), 1 << 18)])
def test_grid_stats_equal_whole_image_stats(shape, leaf_px):
    """The wall search's fill and scale, read band by band, equal walls' own on the whole image
    to the bit (NumPy's pairwise float32 sum split the same way; the same scale sample)."""
    import dask.array as da

    from pipeline.detect.stored import grid_stats
    from pipeline.detect.wall_noise import fill_value, robust_scale

    rng = np.random.default_rng(5)
    image = rng.normal(120.0, 40.0, shape).astype(np.float32)
    image[rng.random(shape) < 0.1] = np.nan
    image[:, :30] = np.nan
    fill, scale = grid_stats(da.from_array(image, chunks=(64, 128)), scale=True,
                              leaf_px=leaf_px)
    assert fill == fill_value(image) and scale == robust_scale(image)
    empty = da.full((40, 50), np.nan, dtype=np.float32, chunks=16)
    assert grid_stats(empty, scale=True) == (0.0, 1.0)


def test_assess_outlines_in_batches_equal_all_at_once(monkeypatch):
    """Outlines graded a batch of crops at a time (lazy pair) grade as all at once (NumPy)."""
    import dask.array as da

    import pipeline.detect.walled as walled
    from pipeline.model import DetectParams

    before, after = _walled_pair((500, 520), 1.0)
    kwargs = dict(transform=from_origin(*ORIGIN, 1.0, 1.0), res_m=1.0, params=DetectParams())
    scene = walled.scene_walls(before, after, **kwargs)
    outlines = walled.wall_outlines(scene, params=kwargs["params"])
    whole = walled.assess_outlines(before, after, outlines, scene=scene, **kwargs)
    monkeypatch.setattr(walled, "GRADE_BATCH_PX", 1)  # one outline a batch
    lazy = walled.assess_outlines(da.from_array(before, chunks=(3, 128, 128)),
                                  da.from_array(after, chunks=(3, 128, 128)), outlines,
                                  scene=scene, **kwargs)
    assert len(outlines) >= 2 and lazy == whole
    assert max(a.grade for a in whole) >= 1


def test_assess_outlines_in_threads_equal_one_by_one(monkeypatch):
    """Outlines graded in parallel threads, all reading the chunked scene's stored wall maps and
    labels through their small chunk caches, grade as one by one."""
    import dask
    import dask.array as da

    import pipeline.core.components as components
    import pipeline.detect.walled as walled
    from pipeline.model import DetectParams

    before, after = _walled_pair((500, 520), 1.0)
    kwargs = dict(transform=from_origin(*ORIGIN, 1.0, 1.0), res_m=1.0, params=DetectParams())
    lazy = [da.from_array(x, chunks=(3, 96, 96)) for x in (before, after)]
    scene = walled.scene_walls(*lazy, **kwargs)
    outlines = walled.wall_outlines(scene, params=kwargs["params"])
    monkeypatch.setattr(components, "_RECENT_BLOCKS", 1)  # every read evicts: races show
    with dask.config.set(scheduler="synchronous"):
        alone = walled.assess_outlines(*lazy, outlines, scene=scene, **kwargs)
    scene = walled.scene_walls(*lazy, **kwargs)  # fresh (empty) caches
    with dask.config.set(scheduler="threads", num_workers=4):
        threaded = walled.assess_outlines(*lazy, outlines * 3, scene=scene, **kwargs)
    assert len(outlines) >= 2 and threaded == alone * 3


def test_assess_outlines_tasks_do_not_carry_the_scene_segments(monkeypatch):
    """Each outline's task gets its crops, outline and transform only: the scene's segments
    and line map are bound to the function once. Dask walks every argument of every call,
    so passing the segments cost time in proportion to their number for each outline
    (quadratic in the area); without a timed test, the arguments are checked."""
    import sys

    import pipeline.detect.walled as walled
    from pipeline.detect.enclosure import SegmentArrays
    from pipeline.model import DetectParams

    before, after = _walled_pair((500, 520), 1.0)
    kwargs = dict(transform=from_origin(*ORIGIN, 1.0, 1.0), res_m=1.0, params=DetectParams())
    scene = walled.scene_walls(before, after, **kwargs)
    outlines = walled.wall_outlines(scene, params=kwargs["params"])
    walked: list[type] = []
    delayed_module = sys.modules["dask.delayed"]  # `dask.delayed` is also the function
    original = delayed_module.unpack_collections

    def spy(expr, *args, **kw):  # called on each argument, and again on what it holds
        walked.append(type(expr))
        return original(expr, *args, **kw)

    monkeypatch.setattr(delayed_module, "unpack_collections", spy)
    found = walled.assess_outlines(before, after, outlines, scene=scene, **kwargs)
    assert len(found) == len(outlines) >= 2 and walked
    assert SegmentArrays not in walked and type(scene.line_map) not in walked


def test_find_compounds_in_batches_equal_all_at_once(pair, monkeypatch):
    """Compound candidates found a batch of crops at a time (lazy pair) are those found with
    every crop at once (NumPy pair)."""
    import dask.array as da

    import pipeline.detect.blocks as blocks
    import pipeline.detect.compounds as compounds
    from pipeline.model import DetectParams

    before, after, transform = _two_compound_pair(pair)
    params = DetectParams().objects
    whole = compounds.find_compounds(before, after, transform=transform, res_m=RES_M,
                                     params=params)
    monkeypatch.setattr(compounds, "CROP_BATCH_PX", 1)  # one region a batch
    lazy = compounds.find_compounds(da.from_array(before, chunks=(3, 200, 200)),
                                    da.from_array(after, chunks=(3, 200, 200)),
                                    transform=transform, res_m=RES_M, params=params)
    assert len(whole[0]) >= 2 and lazy[0] == whole[0]
    assert lazy[1].shape == whole[1].shape and lazy[2] == whole[2]
    assert list(blocks.crop_batches([5, 1, 1, 9, 2], 7)) == [range(0, 3), range(3, 4),
                                                                range(4, 5)]


def _two_compound_pair(pair) -> tuple[np.ndarray, np.ndarray, Affine]:
    """The test pair with an edge of nodata and a second block of new buildings (two
    candidate regions): ``(before, after, transform)``."""
    with rasterio.open(pair[0]) as b, rasterio.open(pair[1]) as a:
        before, after = (src.read().astype(np.float32) for src in (b, a))
        transform = b.transform
    after[:, :, :40] = np.nan
    for r in range(30, 120, 30):
        for c in range(470, 600, 38):
            after[:, r:r + 14, c:c + 24] = 205.0
    return before, after, transform


@pytest.mark.parametrize("chunked", [False, True])
def test_find_compounds_in_threads_equal_one_by_one(pair, chunked):
    """The regions fitted and snapped in parallel threads give the candidates, in the same
    order, of one region at a time (the synchronous scheduler)."""
    import dask
    import dask.array as da

    import pipeline.detect.compounds as compounds
    from pipeline.model import DetectParams

    before, after, transform = _two_compound_pair(pair)
    if chunked:
        before, after = (da.from_array(x, chunks=(3, 200, 200)) for x in (before, after))
    kwargs = dict(transform=transform, res_m=RES_M, params=DetectParams().objects)
    with dask.config.set(scheduler="synchronous"):
        alone = compounds.find_compounds(before, after, **kwargs)
    with dask.config.set(scheduler="threads", num_workers=4):
        threaded = compounds.find_compounds(before, after, **kwargs)
    assert len(alone[0]) >= 2 and threaded[0] == alone[0] and threaded[2] == alone[2]


@pytest.mark.parametrize("case", ["overlap", "disjoint", "before_empty", "after_empty"])
def test_validity_dask_blocks_equal_numpy(case):
    """The chunked validity flags (valid in before, in after, in both) equal the NumPy ones."""
    import dask.array as da
    import xarray as xr

    from pipeline.inputs import validity

    rng = np.random.default_rng(7)
    before = rng.random((3, 30, 26)).astype(np.float32)
    after = rng.random((3, 30, 26)).astype(np.float32)
    before[1, rng.random((30, 26)) < 0.3] = np.nan  # a NaN in one band is enough
    after[2, rng.random((30, 26)) < 0.3] = np.inf
    if case == "disjoint":
        before[:, :, 13:] = np.nan
        after[:, :, :13] = np.nan
    elif case == "before_empty":
        before[0] = np.nan
    elif case == "after_empty":
        after[:] = -np.inf
    expected = tuple(bool(v) for v in validity(xr.DataArray(before, dims=("band", "y", "x")),
                                                 xr.DataArray(after, dims=("band", "y", "x"))))
    lazy = validity(xr.DataArray(da.from_array(before, chunks=(3, 7, 9)), dims=("band", "y", "x")),
                     xr.DataArray(da.from_array(after, chunks=(1, 11, 5)), dims=("band", "y", "x")))
    assert tuple(bool(v) for v in da.compute(*lazy)) == expected
    assert expected == {"overlap": (True, True, True), "disjoint": (True, True, False),
                        "before_empty": (False, True, False),
                        "after_empty": (True, False, False)}[case]


def test_nan_outside_blocks_inside_the_polygon_are_not_rasterized(monkeypatch):
    """Dask blocks wholly inside the AOI are passed through unrasterized; every block's NaN
    pixels equal the whole-grid rasterization's."""
    import dask.array as da
    from affine import Affine
    from rasterio import features
    from shapely.geometry import Polygon

    import pipeline.inputs as inputs

    transform = Affine(0.5, 0, 1000.0, 0, -0.5, 5000.0)
    polygon = Polygon([(1010, 4990), (1300, 4985), (1290, 4800), (1005, 4810)])
    image = np.random.default_rng(8).random((2, 500, 700)).astype(np.float32)
    expected = image.copy()
    expected[:, features.geometry_mask([polygon], out_shape=(500, 700),
                                       transform=transform)] = np.nan
    calls = []
    original = features.geometry_mask
    monkeypatch.setattr(inputs.features, "geometry_mask",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    lazy = da.from_array(image, chunks=(2, 37, 53))
    got = lazy.map_blocks(inputs._nan_outside_np, geometry=polygon, transform=transform,
                          dtype=np.float32).compute(scheduler="synchronous")
    assert_array_equal(got, expected)
    assert 0 < len(calls) < lazy.npartitions
    assert_array_equal(image, np.random.default_rng(8).random((2, 500, 700)).astype(np.float32))


def test_run_detect_deletes_its_scratch_after_the_copies_and_before_the_chips(
        pair, tmp_path, monkeypatch):
    """A chunked run deletes every stored raster but the magnitude and the mask once the
    inputs are copied (deleting during the copies slowed them), before the chips are drawn;
    the two rasters are still written whole (the chunked = in-memory tests above), and
    nothing is left in TMPDIR."""
    import pipeline.report.package as package

    order: list = []
    real_preserve, real_chips = package.preserve_originals, package._chips
    real_drop = run._Scratch.drop_all_but

    def preserve(*args, **kwargs):
        result = real_preserve(*args, **kwargs)
        order.append("originals")
        return result

    def chips(*args, **kwargs):
        order.append("chips")
        return real_chips(*args, **kwargs)

    def drop_all_but(self, *items):
        order.append(("stored", len(self.files)))
        real_drop(self, *items)
        order.append(("kept", sorted(self.files) == sorted(i.data.name for i in items)))

    monkeypatch.setattr(package, "preserve_originals", preserve)
    monkeypatch.setattr(package, "_chips", chips)
    monkeypatch.setattr(run._Scratch, "drop_all_but", drop_all_but)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    result, features, mask, _ = _run(pair, tmp_path / "out", 512)
    assert order[0] == "originals" and order[3] == "chips", order
    assert order[1][0] == "stored" and order[1][1] > 2  # others than the two were stored
    assert order[2] == ("kept", True)
    assert features and (mask == 1).any()
    assert list((tmp_path / "tmp").iterdir()) == []


_CHILD_RUN = """
import sys
import dask
from rasterio.warp import transform_bounds
import rasterio
from pipeline.aoi import parse_aoi
from pipeline.config import load_config
from pipeline.run import run_detect
before, after, out, chunks = sys.argv[1:5]
with rasterio.open(before) as src:
    lonlat = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
aoi = parse_aoi(",".join(f"{v:.6f}" for v in lonlat))
with dask.config.set(num_workers=2):
    result = run_detect(aoi, before, after, config=load_config(), out_root=out,
                        chunks=int(chunks) or None)
print(result.run_dir, "distributed" in sys.modules)
"""

_CHILD_RECHUNK = """
import sys
import dask.array as da
import pipeline.run as run
with run._threaded_scheduler():
    total = da.ones((100, 100), chunks=30).rechunk(40).sum().compute()
print(int(total), "distributed" in sys.modules)
"""


def _child(code: str, *args: str) -> list[str]:
    """The stdout words of ``code`` run in a fresh process, without the DASK_ settings of this
    one (a scheduler chosen there would be looked up by name)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    child = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                           text=True, timeout=600, env={**env, "PYTHONPATH": str(ROOT)})
    assert child.returncode == 0, child.stderr[-2000:]
    return child.stdout.split()


@pytest.mark.parametrize("chunks", [0, 256], ids=["in_memory", "chunked"])
def test_run_detect_on_threads_does_not_import_distributed(pair, tmp_path, chunks):
    """A run in a fresh process (as `sitewatch detect`), in memory or chunked, computes on
    Dask's threaded scheduler without dask importing dask.distributed to look for a Client
    (none can be active without it; importing it took 0.77 s here): the scheduler is named
    by its function, and no Dask array goes into a delayed call."""
    run_dir, imported = _child(_CHILD_RUN, *map(str, pair), str(tmp_path), str(chunks))
    assert imported == "False"
    assert json.loads((Path(run_dir) / "changes.geojson").read_text())["features"]


def test_rechunk_in_a_run_does_not_import_distributed():
    """A rechunk with no method configured made dask import distributed to look for a
    Client; the run configures "tasks", dask's choice without one."""
    assert _child(_CHILD_RECHUNK) == ["10000", "False"]


def test_threaded_scheduler_is_named_only_when_no_client_can_be_active(monkeypatch):
    """The threaded scheduler is named by its function (and the rechunk method "tasks", unless
    one is configured) for no choice or "threads" while distributed is not imported; any
    other choice, or distributed imported, is left as is; the setting is undone after."""
    import concurrent.futures

    import dask
    import dask.threaded
    import distributed  # noqa: F401  (imported: a Client could be active)

    unset = {"scheduler": None, "array.rechunk.method": None}
    with dask.config.set(unset):  # whatever this process's own dask settings
        with run._threaded_scheduler():
            assert dask.config.get("scheduler", None) is None
            assert dask.config.get("array.rechunk.method", None) is None
        monkeypatch.delitem(sys.modules, "distributed")
        with run._threaded_scheduler():
            assert dask.config.get("scheduler") is dask.threaded.get
            assert dask.config.get("array.rechunk.method") == "tasks"
        assert dask.config.get("scheduler", None) is None
        assert dask.config.get("array.rechunk.method", None) is None
        with dask.config.set({"array.rechunk.method": "p2p"}), run._threaded_scheduler():
            assert dask.config.get("array.rechunk.method") == "p2p"
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            for chosen, kept in (("threads", dask.threaded.get),
                                 ("threading", dask.threaded.get), ("sync", "sync"),
                                 ("processes", "processes"), (dask.local.get_sync,
                                                              dask.local.get_sync),
                                 (pool, pool)):
                with dask.config.set(scheduler=chosen), run._threaded_scheduler():
                    assert dask.config.get("scheduler") == kept


def test_threaded_scheduler_of_overlapping_runs_is_undone_by_the_last(monkeypatch):
    """Runs overlapping in threads share the setting: the first to start makes it, the last
    to end undoes it, whatever the order they end in."""
    import dask
    import dask.threaded

    monkeypatch.delitem(sys.modules, "distributed", raising=False)
    setting = run._SchedulerSetting()
    with dask.config.set({"scheduler": None, "array.rechunk.method": None}):
        first, second = setting(), setting()
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)  # the first ends before the second
        assert dask.config.get("scheduler") is dask.threaded.get
        second.__exit__(None, None, None)
        assert dask.config.get("scheduler", None) is None
        assert dask.config.get("array.rechunk.method", None) is None
