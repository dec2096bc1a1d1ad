"""Tests for pipeline.config: defaults, overrides, and errors that name the key."""

from __future__ import annotations

import pytest

from pipeline.acquire import fetch_context
from pipeline.config import load_config, load_sources
from pipeline.errors import ConfigError
from pipeline.model import DetectParams, params_hash


def test_load_config_default_matches_dataclass_defaults():
    """configs/default.toml states the same values as the code's defaults."""
    cfg = load_config()
    assert cfg.params == DetectParams()
    assert cfg.res_m is None and cfg.radius_m == 1000.0
    assert cfg.sites_path.name == "sites.geojson" and cfg.sites_path.exists()


def test_load_config_overrides_win(tmp_path):
    """Command-line overrides beat the file; None overrides are skipped."""
    path = tmp_path / "c.toml"
    path.write_text("[change]\nthreshold_method = 'kittler'\nthreshold = 12.5\n")
    cfg = load_config(path, overrides={"change.threshold": 30.0, "grid.res_m": None})
    assert cfg.params.change.threshold == 30.0
    assert cfg.params.change.threshold_method == "kittler"
    assert cfg.to_dict()["change"]["threshold"] == 30.0


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("[change]\nthreshhold = 3\n", "change.threshhold: unknown key. Did you mean 'threshold'"),
        ("[change]\nthreshold_method = 'mean'\n", "change.threshold_method: expected one of"),
        ("[coreg]\nmax_shift_px = 'big'\n", "coreg.max_shift_px: expected a number"),
        ("[objects]\ncompound_min_fill = 1.5\n", "objects.compound_min_fill: expected 0 <= x <= 1"),
        ("[change]\nthreshold = -1\n", "change.threshold: expected a positive number"),
        ("[grid]\nres_m = -2\n", "grid.res_m"),
        ("[aoi]\nradius_m = 0\n", "aoi.radius_m"),
        ("[colour]\nx = 1\n", "colour: unknown section"),
        ("[change\n", "not valid TOML"),
        ("[objects]\nscore_weights = [1, 2]\n", "objects.score_weights"),
        # kernels that asked numpy for terabytes (a MemoryError traceback mid-run)
        ("[change]\nsmooth_sigma_px = 1e12\n", "change.smooth_sigma_px: expected at most 50"),
        ("[change]\nopening_radius_px = 100000\n", "change.opening_radius_px: expected at most"),
        ("[objects]\nsite_sigma_m = 1e12\n", "objects.site_sigma_m: expected at most 10000"),
        ("[objects]\ncell_m = 1e9\n", "objects.cell_m: expected at most 1000"),
        ("[coreg]\nupsample_factor = 1000000000\n", "coreg.upsample_factor: expected at most"),
        ("[objects]\nmin_texture_gain = -1\n", "objects.min_texture_gain: expected a gain"),
        ("[coreg]\nupsample_factor = 0\n", "coreg.upsample_factor: expected a whole number"),
    ],
)
def test_load_config_errors_name_the_key(tmp_path, text, phrase):
    """Each bad value is a ConfigError whose message names the key path."""
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=phrase.replace("(", r"\(").replace(".", r"\.")):
        load_config(path)


def test_load_config_missing_file(tmp_path):
    """A missing config file says which path and what to do."""
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_load_config_folder_or_env_named_as_such(tmp_path, monkeypatch):
    """A folder (or pipe) is 'not a regular file', not 'does not exist'; a bad
    $SITEWATCH_CONFIG is named as the thing to fix, not --config."""
    with pytest.raises(ConfigError, match="is not a regular file.*Pass --config"):
        load_config(tmp_path)
    monkeypatch.setenv("SITEWATCH_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match=r"does not exist\. Set \$SITEWATCH_CONFIG"):
        load_config()


def test_load_sources_rejects_non_http_and_missing_keys(tmp_path):
    """Sources need their type's keys and http(s) URLs only."""
    path = tmp_path / "s.toml"
    path.write_text("[sources.a]\ntype = 'stac'\nurl = 'file:///etc/passwd'\ncollection = 'x'\n")
    with pytest.raises(ConfigError, match="only http:// and https://"):
        load_sources(path)
    path.write_text("[sources.a]\ntype = 'xyz'\n")
    with pytest.raises(ConfigError, match="sources.a.url: required"):
        load_sources(path)
    path.write_text("[sources.a]\ntype = 'ftp'\n")
    with pytest.raises(ConfigError, match="sources.a.type"):
        load_sources(path)


def test_load_config_wall_tower_grade_sections(tmp_path):
    """[walls], [towers] and [grade] load into DetectParams; overrides win; the hash moves."""
    path = tmp_path / "c.toml"
    path.write_text("[walls]\nmin_length_m = 40.0\n[towers]\nmax_size_m = 10.0\n"
                    "[grade]\nmin_towers = 3\n")
    cfg = load_config(path, overrides={"grade.min_closure_ratio": 0.7})
    p = cfg.params
    assert (p.walls.min_length_m, p.towers.max_size_m, p.grade.min_towers) == (40.0, 10.0, 3)
    assert p.grade.min_closure_ratio == 0.7 and p.walls.gap_m == DetectParams().walls.gap_m
    assert cfg.to_dict()["walls"]["min_length_m"] == 40.0
    assert cfg.to_dict()["grade"]["min_towers"] == 3
    assert params_hash(p) != params_hash(DetectParams())


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("[walls]\nmin_lenght_m = 3\n", "walls.min_lenght_m: unknown key. Did you mean "
                                        "'min_length_m'"),
        ("[towers]\nmin_size_m = -1\n", "towers.min_size_m: expected a value >= 0"),
        ("[grade]\nmin_closure_ratio = 1.5\n", "grade.min_closure_ratio: expected 0 <= x <= 1"),
        ("[grade]\nmin_towers = 2.5\n", "grade.min_towers: expected a whole number"),
        ("[walls]\nwork_res_m = 0\n", "walls.work_res_m: expected a positive number"),
        ("[grade]\nmax_wall_res_m = 5.0\n", "grade.max_wall_res_m: 5.0 is coarser than "
                                            "walls.max_res_m"),
        ("[towers]\nmax_res_m = 0.5\n", "grade.max_tower_res_m: 1.0 is coarser than "
                                        "towers.max_res_m"),
    ],
)
def test_load_config_detector_errors_name_the_key(tmp_path, text, phrase):
    """Bad wall, tower and grade settings are ConfigErrors naming the key path."""
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=phrase.replace(".", r"\.").replace("(", r"\(")):
        load_config(path)


def test_load_config_fetch_deadline(tmp_path):
    """[fetch] deadline_s is read and checked; left out, it is 4 x timeout_s (manifest too)."""
    assert load_config().deadline_s == 4 * load_config().timeout_s
    path = tmp_path / "c.toml"
    path.write_text("[fetch]\ntimeout_s = 10.0\n")
    cfg = load_config(path)
    assert cfg.deadline_s is None and cfg.to_dict()["fetch"]["deadline_s"] == 40.0
    assert fetch_context(cfg).request_deadline_s == 40.0
    path.write_text("[fetch]\ntimeout_s = 10.0\ndeadline_s = 300\n")
    assert fetch_context(load_config(path)).request_deadline_s == 300.0
    path.write_text("[fetch]\ndeadline_s = 0\n")
    with pytest.raises(ConfigError, match="fetch.deadline_s: expected a positive number"):
        load_config(path)
