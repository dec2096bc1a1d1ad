"""scripts/readme_picture.py: the README's picture from a real `make detect` run's chips.

Puts a finding's outlined before and after chips (as `sitewatch detect` wrote them in
``<run>/chips/``) side by side in one PNG, unchanged pixel for pixel, so the picture in the
README is what an analyst sees in the evidence folder. Regenerate it after a change that moves
the Dabancheng result:

    make detect
    .venv/bin/python scripts/readme_picture.py            # newest out/dabancheng/<run>/

or name the run folder and the finding:

    .venv/bin/python scripts/readme_picture.py out/dabancheng/20261125T163507Z-e13849ee \
        --finding compound-0001 --output docs/img/dabancheng_compound.png

The default finding is the run's top-scored compound. stdout gets the written path.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "docs" / "img" / "dabancheng_compound.png"
GAP_PX = 8


def newest_run(out_root: Path, aoi_id: str = "dabancheng") -> Path:
    """The most recent complete run folder of ``aoi_id`` under ``out_root``."""
    runs = sorted(p.parent for p in (out_root / aoi_id).glob("*/manifest.json"))
    if not runs:
        raise SystemExit(f"No run of {aoi_id!r} under {out_root}: run `make detect` first.")
    return runs[-1]


def top_finding(run_dir: Path, kind: str = "compound") -> str:
    """Id of the best-scored finding of ``kind`` in the run's changes.geojson."""
    features = json.loads((run_dir / "changes.geojson").read_text())["features"]
    found = [f["properties"] for f in features if f["properties"]["kind"] == kind]
    if not found:
        raise SystemExit(f"{run_dir} has no finding of kind {kind!r}.")
    return max(found, key=lambda p: p["score"])["id"]


def side_by_side(before_path: Path, after_path: Path, *, gap_px: int = GAP_PX) -> Image.Image:
    """The two chips next to each other on white, before on the left."""
    before, after = Image.open(before_path).convert("RGB"), Image.open(after_path).convert("RGB")
    width = before.width + gap_px + after.width
    canvas = Image.new("RGB", (width, max(before.height, after.height)), "white")
    canvas.paste(before, (0, 0))
    canvas.paste(after, (before.width + gap_px, 0))
    return canvas


def main(argv: list[str] | None = None) -> int:
    """Write the picture; print its path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?", type=Path,
                        help="run folder (default: the newest out/dabancheng/<run>)")
    parser.add_argument("--finding", help="finding id (default: the top-scored compound)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    run_dir = args.run_dir or newest_run(ROOT / "out")
    finding = args.finding or top_finding(run_dir)
    chips = [run_dir / "chips" / f"{finding}_{role}_outlined.png" for role in ("before", "after")]
    missing = [str(p) for p in chips if not p.exists()]
    if missing:
        raise SystemExit(f"Missing chips: {', '.join(missing)} (is {finding!r} a finding of "
                         f"{run_dir} with chips?).")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(args.output.name + ".partial")
    side_by_side(*chips).save(tmp, format="PNG", optimize=True)
    tmp.replace(args.output)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
