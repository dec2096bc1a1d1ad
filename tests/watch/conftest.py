"""Fixtures of the watch tests: the fake Wayback, a config pointing at it, a watch file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from watch.fake_wayback import FakeWayback, build_images, serve_fake, sites_geojson


@pytest.fixture(scope="session")
def release_images():
    """The synthetic release images (rendered once)."""
    return build_images()


@pytest.fixture
def fake(release_images) -> Iterator[FakeWayback]:
    """A fresh fake Wayback with releases 1 and 2."""
    yield from serve_fake(release_images)


@pytest.fixture
def setup(fake: FakeWayback, tmp_path: Path) -> dict[str, Path]:
    """config.toml (cache in tmp_path, the fake source), sites.geojson and the OUT folder."""
    config = tmp_path / "config.toml"
    config.write_text(f'[fetch]\ncache_dir = "{tmp_path / "cache"}"\ntimeout_s = 5.0\n'
                      f"max_retries = 1\n\n{fake.source_toml()}")
    return {"config": config, "sites": sites_geojson(tmp_path / "sites.geojson"),
            "out": tmp_path / "out"}
