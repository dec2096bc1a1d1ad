"""Runs from fetched sources keep what they read in originals/ (loopback STAC API, Wayback).

STAC: the COG byte ranges GDAL read, as served. Wayback: the tiles, from the download cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from urllib.parse import urlsplit

from click.testing import CliRunner
from test_cli_fetch import _config as _wayback_config
from test_cli_fetch import _detect as _wayback_detect
from test_cli_fetch import stac_detect as _detect

from pipeline.cli import cli


def _cog_originals(run: Path) -> list[dict]:
    manifest = json.loads((run / "manifest.json").read_text())
    return [o for o in manifest["originals"] if "_cog/" in str(o.get("path"))]


def test_stac_run_keeps_the_cog_bytes_read(api, surface, catalogue, tmp_path):
    """originals/ holds each range GDAL read, byte-equal to the served file; verify checks it."""
    server, _ = api
    run = _detect(server, surface, tmp_path, tmp_path / "out")
    kept = _cog_originals(run)
    manifest = json.loads((run / "manifest.json").read_text())
    assert {o["input"] for o in kept} == {"before:0", "after:0"}
    assert all(o["how"] == "copy of cache entry" for o in kept)
    assert not [o for o in manifest["originals"] if o["path"] is None]
    # the search page that listed each item, as the API served it
    pages = [o for o in manifest["originals"] if "_stac/search-" in str(o["path"])]
    assert {o["input"] for o in pages} == {"before:0", "after:0"}
    for o in pages:
        page = json.loads((run / o["path"]).read_bytes())
        item_id = next(i["item_id"] for i in manifest["inputs"] if i["role"] == o["input"])
        assert item_id in [f["id"] for f in page["features"]]
        assert "/search?" in o["source_url"] and o["how"] == "copy of cache entry"
    for o in kept:
        body = (run / o["path"]).read_bytes()
        served = catalogue["files"][urlsplit(o["source_url"]).path]
        first, last = (int(v) for v in o["range"].split("-"))
        assert body == served[first:last + 1]
        assert hashlib.sha256(body).hexdigest() == o["sha256"] and len(body) == o["size_bytes"]
        assert not (run / o["path"]).stat().st_mode & stat.S_IWUSR
        assert "not the whole file" in o["note"]
    # every asset of both items (5 bands and SCL) is there, from its header on
    for role in ("before:0", "after:0"):
        urls = {o["source_url"] for o in kept if o["input"] == role}
        assert len(urls) == 6
        assert {o["source_url"] for o in kept if o["input"] == role and
                o["range"].startswith("0-")} == urls
    # the bytes kept are those the server sent for the COGs (requests relayed one to one)
    served = sum(n for p, n in server.bytes_served.items() if p.startswith("/cogs/"))
    assert sum(o["size_bytes"] for o in kept) <= served

    _assert_verify_catches_one_byte(run, kept[-1]["path"])


def _assert_verify_catches_one_byte(run: Path, rel: str) -> None:
    """`sitewatch verify` passes, then fails naming ``rel`` once one of its bytes changed."""
    ok = CliRunner().invoke(cli, ["verify", str(run)])
    assert ok.exit_code == 0, ok.output
    target = run / rel
    os.chmod(target, stat.S_IRUSR | stat.S_IWUSR)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    bad = CliRunner().invoke(cli, ["verify", str(run)])
    assert bad.exit_code == 1
    assert rel in bad.output + bad.stderr


def test_stac_rerun_from_cache_keeps_the_same_bytes(api, surface, tmp_path):
    """A rerun whose composites come from the cache (no COG request) preserves the same reads."""
    server, _ = api
    first = _cog_originals(_detect(server, surface, tmp_path, tmp_path / "out1"))
    server.reset_counts()
    second_run = _detect(server, surface, tmp_path, tmp_path / "out2")
    assert server.count("/cogs/") == 0
    second = _cog_originals(second_run)
    key = lambda o: (o["input"], o["source_url"], o["range"])  # noqa: E731
    assert sorted((key(o), o["sha256"]) for o in second) == \
        sorted((key(o), o["sha256"]) for o in first)
    assert CliRunner().invoke(cli, ["verify", str(second_run)]).exit_code == 0


def test_wayback_run_keeps_the_tiles(fake, tmp_path):
    """Every tile a Wayback run used is in originals/, hash as fetched; verify checks it."""
    result = _wayback_detect(_wayback_config(fake, tmp_path), tmp_path / "out",
                             "--before-date", "2017-03-01/2017-06-30",
                             "--after-date", "2018-10-01/2018-12-31")
    assert result.exit_code == 0, result.output
    run = next((tmp_path / "out").glob("*/*/manifest.json")).parent
    manifest = json.loads((run / "manifest.json").read_text())
    used = {(i["role"], t["url"]): t["sha256"] for i in manifest["inputs"]
            for t in i["extra"]["tiles"] if t.get("sha256")}
    kept = {(o["input"], o["source_url"]): o for o in manifest["originals"]}
    assert used and set(kept) == set(used)
    for key, o in kept.items():
        assert o["how"] == "copy of cache entry" and "_tiles/" in o["path"]
        body = (run / o["path"]).read_bytes()
        assert hashlib.sha256(body).hexdigest() == o["sha256"] == used[key]
        assert body == fake.server.files[urlsplit(o["source_url"]).path][0]  # as served
    _assert_verify_catches_one_byte(run, next(iter(kept.values()))["path"])
