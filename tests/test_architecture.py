"""The pure core never does I/O: parse imports of core/ and detect/ with ast."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
FORBIDDEN = ("pipeline.fetch", "pipeline.report", "pipeline.cli", "pipeline.run", "click",
             "requests", "urllib", "http", "pystac_client", "rioxarray.raster_dataset")
PURE = sorted([*PACKAGE.glob("core/*.py"), *PACKAGE.glob("detect/*.py")])


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("path", PURE, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_pure_modules_import_no_io(path):
    """core/ and detect/ import no fetcher, reporter, CLI or HTTP client."""
    bad = [n for n in _imports(path) if n.startswith(FORBIDDEN)]
    assert bad == []


@pytest.mark.parametrize("path", PURE, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_pure_modules_open_no_files(path):
    """core/ and detect/ never call open(), rasterio.open or MemoryFile."""
    text = path.read_text()
    for call in ("rasterio.open(", "MemoryFile(", " open("):
        assert call not in text, f"{path.name} calls {call}"
