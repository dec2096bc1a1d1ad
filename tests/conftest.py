"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
from _helpers import DABANCHENG

# Fixtures of the loopback fetch servers, shared with tests outside tests/fetch.
pytest_plugins = ["loopback_fixtures"]


@pytest.fixture(scope="session")
def dabancheng_dir() -> Path:
    """The real Dabancheng pair and its label; skip when ../shared/data is absent."""
    if not (DABANCHENG / "compound_label.geojson").exists():
        pytest.skip(f"real data not found at {DABANCHENG} "
                    "(the shared data folder beside the project)")
    return DABANCHENG
