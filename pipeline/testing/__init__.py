"""pipeline.testing: synthetic-scene factories shared by tests and notebooks.

`pipeline.testing.pairs` makes small georeferenced pairs with a known changed block (and runs
the detector on a pair); `pipeline.testing.compounds` draws walled compounds, fences,
watchtowers and their look-alikes (road grids, field boundaries, bare new roofs, an old
compound whose roofs changed) over a real or synthetic background. Everything is re-exported
here.
"""

from __future__ import annotations

from pipeline.testing.compounds import (
    CompoundTruth,
    Structure,
    make_existing_compound,
    make_field_boundaries,
    make_new_roofs,
    make_road_grid,
    make_walled_compound,
    render_pair,
    resample_background,
    synthetic_background,
)
from pipeline.testing.pairs import CHANGE_LEVEL, detect_pair, make_da, make_grid, make_pair

__all__ = [
    "CHANGE_LEVEL", "make_grid", "make_da", "make_pair", "detect_pair",
    "Structure", "CompoundTruth", "synthetic_background", "resample_background",
    "render_pair", "make_walled_compound", "make_road_grid", "make_field_boundaries",
    "make_new_roofs", "make_existing_compound",
]
