"""Shared fixtures."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from _helpers import DABANCHENG

# Fixtures of the loopback fetch servers, shared with tests outside tests/fetch.
pytest_plugins = ["loopback_fixtures"]


@pytest.fixture(autouse=True)
def _pipeline_logger_reset() -> Iterator[None]:
    """Each test starts with the ``pipeline`` logger as a fresh process has it (no level of
    its own, no handler): a CLI command run in process, in a test or a fixture of wider
    scope, sets its level and handler for the whole process (-q: ERROR), which hid the
    warnings later tests look for in ``caplog``, depending on the order the tests ran in."""
    logger = logging.getLogger("pipeline")
    logger.setLevel(logging.NOTSET)
    logger.handlers.clear()
    yield


@pytest.fixture(scope="session")
def dabancheng_dir() -> Path:
    """The real Dabancheng pair and its label; skip when ../shared/data is absent."""
    if not (DABANCHENG / "compound_label.geojson").exists():
        pytest.skip(f"real data not found at {DABANCHENG} "
                    "(the shared data folder beside the project)")
    return DABANCHENG
