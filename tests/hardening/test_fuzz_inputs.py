"""Property-based tests: random and malformed AOI strings, site files and configs.

Each input ends in a result or a PipelineError (CLI: exit 1 or 2 with a one-paragraph
message), never another exception. Runs are derandomized so CI sees the same examples.
"""

from __future__ import annotations

import json
import re
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hardening._inputs import assert_clean_outcome, detect_args, invoke
from pipeline.aoi import MAX_GRID_PX, MIN_GRID_SIDE_PX, load_sites, parse_aoi, plan_grid
from pipeline.cli import SEED_BEFORE
from pipeline.config import PROJECT_ROOT, RunConfig, load_config, load_sources
from pipeline.errors import GridError, PipelineError
from pipeline.watch.sites import load_watch_sites

SAFE_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
FUZZ = settings(derandomize=True, max_examples=60, deadline=2000,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
NASTY_NAMES = ["../../x", "..", ".", "/etc/passwd", "a/../../b", "x; rm -rf ~", "$(touch y)",
               "`id`", "name\x00nul", "C:\\Windows\\x", "~root", "-rf", " ", "\u202eevil",
               "CON", "a" * 300, "日本語", "..\\..\\x", "'quoted'", "line\nbreak"]

# ---------------------------------------------------------------- AOI strings

_numbers = st.one_of(st.floats(), st.integers(-10**20, 10**20), st.sampled_from(
    ["nan", "inf", "-inf", "1e999", "0x10", "1_000", " 88.3 ", "", "--1", "٣"]))
aoi_texts = st.one_of(
    st.text(max_size=60),
    st.sampled_from(NASTY_NAMES),
    st.lists(_numbers, max_size=6).map(lambda xs: ",".join(str(x) for x in xs)),
    st.tuples(st.floats(-200, 200), st.floats(-100, 100)).map(lambda p: f"{p[0]},{p[1]}"),
)


def _assert_safe_id(ident: str) -> None:
    assert SAFE_ID.match(ident) and ".." not in ident and len(ident) <= 120, ident


@FUZZ
@given(text=aoi_texts, radius=st.one_of(st.floats(), st.integers(-5, 200_000)))
def test_parse_aoi_result_or_aoierror(text: str, radius: float) -> None:
    """parse_aoi returns an Aoi with a safe folder id, or raises a PipelineError."""
    try:
        aoi = parse_aoi(text, radius_m=radius)
    except PipelineError as e:
        assert str(e).strip() and "\n" not in str(e).strip("\n")
        return
    _assert_safe_id(aoi.id)
    assert aoi.geometry.is_valid and not aoi.geometry.is_empty


@settings(derandomize=True, max_examples=25, deadline=5000,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=aoi_texts.filter(lambda t: "\x00" not in t))
def test_cli_aoi_fuzz_clean_exit(text: str, tmp_path: Path) -> None:
    """`detect --aoi TEXT` with missing images: every AOI ends in exit 1/2 and a message."""
    missing = tmp_path / "missing.tif"
    result = invoke(["detect", "--aoi", text, "--before", str(missing), "--after", str(missing),
                     "--out", str(tmp_path / "out"), "-q"])
    assert_clean_outcome(result, allow_success=False)
    assert not list((tmp_path / "out").glob("*/*"))


# ---------------------------------------------------------------- site files

_coord = st.one_of(st.floats(-200, 200), st.floats(), st.sampled_from([88.29, 43.38]))
_ring = st.lists(st.lists(_coord, min_size=2, max_size=3), min_size=0, max_size=6)
_geometry = st.one_of(
    st.none(),
    st.builds(lambda c: {"type": "Point", "coordinates": c}, st.lists(_coord, max_size=3)),
    st.builds(lambda r: {"type": "Polygon", "coordinates": [r]}, _ring),
    st.builds(lambda r: {"type": "LineString", "coordinates": r}, _ring),
    st.just({"type": "Polygon", "coordinates": [[[88.28, 43.37], [88.30, 43.37],
                                                  [88.30, 43.39], [88.28, 43.37]]]}),
    st.just({"type": "Point", "coordinates": [88.29, 43.38]}),
    st.just({"type": "GeometryCollection", "geometries": []}),
    st.just({"type": "Bogus"}),
)
_value = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                   st.floats(allow_nan=False), st.text(max_size=12),
                   st.sampled_from(["P30D", "P0D", "P-1D", "2017-01-01/2017-12-31", "x/y",
                                    "esri-wayback", "earth-search", "nope"]))
_props = st.fixed_dictionaries(
    {},
    optional={"name": st.one_of(st.sampled_from(NASTY_NAMES), st.text(max_size=20), _value),
              "radius_m": _value, "every": _value, "before": _value,
              "sources": st.one_of(_value, st.lists(_value, max_size=3)), "notes": _value})
_feature = st.builds(lambda g, p: {"type": "Feature", "geometry": g, "properties": p},
                     _geometry, _props)


def _site_text(features: list[dict[str, Any]], mangle: int) -> str:
    text = json.dumps({"type": "FeatureCollection", "features": features})
    if mangle == 1:
        return text[: len(text) // 2]  # truncated
    if mangle == 2:
        return json.dumps(features)  # a bare list
    return text


@FUZZ
@given(features=st.lists(_feature, max_size=4), mangle=st.integers(0, 5))
def test_site_file_fuzz(features: list[dict[str, Any]], mangle: int, tmp_path: Path) -> None:
    """load_sites and the watch loader: sites with safe folder ids, or a PipelineError."""
    path = tmp_path / "sites.geojson"
    path.write_text(_site_text(features, mangle), encoding="utf-8")
    try:
        sites = load_sites(path)
    except PipelineError:
        sites = None
    if sites is not None:
        for aoi in sites.values():
            _assert_safe_id(aoi.id)
            assert (tmp_path / aoi.id).resolve().parent == tmp_path.resolve()
    invalid: list[str] = []
    try:
        watched = load_watch_sites(path, sources=_SOURCES, invalid=invalid)
    except PipelineError:
        return
    assert all(SAFE_ID.match(site.id) for site in watched)
    assert all(isinstance(m, str) and m for m in invalid)


_SOURCES = load_sources()


@pytest.mark.parametrize("name", NASTY_NAMES)
def test_site_names_become_safe_folders(name: str, tmp_path: Path) -> None:
    """A hostile site name keeps its label but gets a folder id inside OUT."""
    path = tmp_path / "sites.geojson"
    feature = {"type": "Feature", "properties": {"name": name, "radius_m": 500},
               "geometry": {"type": "Point", "coordinates": [88.29, 43.38]}}
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    try:
        sites = load_sites(path)
    except PipelineError as e:  # a blank name is refused by name
        assert not name.strip(), e
        return
    (aoi,) = sites.values()
    assert aoi.label == name.split("\x00")[0]  # GDAL ends a text field at NUL
    _assert_safe_id(aoi.id)
    assert (tmp_path / aoi.id).resolve().parent == tmp_path.resolve()


def _gpkg(path: Path, *, layers: int = 1, crs: str | None = "EPSG:4326",
          name: str = "../../x") -> Path:
    import geopandas
    from shapely.geometry import Point

    for i in range(layers):
        frame = geopandas.GeoDataFrame({"name": [f"{name}{i or ''}"], "radius_m": [300.0]},
                                       geometry=[Point(88.29, 43.38)], crs=crs)
        frame.to_file(path, layer=f"layer{i}", driver="GPKG")
    return path


@pytest.mark.parametrize("case", ["ok", "two_layers", "no_crs", "truncated", "text", "empty"])
def test_geopackage_site_files(case: str, tmp_path: Path) -> None:
    """GeoPackage site files: a good one loads with a safe id; broken ones raise by name."""
    path = tmp_path / "sites.gpkg"
    if case in ("ok", "two_layers", "no_crs", "truncated"):
        _gpkg(path, layers=2 if case == "two_layers" else 1,
              crs=None if case == "no_crs" else "EPSG:4326")
    if case == "truncated":
        path.write_bytes(path.read_bytes()[:2048])
    elif case == "text":
        path.write_text("SQLite format 3 but not really")
    elif case == "empty":
        path.write_bytes(b"")
    if case == "ok":
        (aoi,) = load_sites(path).values()
        _assert_safe_id(aoi.id)
        return
    expected = {"two_layers": "layers", "no_crs": "coordinate reference system"}
    with pytest.raises(PipelineError, match=expected.get(case, "not a vector file")):
        load_sites(path)


@pytest.mark.parametrize("content", [b"", b"{", b"\xff\xfe\x00garbage", b'{"type": "Feature"}',
                                     b"[1, 2, 3]", b"null"])
def test_cli_watch_bad_site_file(content: bytes, tmp_path: Path) -> None:
    """`watch --sites BAD --offline`: exit 2 with one message, no traceback, nothing written."""
    path = tmp_path / "sites.geojson"
    path.write_bytes(content)
    out = tmp_path / "out"
    result = invoke(["watch", "--sites", str(path), "--out", str(out), "--offline", "-q"])
    assert_clean_outcome(result, allow_success=False)
    assert result.exit_code == 2, result.output
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------- config TOML

_DEFAULT = tomllib.loads((PROJECT_ROOT / "configs" / "default.toml").read_text())
_KEYS = [(s, k) for s, table in _DEFAULT.items() if isinstance(table, dict) for k in table]
_toml_value = st.one_of(
    st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(), st.text(max_size=15),
    st.sampled_from(["", "\x00", "../../etc", "~nouser/x", "a" * 5000, "otsu", "none"]),
    st.lists(st.one_of(st.integers(-5, 5), st.floats(-2, 2)), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    st.dates(),
)


@st.composite
def _configs(draw: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(_DEFAULT, default=str))
    for _ in range(draw(st.integers(1, 4))):
        section, key = draw(st.sampled_from(_KEYS))
        data[section][key] = draw(_toml_value)
    if draw(st.integers(0, 9)) == 0:
        data[draw(st.text(min_size=1, max_size=6))] = {"x": 1}
    if draw(st.integers(0, 9)) == 0:
        data["change"] = draw(_toml_value)
    return data


@FUZZ
@given(data=_configs())
def test_config_fuzz(data: dict[str, Any], tmp_path: Path) -> None:
    """load_config returns a RunConfig or raises ConfigError, whatever the values."""
    path = tmp_path / "config.toml"
    path.write_bytes(tomli_w.dumps(data).encode())
    try:
        config = load_config(path)
    except PipelineError as e:
        assert str(e).strip()
        return
    assert isinstance(config, RunConfig)


@FUZZ
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                     st.sampled_from([b"[grid]\nres_m = ", b"[[grid]]\n", b"grid = 3\n",
                                      b"[aoi]\nsites = '\x00'\n", b'[aoi]\nsites = "\\u0000"\n',
                                      b"[fetch]\ncache_dir = 5\n", b"\xef\xbb\xbf[grid]\n"])))
def test_config_bytes_fuzz(raw: bytes, tmp_path: Path) -> None:
    """Arbitrary bytes as a config: ConfigError (not TOML, bad key) or a RunConfig."""
    path = tmp_path / "config.toml"
    path.write_bytes(raw)
    try:
        load_config(path)
    except PipelineError as e:
        assert str(e).strip()


@settings(derandomize=True, max_examples=15, deadline=5000,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_configs())
def test_cli_config_fuzz(data: dict[str, Any], tmp_path: Path) -> None:
    """`detect --config FUZZ` with missing images ends in exit 1/2 with a message."""
    path = tmp_path / "config.toml"
    path.write_bytes(tomli_w.dumps(data).encode())
    missing = tmp_path / "missing.tif"
    result = invoke(["detect", "--config", str(path), "--aoi", "88.29,43.38", "--before",
                     str(missing), "--after", str(missing), "--out", str(tmp_path / "o"), "-q"])
    assert_clean_outcome(result, allow_success=False)


@FUZZ
@given(radius=st.floats(1, 100_000), res=st.floats(0.01, 5000))
def test_plan_grid_is_bounded_or_refused(radius: float, res: float) -> None:
    """Any AOI and resolution plan a grid of at most MAX_GRID_PX pixels and at least
    MIN_GRID_SIDE_PX across, or raise GridError naming the fix."""
    aoi = parse_aoi("88.29,43.38", radius_m=radius)
    try:
        plan = plan_grid(aoi, res)
    except GridError as e:
        assert ("Gpx" in str(e) and "coarser --res-m" in str(e)) or "finer resolution" in str(e)
        return
    assert 0 < plan.width * plan.height <= MAX_GRID_PX
    assert min(plan.width, plan.height) >= MIN_GRID_SIDE_PX


def test_cli_huge_grid_refused_before_reading(tmp_path: Path) -> None:
    """A 100 km radius at 0.1 m (4 x 10^12 px) is refused at once, not run for days."""
    result = invoke(["detect", "--aoi", "88.29,43.38", "--radius-m", "100000", "--res-m", "0.1",
                     "--out", str(tmp_path / "out"), "-q"])
    assert_clean_outcome(result, allow_success=False)
    assert result.exit_code == 1 and "Gpx" in result.output, result.output


@pytest.mark.parametrize("res_m", ["1e300", "100"])
def test_cli_grid_coarser_than_the_aoi_refused(res_m: str, tmp_path: Path) -> None:
    """A --res-m coarser than the AOI is refused naming the finest that works: 1e300 was a GEOS
    traceback, 100 m (a 305 m AOI) a co-registration error about pixels that do not overlap."""
    result = invoke(detect_args(SEED_BEFORE, tmp_path / "out") + ["--res-m", res_m])
    assert_clean_outcome(result, allow_success=False)
    assert result.exit_code == 1 and "at most 38.1 m" in result.output, result.output


_option_numbers = st.one_of(st.floats(), st.integers(-10**30, 10**30),
                            st.sampled_from(["nan", "-inf", "1e400", "0", "-0", "", "abc"]))


@settings(derandomize=True, max_examples=25, deadline=5000,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(option=st.sampled_from(["--radius-m", "--res-m", "--threshold"]), value=_option_numbers,
       date=st.one_of(st.none(), st.text(max_size=12), st.sampled_from(
           ["2017-02-30", "0000-01-01", "2017-03-02/2017-01-01", "9999-12-31"])))
def test_cli_numeric_options_fuzz(option: str, value: Any, date: str | None,
                                  tmp_path: Path) -> None:
    """Odd numbers for --radius-m/--res-m/--threshold and odd dates end in exit 1/2."""
    missing = tmp_path / "missing.tif"
    args = ["detect", "--aoi", "88.29,43.38", option, str(value), "--before", str(missing),
            "--after", str(missing), "--out", str(tmp_path / "o"), "-q"]
    if date is not None:
        args += ["--before-date", date]
    assert_clean_outcome(invoke(args), allow_success=False)


_DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("command", ["validate", "verify", "config", "aoi", "watch"])
def test_deeply_nested_input_is_a_clean_error(command: str, tmp_path: Path) -> None:
    """JSON/TOML nested 100000 deep (a RecursionError in the parsers) ends in a message."""
    feature = ('{"type":"FeatureCollection","features":[{"type":"Feature","properties":'
               '{"name":"a","x":' + _DEEP + '},"geometry":{"type":"Point","coordinates":'
               '[88.29,43.38]}}]}')
    if command == "validate":
        (tmp_path / "a.json").write_text(_DEEP)
        args = ["validate", str(tmp_path / "a.json")]
    elif command == "verify":
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "manifest.json").write_text(_DEEP)
        args = ["verify", str(tmp_path / "run")]
    elif command == "config":
        (tmp_path / "c.toml").write_text("a = " + _DEEP)
        args = ["detect", "--config", str(tmp_path / "c.toml"), "-q"]
    else:
        (tmp_path / "s.geojson").write_text(feature)
        args = (["detect", "--aoi", str(tmp_path / "s.geojson"), "-q"] if command == "aoi" else
                ["watch", "--sites", str(tmp_path / "s.geojson"), "--offline",
                 "--out", str(tmp_path / "o"), "-q"])
    result = invoke(args)
    if command == "verify":  # verify reports problems on stdout, one per line, and exits 1
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert result.exit_code == 1 and "cannot be read as a manifest" in result.output
        return
    assert_clean_outcome(result, allow_success=False)


_CSV_HEADER = "Number,Name_Code,Lat,Long,Notes\n"
_csv_cell = st.one_of(st.text(max_size=8), st.sampled_from(["43.38", "88.29", "nan", "", '"']))
_csv_text = st.lists(st.lists(_csv_cell, max_size=6).map(",".join), max_size=4).map(
    lambda rows: _CSV_HEADER + "\n".join(rows) + "\n")
_osm_text = st.builds(
    lambda lat, lon, tags, closed: (
        '<osm><node id="1" lat="{}" lon="{}"/><node id="2" lat="43.39" lon="88.3"/>'
        '<node id="3" lat="43.38" lon="88.31"/><way id="9"><nd ref="1"/><nd ref="2"/>'
        '<nd ref="3"/>{}{}</way></osm>').format(
            lat, lon, '<nd ref="1"/>' if closed else "",
            "".join(f'<tag k="{k}" v="{v}"/>' for k, v in tags)),
    st.sampled_from(["43.38", "x", "", "1e999", "-91"]),
    st.sampled_from(["88.29", "y", "nan", "200"]),
    st.lists(st.sampled_from([("prison_camp", "re-education"), ("name", "../../x"),
                              ("name:en", "a;b"), ("name", "")]), max_size=3),
    st.booleans())


@settings(derandomize=True, max_examples=15, deadline=10_000,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["csv", "osm", "bytes"]), csv_text=_csv_text, osm_text=_osm_text,
       raw=st.binary(max_size=60))
def test_cli_sites_import_fuzz(kind: str, csv_text: str, osm_text: str, raw: bytes,
                               tmp_path: Path) -> None:
    """`sites import` of malformed ASPI CSV / OSM XML: a written, loadable watch file with
    safe ids, or exit 1/2 with a message."""
    work = Path(tempfile.mkdtemp(dir=tmp_path))  # tmp_path is shared by the examples
    source = work / ("list.osm" if kind == "osm" else "list.csv")
    if kind == "bytes":
        source.write_bytes(raw)
    else:
        source.write_text(osm_text if kind == "osm" else csv_text, encoding="utf-8")
    output = work / "w.geojson"
    result = invoke(["sites", "import", str(source), "-o", str(output), "-q"])
    assert_clean_outcome(result)
    if result.exit_code == 0:
        assert all(SAFE_ID.match(a.id) for a in load_sites(output).values())
    else:
        assert not output.exists()


def _laughs() -> str:
    ents = ['<!ENTITY l0 "lollollollollollollollollollol">'] + [
        f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10)]
    return ('<?xml version="1.0"?><!DOCTYPE osm [' + "".join(ents) + ']><osm><node id="1" '
            'lat="43.38" lon="88.29"><tag k="name" v="&l9;"/></node></osm>')


@pytest.mark.parametrize("case", ["billion_laughs", "external_entity"])
def test_osm_import_refuses_entity_tricks(case: str, tmp_path: Path) -> None:
    """OSM XML with an entity bomb or an external entity is refused, never expanded or read."""
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-CONTENT")
    text = _laughs() if case == "billion_laughs" else (
        f'<?xml version="1.0"?><!DOCTYPE osm [<!ENTITY x SYSTEM "file://{secret}">]><osm>'
        '<way id="1"><tag k="prison_camp" v="re-education"/><tag k="name" v="&x;"/></way></osm>')
    source = tmp_path / "list.osm"
    source.write_text(text)
    output = tmp_path / "w.geojson"
    result = invoke(["sites", "import", str(source), "-o", str(output), "-q"])
    assert_clean_outcome(result, allow_success=False)
    assert "not OpenStreetMap XML" in result.output and "SECRET" not in result.output
    assert not output.exists()
