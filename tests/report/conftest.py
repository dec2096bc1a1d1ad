"""Fixtures shared by the report tests: one run of the embedded default, its GeoJSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pipeline.cli import cli


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of one `sitewatch detect` of the default (seeds/ pair, 'dabancheng')."""
    out = tmp_path_factory.mktemp("out")
    result = CliRunner().invoke(cli, ["detect", "--out", str(out), "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (folder,) = [p for p in out.glob("*/*") if p.is_dir()]
    return folder


@pytest.fixture(scope="session")
def fc(run_dir: Path) -> dict[str, Any]:
    """The run's changes.geojson."""
    return json.loads((run_dir / "changes.geojson").read_text(encoding="utf-8"))
