"""The opt-in network in a detect run (``[buildings] model = "cnn"``, ``--building-model``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from _helpers import SHARED_DATA, write_geotiff
from affine import Affine
from click.testing import CliRunner
from numpy.testing import assert_array_equal
from rasterio.warp import transform_bounds

from pipeline.aoi import parse_aoi
from pipeline.cli import cli
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.fetch.local import chunk_origin
from pipeline.model import DetectParams, params_hash
from pipeline.run import run_detect

UTM = "EPSG:32614"  # LEVIR-CD is in Texas; the pixels are placed on a made-up UTM grid
ORIGIN = (600000.0, 3400000.0)
CNN = {"buildings.model": "cnn"}


def _levir(kind: str, name: str, rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]:
    """Both dates of a LEVIR-CD image (uint8), or skip without the shared data."""
    from pipeline.datasets import _read_png

    folder = SHARED_DATA / kind
    paths = [folder / d / f"{name}.png" for d in ("A", "B")]
    if not all(p.exists() for p in paths):
        pytest.skip(f"no LEVIR-CD image {name} under {folder}")
    return tuple(_read_png(p)[:, rows, cols].astype(np.uint8) for p in paths)


def _write_pair(folder: Path, pair: tuple[np.ndarray, np.ndarray], res_m: float = 0.5
                ) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    transform = Affine(res_m, 0, ORIGIN[0], 0, -res_m, ORIGIN[1])
    return tuple(write_geotiff(folder / f"{role}_{day}.tif", data, crs=UTM, transform=transform,
                               nodata=None)
                 for role, day, data in zip(("before", "after"), ("2012-03-01", "2016-05-01"),
                                            pair, strict=True))


def _aoi_of(path: Path):
    with rasterio.open(path) as src:
        lonlat = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    return parse_aoi(",".join(f"{v:.6f}" for v in lonlat))


def _outputs(run_dir: Path) -> tuple[np.ndarray, list[dict], dict]:
    with rasterio.open(run_dir / "change_mask.tif") as ds:
        mask = ds.read(1)
    features = json.loads((run_dir / "changes.geojson").read_text())["features"]
    return mask, features, json.loads((run_dir / "manifest.json").read_text())


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """One BLAS thread for the direct network calls, as detect_scenes sets for its own."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def crop_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A real 256 x 256 LEVIR-CD crop (0.5 m, a quarter of it new buildings) as GeoTIFFs."""
    pair = _levir("levir_cd", "test_2_0000_0000", slice(None), slice(None))
    return _write_pair(tmp_path_factory.mktemp("crop"), pair)


@pytest.fixture(scope="module")
def cnn_run(crop_pair, tmp_path_factory):
    """The crop run in memory with the network, co-registration off (raw after)."""
    config = load_config(overrides={**CNN, "coreg.enabled": False})
    out = tmp_path_factory.mktemp("cnn")
    return run_detect(_aoi_of(crop_pair[0]), *crop_pair, config=config, out_root=out,
                      chunks=None), config


def _direct_mask(crop_pair, config, *, flips: bool):
    """The run's grid, and predict_change_cnn + the card's rule on it (probability too)."""
    from pipeline.detect.convnet import predict_change_cnn
    from pipeline.detect.learned import change_probability_mask
    from pipeline.inputs import mask_outside
    from pipeline.models import load_cnn
    from pipeline.run import read_local_pair

    aoi = _aoi_of(crop_pair[0])
    plan, before, after = read_local_pair(aoi, *crop_pair, config=config, chunks=None)
    a, b = (mask_outside(s.data, aoi, plan).values for s in (before, after))
    model = load_cnn()
    prob = predict_change_cnn(a, b, weights=model.weights, flips=flips)
    mask = change_probability_mask(prob, threshold=model.threshold,
                                   min_area_px=model.min_area_at(plan.res_m),
                                   smooth_sigma_px=model.smooth_sigma_px)
    return plan, prob, mask


def test_detect_cnn_mask_equals_direct_network(crop_pair, cnn_run):
    """The written mask is predict_change_cnn (four mirrorings, the default) + the card's
    rule on the run's grid."""
    result, config = cnn_run
    plan, prob, want = _direct_mask(crop_pair, config, flips=True)
    assert plan == result.grid
    mask, _, _ = _outputs(result.run_dir)
    assert_array_equal(mask == 1, want)
    assert_array_equal(mask == 255, np.isnan(prob))
    assert 0.05 < want.mean() < 0.5  # the crop's new buildings are found


def test_detect_cnn_one_pass_when_mirrorings_off(crop_pair, cnn_run, tmp_path):
    """``buildings.mirrorings = false``: the mask of one pass of the network (another mask
    than the default's), recorded as such in the manifest and the parameters."""
    config = load_config(overrides={**CNN, "coreg.enabled": False,
                                    "buildings.mirrorings": False})
    result = run_detect(_aoi_of(crop_pair[0]), *crop_pair, config=config, out_root=tmp_path,
                        chunks=None)
    _, _, want = _direct_mask(crop_pair, config, flips=False)
    mask, _, manifest = _outputs(result.run_dir)
    assert_array_equal(mask == 1, want)
    default_mask, _, default_manifest = _outputs(cnn_run[0].run_dir)
    assert not np.array_equal(mask, default_mask)
    change = next(s for s in manifest["steps"] if s["name"] == "change")
    assert change["details"]["building_model"]["flips"] is False
    assert manifest["params"]["buildings"]["mirrorings"] is False
    assert manifest["params_hash"] != default_manifest["params_hash"]


def test_detect_cnn_records_model_and_method(cnn_run):
    """Manifest: model file, SHA-256 (the card's) and rule; features: found_by cnn."""
    from pipeline.models import load_cnn

    result, _ = cnn_run
    card = load_cnn().card
    _, features, manifest = _outputs(result.run_dir)
    change = next(s for s in manifest["steps"] if s["name"] == "change")
    used = change["details"]["building_model"]
    assert used["model_file"] == "building_change_cnn.npz"
    assert used["model_sha256"] == card["model_sha256"]
    assert used["decision_rule"] == card["decision_rule"] and used["flips"] is True
    assert used["threshold"] == 0.5 and used["min_area_px"] == 40  # 10 m2 at 0.5 m
    assert change["params"]["buildings"] == {"model": "cnn", "max_res_m": 1.5,
                                             "mirrorings": True}
    assert manifest["params"]["buildings"]["model"] == "cnn"
    assert manifest["params_hash"] != params_hash(DetectParams())
    buildings = [f["properties"] for f in features if f["properties"]["kind"] == "new_building"]
    assert buildings
    for props in buildings:
        assert props["found_by"] == "cnn"
        assert props["model_sha256"] == card["model_sha256"]
        assert card["model_sha256"] in props["method"]


def test_detect_default_has_no_network_trace(crop_pair, cnn_run, tmp_path):
    """Off (the default): no network in params, hash, manifest or features; another mask."""
    result = run_detect(_aoi_of(crop_pair[0]), *crop_pair,
                        config=load_config(overrides={"coreg.enabled": False}),
                        out_root=tmp_path, chunks=None)
    mask, features, manifest = _outputs(result.run_dir)
    assert "buildings" not in DetectParams().to_dict()
    assert "buildings" not in manifest["params"]
    change = next(s for s in manifest["steps"] if s["name"] == "change")
    assert "building_model" not in change["details"] and "buildings" not in change["params"]
    assert not any("found_by" in f["properties"] for f in features)
    assert all("U-Net" not in f["properties"]["method"] for f in features)
    cnn_mask, _, _ = _outputs(cnn_run[0].run_dir)
    assert not np.array_equal(mask, cnn_mask)


def test_default_params_hash_is_that_of_the_sections_before_buildings():
    """The default's hash is computed from the six sections it had before the option."""
    import dataclasses
    import hashlib

    p = DetectParams()
    old = {f.name: dataclasses.asdict(getattr(p, f.name)) for f in dataclasses.fields(p)
           if f.name != "buildings"}
    want = hashlib.sha256(json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()
    assert params_hash(p) == want[:16]
    on = dataclasses.replace(p, buildings=dataclasses.replace(p.buildings, model="cnn"))
    assert params_hash(on) != params_hash(p)


def test_detect_cnn_chunked_equals_in_memory(tmp_path):
    """A chunked run (2 x 2 blocks of about 512, the network's tiles) gives the in-memory
    evidence."""
    pair = _levir("levir_cd_tiles", "levircd_test_5", slice(320, 1024), slice(320, 1024))
    paths = _write_pair(tmp_path / "in", pair)
    aoi, config = _aoi_of(paths[0]), load_config(overrides=CNN)
    eager = run_detect(aoi, *paths, config=config, out_root=tmp_path / "eager", chunks=None)
    lazy = run_detect(aoi, *paths, config=config, out_root=tmp_path / "lazy", chunks=512)
    # blocks of 512 from the files' tile borders (both on the grid)
    origin = chunk_origin([str(p) for p in paths], lazy.grid, 512)
    assert lazy.steps[0]["details"]["chunks"] == [512 + o for o in origin]
    assert min(eager.grid.shape) > 512 + 64  # the last blocks are more than the margin
    assert eager.coreg == lazy.coreg
    e_mask, e_features, e_manifest = _outputs(eager.run_dir)
    z_mask, z_features, z_manifest = _outputs(lazy.run_dir)
    assert_array_equal(z_mask, e_mask)
    assert (e_mask == 1).any()
    changed = [next(s for s in m["steps"] if s["name"] == "change")["details"]["changed_share"]
               for m in (e_manifest, z_manifest)]
    assert changed[0] == changed[1] > 0
    strip = ("run_id",)
    keys = [[{k: v for k, v in f["properties"].items() if k not in strip} for f in fs]
            for fs in (e_features, z_features)]
    assert [f["id"] for f in e_features] == [f["id"] for f in z_features]
    for e, z in zip(*keys, strict=True):
        assert e.keys() == z.keys()
        for k in e:
            if isinstance(e[k], float):
                assert z[k] == pytest.approx(e[k], rel=1e-6, abs=1e-9), (e["id"], k)
            else:
                assert z[k] == e[k], (e["id"], k)


def test_detect_cnn_refuses_coarse_grid(tmp_path):
    """At 2 m the network is refused before any work, with the fix; nothing is written."""
    pair = _levir("levir_cd", "test_2_0000_0000", slice(None), slice(None))
    paths = _write_pair(tmp_path / "in", pair, res_m=2.0)
    with pytest.raises(ConfigError, match=r"1\.5 m or finer.*working grid is 2 m"):
        run_detect(_aoi_of(paths[0]), *paths, config=load_config(overrides=CNN),
                   out_root=tmp_path / "out")
    assert not list((tmp_path / "out").glob("*/*"))


def test_detect_cnn_refuses_four_bands(tmp_path):
    """Four-band images are not the network's red-green-blue: refused, with the fix."""
    pair = _levir("levir_cd", "test_2_0000_0000", slice(None), slice(None))
    (tmp_path / "in").mkdir()
    paths = []
    for role, day, data in zip(("before", "after"), ("2012-03-01", "2016-05-01"), pair,
                               strict=True):
        paths.append(tmp_path / "in" / f"{role}_{day}.tif")
        # four grey bands (not red, green, blue and alpha, as GDAL reads 4 bands by default)
        with rasterio.open(paths[-1], "w", driver="GTiff", width=256, height=256, count=4,
                           dtype="uint8", crs=UTM, photometric="MINISBLACK",
                           transform=Affine(0.5, 0, ORIGIN[0], 0, -0.5, ORIGIN[1])) as ds:
            ds.write(np.concatenate([data, data[:1]]))
    with pytest.raises(ConfigError, match="red-green-blue.*these have 4"):
        run_detect(_aoi_of(paths[0]), *paths, config=load_config(overrides=CNN),
                   out_root=tmp_path / "out")


def test_cli_building_model_flag(crop_pair, tmp_path):
    """--building-model cnn runs the network; on the 10 m default pair it exits 1 cleanly."""
    with rasterio.open(crop_pair[0]) as src:
        lonlat = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    args = ["detect", "--aoi", ",".join(f"{v:.6f}" for v in lonlat), "--before",
            str(crop_pair[0]), "--after", str(crop_pair[1]), "--out", str(tmp_path), "-q"]
    result = CliRunner().invoke(cli, [*args, "--building-model", "cnn"])
    assert result.exit_code == 0, result.output
    (run_dir,) = [p for p in tmp_path.glob("*/*") if p.is_dir()]
    _, features, manifest = _outputs(run_dir)
    assert manifest["params"]["buildings"]["model"] == "cnn"
    assert any(f["properties"].get("found_by") == "cnn" for f in features)
    coarse = CliRunner().invoke(cli, ["detect", "--out", str(tmp_path / "s2"), "-q",
                                      "--building-model", "cnn"])
    assert coarse.exit_code == 1
    assert "1.5 m or finer" in coarse.output and "Traceback" not in coarse.output
    bad = CliRunner().invoke(cli, [*args, "--building-model", "unet"])
    assert bad.exit_code == 2 and "--building-model" in bad.output
