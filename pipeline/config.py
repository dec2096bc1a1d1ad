"""pipeline.config: ``configs/*.toml`` to a validated, frozen ``RunConfig``.

The only module that reads configuration files or the environment. Precedence: command-line
overrides > config file > dataclass defaults. Errors name the key path, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pipeline.errors import ConfigError
from pipeline.fetch.base import SourceConfig, resolve_deadline_s
from pipeline.files import is_utf8
from pipeline.model import (
    BuildingParams,
    ChangeParams,
    CoregParams,
    DetectParams,
    GradeParams,
    ObjectParams,
    TowerParams,
    WallParams,
)

__all__ = [
    "RunConfig", "load_config", "load_sources", "default_config_path", "default_sources_path",
    "PROJECT_ROOT",
]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
_SECTIONS: dict[str, type] = {"coreg": CoregParams, "change": ChangeParams, "objects": ObjectParams,
                              "walls": WallParams, "towers": TowerParams, "grade": GradeParams,
                              "buildings": BuildingParams}
# Shares (0..1) among the wall, tower and grade settings.
_FRACTIONS = {"min_contrast", "max_line_share", "min_support", "max_before_ratio",
              "double_min_share", "internal_min_span", "min_closure_ratio"}
_RESAMPLING = ("nearest", "bilinear", "cubic", "average")
# Upper bounds of kernel and cell sizes and of the sub-pixel upsampling, far above any useful
# value.
_MOST: dict[str, dict[str, float]] = {
    "coreg": {"upsample_factor": 1000},
    "change": {"smooth_sigma_px": 50, "opening_radius_px": 50},
    "objects": {"site_sigma_m": 10_000, "site_gap_m": 10_000, "cell_m": 1000},
}


def default_config_path() -> Path:
    """``$SITEWATCH_CONFIG`` if set, else ``configs/default.toml`` of this checkout."""
    env = os.environ.get("SITEWATCH_CONFIG")
    return Path(env) if env else PROJECT_ROOT / "configs" / "default.toml"


@dataclass(frozen=True)
class RunConfig:
    """Everything a detect run needs besides its inputs."""

    params: DetectParams = field(default_factory=DetectParams)
    res_m: float | None = None
    resampling: str = "bilinear"
    radius_m: float = 1000.0
    sites_path: Path = PROJECT_ROOT / "configs" / "sites.geojson"
    config_path: Path | None = None
    cache_dir: Path = Path("~/.cache/sitewatch").expanduser()
    timeout_s: float = 30.0
    max_retries: int = 4
    max_concurrency: int = 4
    deadline_s: float | None = None  # None: DEADLINE_PER_TIMEOUT * timeout_s

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain data, as written to the manifest."""
        return {
            "config_path": str(self.config_path) if self.config_path else None,
            "grid": {"res_m": self.res_m, "resampling": self.resampling},
            "aoi": {"radius_m": self.radius_m, "sites": str(self.sites_path)},
            "fetch": {"cache_dir": str(self.cache_dir), "timeout_s": self.timeout_s,
                      "deadline_s": resolve_deadline_s(self.deadline_s, self.timeout_s),
                      "max_retries": self.max_retries, "max_concurrency": self.max_concurrency},
            **self.params.to_dict(),
        }


def _check_value(key: str, value: Any, hint: Any) -> Any:
    """Validate and coerce one value against a dataclass field's type hint."""
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _check_value(key, value, options[0])
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(map(repr, choices))}, "
                              f"got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(get_args(hint)):
            raise ConfigError(f"{key}: expected a list of {len(get_args(hint))} numbers, "
                              f"got {value!r}")
        return tuple(_check_value(f"{key}[{i}]", v, t) for i, (v, t) in enumerate(
            zip(value, get_args(hint), strict=True)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        if hint is int and float(value) != int(value):
            raise ConfigError(f"{key}: expected a whole number, got {value!r}")
        return hint(value)
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"{key}: expected text, got {value!r}")
    return value


def _build(cls: type, section: str, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else f" Known keys: {', '.join(names)}."
            raise ConfigError(f"{section}.{key}: unknown key.{hint}")
        kwargs[key] = _check_value(f"{section}.{key}", value, hints[key])
    obj = cls(**kwargs)
    _check_ranges(section, obj)
    return obj


def _check_ranges(section: str, obj: Any) -> None:
    """Reject values that parse but make no sense (negative sizes, fractions above 1)."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if (f.name.endswith(("_m", "_m2", "_px", "_factor")) or f.name == "cell_m") and v < 0:
            raise ConfigError(f"{section}.{f.name}: expected a value >= 0, got {v!r}")
        if f.name.endswith(("_score", "_fill", "_solidity", "_rectangularity")) and not 0 <= v <= 1:
            raise ConfigError(f"{section}.{f.name}: expected 0 <= x <= 1, got {v!r}")
    # Kernels wider than any building or site make no sense and do not fit in memory
    # (smooth_sigma_px = 1e12 asked numpy for 58 TiB): refuse them with the key named.
    for name, most in _MOST.get(section, {}).items():
        if getattr(obj, name) > most:
            raise ConfigError(f"{section}.{name}: expected at most {most:g}, got "
                              f"{getattr(obj, name)!r}")
    if section == "coreg" and obj.upsample_factor < 1:
        raise ConfigError("coreg.upsample_factor: expected a whole number >= 1 (1: whole "
                          f"pixels, 20: 1/20 px), got {obj.upsample_factor!r}")
    if section == "objects" and not obj.min_texture_gain > -1:  # its floor is log1p(gain)
        raise ConfigError("objects.min_texture_gain: expected a gain above -1 (0.25 is 25 % "
                          f"more edge density after than before), got {obj.min_texture_gain!r}")
    if section == "change" and obj.threshold is not None and obj.threshold <= 0:
        raise ConfigError(f"change.threshold: expected a positive number, got {obj.threshold!r}")
    if section == "objects" and obj.cell_m <= 0:
        raise ConfigError(f"objects.cell_m: expected a positive number, got {obj.cell_m!r}")
    if section == "objects" and obj.row_min_buildings < 2:
        raise ConfigError("objects.row_min_buildings: a row is at least 2 buildings, got "
                          f"{obj.row_min_buildings!r}")
    if section == "objects" and not (obj.row_size_tolerance >= 0
                                     and 0 <= obj.row_angle_tolerance_deg <= 90):
        raise ConfigError("objects.row_size_tolerance must be >= 0 and "
                          "objects.row_angle_tolerance_deg between 0 and 90, got "
                          f"{obj.row_size_tolerance!r} and {obj.row_angle_tolerance_deg!r}")
    if section in ("walls", "towers", "grade", "buildings"):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if f.name in _FRACTIONS and not 0 <= v <= 1:
                raise ConfigError(f"{section}.{f.name}: expected 0 <= x <= 1, got {v!r}")
            if f.name.endswith("res_m") and v <= 0:
                raise ConfigError(f"{section}.{f.name}: expected a positive number of metres "
                                  f"per pixel, got {v!r}")


def _check_resolutions(params: DetectParams) -> None:
    """The grade may use walls and towers only where their searches run."""
    g, w, t = params.grade, params.walls, params.towers
    if g.max_wall_res_m > w.max_res_m:
        raise ConfigError(f"grade.max_wall_res_m: {g.max_wall_res_m!r} is coarser than "
                          f"walls.max_res_m = {w.max_res_m!r}, where walls are no longer "
                          "searched; set it to at most walls.max_res_m.")
    if g.max_tower_res_m > t.max_res_m:
        raise ConfigError(f"grade.max_tower_res_m: {g.max_tower_res_m!r} is coarser than "
                          f"towers.max_res_m = {t.max_res_m!r}, where towers are no longer "
                          "searched; set it to at most towers.max_res_m.")


def _read_toml(path: Path, *, named_by: str = "--config") -> dict[str, Any]:
    if not is_utf8(str(path.resolve())):  # the manifest (UTF-8 JSON) records its full path
        raise ConfigError(f"Config file path {str(path.resolve())!r} is not UTF-8; rename the "
                          "file or the folders on its path to UTF-8 (e.g. ASCII) names.")
    if not path.is_file():
        default_path = PROJECT_ROOT / "configs" / "default.toml"
        problem = ("is not a regular file (a folder, pipe or device)" if path.exists() else
                   "does not exist")
        fix = (f"Set {named_by} to an existing TOML file, or unset it" if named_by.startswith("$")
               else f"Pass {named_by} with an existing TOML file, or omit it")
        raise ConfigError(f"Config file {path} {problem}. {fix} to use {default_path}.")
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"Config file {path} is not valid TOML: {e}. Fix the line named.") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"Config file {path} is not UTF-8 text ({e}); save it as UTF-8 "
                          "TOML.") from e
    except RecursionError as e:
        raise ConfigError(f"Config file {path} nests arrays or tables too deeply to read; "
                          "it is not a Sitewatch config. Fix or replace it.") from e


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    section, _, name = key.partition(".")
    if not name:
        raise ConfigError(f"Override {key!r} must be written 'section.key', "
                          "e.g. 'change.threshold'.")
    data.setdefault(section, {})[name] = value


def load_config(path: str | Path | None = None, *,
                overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a TOML config, apply ``overrides`` (dotted keys, ``None`` values skipped), validate.

    Raises
    ------
    ConfigError
        Missing or malformed file, unknown section or key, or a value of the wrong type or
        out of range; the message names the key path.
    """
    config_path = Path(path) if path is not None else default_config_path()
    from_env = path is None and bool(os.environ.get("SITEWATCH_CONFIG"))
    data = _read_toml(config_path, named_by="$SITEWATCH_CONFIG" if from_env else "--config")
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, key, value)
    known = {*_SECTIONS, "grid", "aoi", "fetch", "sources"}
    for section in data:
        if section not in known:
            raise ConfigError(f"{section}: unknown section in {config_path}. "
                              f"Known sections: {', '.join(sorted(known))}.")
        if not isinstance(data[section], dict):
            raise ConfigError(f"{section}: expected a [{section}] table in {config_path}.")
    params = DetectParams(**{s: _build(cls, s, data.get(s, {})) for s, cls in _SECTIONS.items()})
    _check_resolutions(params)
    grid = data.get("grid", {})
    aoi = data.get("aoi", {})
    for key in grid:
        if key not in ("res_m", "resampling"):
            raise ConfigError(f"grid.{key}: unknown key. Known keys: res_m, resampling.")
    for key in aoi:
        if key not in ("radius_m", "sites"):
            raise ConfigError(f"aoi.{key}: unknown key. Known keys: radius_m, sites.")
    res_m = _check_value("grid.res_m", grid.get("res_m", 0), float)
    if res_m < 0:
        raise ConfigError(f"grid.res_m: expected 0 (use the inputs' resolution) or a positive "
                          f"number of metres, got {res_m!r}")
    resampling = _check_value("grid.resampling", grid.get("resampling", "bilinear"), str)
    if resampling not in _RESAMPLING:
        raise ConfigError(f"grid.resampling: expected one of {', '.join(_RESAMPLING)}, "
                          f"got {resampling!r}")
    radius_m = _check_value("aoi.radius_m", aoi.get("radius_m", 1000.0), float)
    if not 0 < radius_m <= 100_000:
        raise ConfigError(f"aoi.radius_m: expected 0 < radius_m <= 100000 metres, got {radius_m!r}")
    # A config that names no site file uses the project's; a relative name is relative to it.
    sites = Path(_check_value("aoi.sites", aoi.get("sites", str(RunConfig.sites_path)), str))
    if not sites.is_absolute():
        sites = config_path.parent / sites
    if "sites" in aoi and not sites.exists():
        raise ConfigError(f"aoi.sites: the site file {sites} does not exist. Fix the path in "
                          f"{config_path} (relative paths are relative to that file).")
    return RunConfig(
        params=params,
        res_m=res_m or None,
        resampling=resampling,
        radius_m=radius_m,
        sites_path=sites,
        config_path=config_path.resolve(),
        **_fetch_settings(data.get("fetch", {})),
    )


def _fetch_settings(fetch: dict[str, Any]) -> dict[str, Any]:
    """The [fetch] table: cache folder ($SITEWATCH_CACHE wins), timeouts, retries, concurrency."""
    known = {"cache_dir": str, "timeout_s": float, "deadline_s": float, "max_retries": int,
             "max_concurrency": int}
    for key in fetch:
        if key not in known:
            raise ConfigError(f"fetch.{key}: unknown key. Known keys: {', '.join(known)}.")
    out: dict[str, Any] = {k: _check_value(f"fetch.{k}", v, known[k]) for k, v in fetch.items()}
    env = os.environ.get("SITEWATCH_CACHE")
    if env or out.get("cache_dir"):
        out["cache_dir"] = Path(env or out["cache_dir"]).expanduser()
    else:
        out.pop("cache_dir", None)
    for key in ("timeout_s", "deadline_s", "max_retries", "max_concurrency"):
        if key in out and out[key] <= 0:
            raise ConfigError(f"fetch.{key}: expected a positive number, got {out[key]!r}")
    return out


_SOURCE_REQUIRED: dict[str, tuple[str, ...]] = {
    "stac": ("url", "collection"),
    "xyz": ("url",),
    "wayback": ("config_url", "tile_url", "tilemap_url", "metadata_url"),
    "local": (),
}


def default_sources_path() -> Path:
    """``configs/sources.toml`` of this checkout."""
    return PROJECT_ROOT / "configs" / "sources.toml"


def load_sources(path: str | Path | None = None) -> dict[str, SourceConfig]:
    """Read the imagery sources: one ``[sources.<name>]`` table each, with a ``type``.

    Raises
    ------
    ConfigError
        Missing file, unknown type, a missing required key, or a URL that is not http(s);
        the message names the source and the key.
    """
    sources_path = Path(path) if path is not None else default_sources_path()
    data = _read_toml(sources_path).get("sources")
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{sources_path} has no [sources.<name>] tables. Add one per imagery "
                          f"source, e.g. [sources.earth-search] with type = \"stac\".")
    out = {}
    for name, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"sources.{name}: expected a table in {sources_path}.")
        kind = table.get("type")
        if kind not in _SOURCE_REQUIRED:
            raise ConfigError(f"sources.{name}.type: expected one of "
                              f"{', '.join(_SOURCE_REQUIRED)}, got {kind!r}.")
        for key in _SOURCE_REQUIRED[kind]:
            if not isinstance(table.get(key), str) or not table[key]:
                raise ConfigError(f"sources.{name}.{key}: required for a {kind} source.")
        for key, value in table.items():
            if key.endswith("url") and isinstance(value, str) and not value.startswith(
                    ("http://", "https://")):
                raise ConfigError(f"sources.{name}.{key}: only http:// and https:// URLs are "
                                  f"fetched, got {value!r}.")
        options = {k: v for k, v in table.items() if k != "type"}
        out[name] = SourceConfig(name=name, type=kind, options=options)
    return out
