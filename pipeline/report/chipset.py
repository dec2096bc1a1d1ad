"""pipeline.report.chipset: choose the findings that get chips, read their windows, write PNGs.

Chips show the *source* pixels of each date warped onto the working grid (the same grid the
outlines live on), before co-registration and radiometric normalization: what a reviewer
compares is the imagery itself. They are read again from the input files (each opened once,
``report.chipread``), whose SHA-256 must still match the one recorded when the run read them
(or from their preserved copies, already checked).
For each chosen finding four PNGs go to
``chips/``: ``<id>_before.png``, ``<id>_after.png`` and the same two with the outlines drawn
(``_outlined``); their paths, relative to the run folder, become properties of the feature.
"""

from __future__ import annotations

import logging
import math
import threading
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import xarray as xr
from PIL.PngImagePlugin import PngInfo
from pyproj import Transformer

from pipeline.errors import FetchError
from pipeline.files import sha256_file
from pipeline.model import Evidence, GridPlan, SourceRef
from pipeline.report.chipread import GridWindows
from pipeline.report.chips import Outline, compose_chip, stretch_pair
from pipeline.report.workers import dask_threads

__all__ = ["CHIP_KEYS", "CHIPS_DIR", "ChipTarget", "chip_targets", "site_of", "write_chips"]

log = logging.getLogger(__name__)

CHIPS_DIR = "chips"
CHIP_KEYS = ("chip_before", "chip_after", "chip_before_outlined", "chip_after_outlined")
# kinds drawn inside a finding's outlined chip, with their colour
PART_COLOURS = {"new_building": (0, 200, 255), "wall": (255, 0, 200), "watchtower": (255, 0, 200)}
FINDING_COLOUR = (255, 230, 0)
OWN_CHIP_EXCLUDED = ("new_building", "wall", "watchtower", "tower")
MAX_DISPLAY_PX = 800
MIN_DISPLAY_PX = 400
READ_ORDER_PX = 2048  # targets are read in the order of these blocks of the grid
Reader = Callable[[tuple[int, int, int, int]], np.ndarray]  # grid window -> (band, y, x)


@dataclass(frozen=True)
class ChipTarget:
    """A finding and its window on the grid: ``(row0, col0, rows, cols)``."""

    evidence: Evidence
    window: tuple[int, int, int, int]


def chip_targets(evidence: Sequence[Evidence], plan: GridPlan, *,
                 max_change: int = 10) -> list[ChipTarget]:
    """The findings that get chips: every compound (and new kind), then the best changes.

    Buildings, walls and towers get no chip of their own: they are drawn in their site's.
    Unexplained change regions can be many; only the ``max_change`` best scored get chips
    (the manifest's ``write:chips`` step counts the others).
    """
    own = [e for e in evidence if e.kind not in OWN_CHIP_EXCLUDED]
    own.sort(key=lambda e: (e.kind == "change", -e.score, e.id))
    chosen, n_change = [], 0
    for e in own:
        if e.kind == "change":
            if n_change >= max_change:
                continue
            n_change += 1
        chosen.append(ChipTarget(e, _window(e.geometry, plan)))
    return chosen


def write_chips(stage: Path, targets: Sequence[ChipTarget], evidence: Sequence[Evidence], *,
                plan: GridPlan, resampling: str = "bilinear",
                images: Mapping[str, xr.DataArray] | None = None,
                notes: list[str] | None = None,
                checked_copies: Mapping[str, Path] | None = None,
                threads: int | None = None) -> dict[str, dict[str, str]]:
    """Render and write the chips of ``targets``; return ``{id: {chip key: relative path}}``.

    Parameters
    ----------
    stage
        The run folder being written; chips go to ``stage/chips``.
    targets
        From :func:`chip_targets`.
    evidence
        All findings (the parts of each target's site are drawn in its outlined chips).
    plan
        The working grid.
    resampling
        How the inputs are warped onto the grid when read from their files.
    images
        ``{"before": da, "after": da}`` on ``plan`` (``(band, y, x)``, NaN nodata) to take
        the windows from instead of the input files, e.g. for fetched sources, which have no
        local file. Pass pixels as read, before normalization.
    notes
        Collects why chips were not written (also logged), for the manifest.
    checked_copies
        ``{input path: copy}``: byte copies of input files whose SHA-256 was already checked
        against the run's (the preserved originals); the windows are read from the copy and
        the input is not hashed again.
    threads
        Threads that read the windows (each with its own file handles) and encode the PNGs
        (GDAL's reads and Pillow's encoder release the GIL); None: as many as Dask's
        (``report.workers.dask_threads``). With 1, the chips are read and encoded one after
        the other on the calling thread.

    Raises
    ------
    FetchError
        An input file changed since the run read it (SHA-256 differs).
    """
    notes = notes if notes is not None else []
    if not targets:
        return {}
    first = targets[0].evidence
    paths: dict[str, str | Path] = {}
    if images is None:
        for role, ref in (("before", first.before), ("after", first.after)):
            if not ref.path:
                notes.append(f"no chips: the {role} image {ref.item_id} was fetched, not "
                             "read from a local file, and its pixels were not handed to "
                             "the writer")
                log.warning("%s", notes[-1])
                return {}
            path = (checked_copies or {}).get(str(Path(ref.path)))
            if path is None:
                _check_unchanged(ref, role)
            paths[role] = path or ref.path

    def open_readers(stack: ExitStack) -> dict[str, Reader]:
        """Window readers of both dates (a file's is not thread-safe: one per thread)."""
        if images is not None:
            return {role: _window_reader(images[role]) for role in ("before", "after")}
        return {role: stack.enter_context(GridWindows(path, plan, resampling=resampling)).read
                for role, path in paths.items()}

    done = _render_all(stage, targets, evidence, open_readers, plan=plan,
                       threads=threads or dask_threads())
    written: dict[str, dict[str, str]] = {}
    for target in targets:  # in the targets' order, whatever the order of reading
        if done[target.evidence.id]:
            written[target.evidence.id] = done[target.evidence.id]
        else:
            notes.append(f"no chips for {target.evidence.id}: no valid pixel in its window")
    return written


def _render_all(stage: Path, targets: Sequence[ChipTarget], evidence: Sequence[Evidence],
                open_readers: Callable[[ExitStack], Mapping[str, Reader]], *,
                plan: GridPlan, threads: int) -> dict[str, dict[str, str]]:
    """Read each target's windows and render them, in grid-block order, on ``threads``
    threads (on this one when 1); each thread reads with its own readers (``open_readers``,
    closed at the end), so reading runs in parallel too, and the windows of at most
    ``threads`` targets are held at once."""
    def block(target: ChipTarget) -> tuple[int, int]:
        r0, c0, rows, cols = target.window
        return (r0 + rows // 2) // READ_ORDER_PX, (c0 + cols // 2) // READ_ORDER_PX

    north_deg = _north_deg(plan)
    parts = _site_parts(evidence)
    (stage / CHIPS_DIR).mkdir(exist_ok=True)
    ordered = sorted(targets, key=block)
    with ExitStack() as stack:
        local, lock = threading.local(), threading.Lock()

        def render(target: ChipTarget) -> dict[str, str]:
            read = getattr(local, "read", None)
            if read is None:
                with lock:  # the stack is shared by the threads
                    read = local.read = open_readers(stack)
            windows = [read[role](target.window) for role in ("before", "after")]
            return _write_target(stage, target, windows, parts, plan=plan,
                                 north_deg=north_deg)

        if threads <= 1:
            return {t.evidence.id: render(t) for t in ordered}
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sitewatch-chips") as pool:
            jobs = [(t, pool.submit(render, t)) for t in ordered]
            try:
                return {t.evidence.id: job.result() for t, job in jobs}
            except BaseException:
                pool.shutdown(cancel_futures=True)  # the others are not started
                raise


def _window_reader(da: xr.DataArray) -> Reader:
    """Windows of pixels handed in (NumPy, or Dask computed window by window) as float32."""
    def read(window: tuple[int, int, int, int]) -> np.ndarray:
        r0, c0, rows, cols = window
        return np.asarray(da.data[:, r0:r0 + rows, c0:c0 + cols], np.float32)
    return read


def _check_unchanged(ref: SourceRef, role: str) -> None:
    """FetchError when the input's bytes differ from those the run read (SHA-256)."""
    if not ref.sha256:
        return
    digest = sha256_file(str(ref.path))
    if digest != ref.sha256:
        raise FetchError(
            f"The {role} image {ref.path} changed since this run read it (SHA-256 "
            f"{digest[:12]}… now, {ref.sha256[:12]}… then): chips would not show the "
            "analysed pixels. Restore the file or run again."
        )


def _write_target(stage: Path, target: ChipTarget, windows: list[np.ndarray],
                  parts: Mapping[str, Sequence[Evidence]], *, plan: GridPlan,
                  north_deg: float) -> dict[str, str]:
    """The four PNGs of one finding from its ``[before, after]`` windows (``parts``: from
    `_site_parts`); ``{}`` when its window has no valid pixel."""
    _, _, rows, cols = target.window
    if not all(np.isfinite(w).any() for w in windows):
        log.warning("No chips for %s: no valid pixel in its window", target.evidence.id)
        return {}
    factor = _display_factor(rows, cols)
    rgbs = [_resize(rgb, factor) for rgb in stretch_pair(*windows)]
    metres_per_px = plan.res_m / factor
    outlines = _outlines(target, parts.get(target.evidence.id, ()), plan, factor)
    e = target.evidence
    paths = {}
    for role, rgb, ref in (("before", rgbs[0], e.before), ("after", rgbs[1], e.after)):
        caption = _caption(e, ref, role, plan, metres_per_px)
        for key, drawn in ((f"chip_{role}", ()), (f"chip_{role}_outlined", outlines)):
            rel = f"{CHIPS_DIR}/{e.id}_{role}{'_outlined' if drawn else ''}.png"
            image = compose_chip(rgb, caption=caption, metres_per_px=metres_per_px,
                                 north_deg=north_deg, outlines=drawn)
            # the run folder is staged and published whole, so no per-file rename and fsync;
            # zlib's run-length strategy: on imagery a third faster than level 3's default
            # strategy and about 10 % smaller (measured on the bench chips); still lossless.
            # Pillow keeps its per-row filter choice: a fixed "Sub" filter was tried (half the
            # encoding time on the bench chips) and dropped, as its chips of the Dabancheng
            # default were 62 % larger (rows repeated by upsampling need the "Up" filter)
            image.save(stage / rel, format="PNG", compress_level=3, compress_type=zlib.Z_RLE,
                       pnginfo=_png_text(image))
            paths[key] = rel
    return paths


def _window(geometry: Any, plan: GridPlan) -> tuple[int, int, int, int]:
    """Grid window around a geometry with a margin of a quarter of its size (8 px or more)."""
    minx, miny, maxx, maxy = geometry.bounds
    x0, y0 = plan.bounds[0], plan.bounds[3]
    col_a, col_b = (minx - x0) / plan.res_m, (maxx - x0) / plan.res_m
    row_a, row_b = (y0 - maxy) / plan.res_m, (y0 - miny) / plan.res_m
    margin = max(8.0, 0.25 * max(col_b - col_a, row_b - row_a))
    col0 = max(0, math.floor(col_a - margin))
    row0 = max(0, math.floor(row_a - margin))
    col1 = min(plan.width, math.ceil(col_b + margin))
    row1 = min(plan.height, math.ceil(row_b + margin))
    return row0, col0, max(1, row1 - row0), max(1, col1 - col0)


def _display_factor(rows: int, cols: int) -> float:
    """Display pixels per grid pixel: whole-number enlargement of small windows, reduction
    of large ones."""
    side = max(rows, cols)
    if side > MAX_DISPLAY_PX:
        return MAX_DISPLAY_PX / side
    return float(max(1, MIN_DISPLAY_PX // side))


def _resize(rgb: np.ndarray, factor: float) -> np.ndarray:
    """Nearest-neighbour enlargement (pixels stay visible) or area reduction."""
    from PIL import Image

    if factor == 1:
        return rgb
    if factor > 1:
        k = int(factor)
        return np.repeat(np.repeat(rgb, k, axis=0), k, axis=1)
    size = (max(1, round(rgb.shape[1] * factor)), max(1, round(rgb.shape[0] * factor)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))


def _outlines(target: ChipTarget, parts: Sequence[Evidence], plan: GridPlan,
              factor: float) -> list[Outline]:
    """The finding (yellow) and its ``parts`` (buildings cyan, walls and towers magenta)."""
    row0, col0 = target.window[:2]
    x0 = plan.bounds[0] + col0 * plan.res_m
    y0 = plan.bounds[3] - row0 * plan.res_m
    scale = factor / plan.res_m

    def to_px(geom: Any) -> Any:
        return shapely.transform(geom, lambda xy: np.column_stack(
            [(xy[:, 0] - x0) * scale, (y0 - xy[:, 1]) * scale]))

    drawn = [Outline(to_px(e.geometry), PART_COLOURS[e.kind], 1) for e in parts]
    return [*drawn, Outline(to_px(target.evidence.geometry), FINDING_COLOUR, 2)]


def _site_parts(evidence: Sequence[Evidence]) -> dict[str, list[Evidence]]:
    """Per site id, in ``evidence``'s order, the findings drawn on its outlined chips: those
    of a kind in `PART_COLOURS` that belong to it (`site_of`), the site itself left out.
    Grouped once for all chips (each chip scanning every finding cost the chips time in
    proportion to chips x findings)."""
    parts: dict[str, list[Evidence]] = {}
    for e in evidence:
        site = site_of(e)
        if site is not None and e.id != site and e.kind in PART_COLOURS:
            parts.setdefault(site, []).append(e)
    return parts


def _png_text(image: Any) -> PngInfo:
    """The caption band as PNG text chunks (``Description``, scale bar, north), so a reader
    (or a test) gets the date, source, sensor and resolution without reading pixels."""
    info = PngInfo()
    info.add_itxt("Description", image.info["caption"])
    info.add_text("Sitewatch-Scale-Bar", image.info["scale_bar"])
    info.add_text("Sitewatch-North-Deg", image.info["north_deg"])
    return info


def site_of(e: Evidence) -> str | None:
    """The id of the site (compound) ``e`` belongs to: ``site_id``, or the older ``parent``."""
    return getattr(e, "site_id", None) or getattr(e, "parent", None)


def _north_deg(plan: GridPlan) -> float:
    """True north at the grid centre, degrees clockwise from grid up (meridian convergence)."""
    cx = (plan.bounds[0] + plan.bounds[2]) / 2
    cy = (plan.bounds[1] + plan.bounds[3]) / 2
    to_lonlat = Transformer.from_crs(plan.crs, "EPSG:4326", always_xy=True)
    to_grid = Transformer.from_crs("EPSG:4326", plan.crs, always_xy=True)
    lon, lat = to_lonlat.transform(cx, cy)
    nx, ny = to_grid.transform(lon, lat + 0.01)
    return math.degrees(math.atan2(nx - cx, ny - cy))


def _caption(e: Evidence, ref: SourceRef, role: str, plan: GridPlan,
             metres_per_px: float) -> list[str]:
    """Date, source, provider/sensor and resolution of one chip."""
    when = ref.acquired.isoformat() if ref.acquired else "acquisition date unknown"
    release = f" · release {ref.release} (not the acquisition date)" if ref.release else ""
    sensor = _sensor(ref)
    grade = e.measurements.get("grade")
    grade_text = f" · grade {grade}" if grade is not None else ""
    source_res = f"{ref.res_m:g} m source" if ref.res_m else "source resolution unknown"
    return [
        f"{role.upper()} {when}{release}",
        f"{ref.provider}:{ref.item_id}" + (f" · {sensor}" if sensor else ""),
        f"{plan.res_m:g} m grid ({source_res}) · shown at {metres_per_px:.2g} m/px",
        f"{e.id} · {e.kind}{grade_text} · score {e.score:.2f} · stretch 2-98 % of both dates",
    ]


def _sensor(ref: SourceRef) -> str | None:
    """Sensor or imagery provider from the source's metadata, when it names one."""
    extra = ref.extra or {}
    for key in ("platform", "constellation", "sensor"):
        if extra.get(key):
            return str(extra[key])
    meta = extra.get("metadata") or {}
    if isinstance(meta, dict) and meta.get("source"):
        return f"imagery: {meta['source']}"
    return None
