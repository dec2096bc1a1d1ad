"""Names from input never reach a shell: `make detect AOI='1,2; rm -rf ~'` is only a bad AOI,
and http(s) is the only scheme a configured URL or a redirect may lead to."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from _helpers import ROOT
from fetch.servers import LoopbackServer, serve

from pipeline.errors import FetchError
from pipeline.fetch.base import FetchContext
from pipeline.fetch.http import HttpClient

MAKE = shutil.which("make")
# The install stamp is taken as up to date (-o): the test never reinstalls the venv.
STAMP = ".venv/.installed"
_NEEDS_MAKE = pytest.mark.skipif(MAKE is None or not (ROOT / STAMP).exists(),
                                 reason="needs make and the installed venv")


def _make(target: str, tmp_path: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    args = [MAKE or "make", "-s", "-o", STAMP, target,
            *(f"{name}={value}" for name, value in variables.items())]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)


@_NEEDS_MAKE
@pytest.mark.parametrize("template", [
    "1,2; touch {s}",
    "1,2' ; touch {s}; echo ' && touch {s} \" $$(touch {s}) `touch {s}`",
    "1,2\ntouch {s}",
])
def test_make_detect_aoi_is_never_run_by_a_shell(template: str, tmp_path: Path) -> None:
    """Shell syntax in AOI is just a bad AOI: exit non-zero with the AOI message, no sentinel."""
    sentinel = tmp_path / "sentinel"
    result = _make("detect", tmp_path, AOI=template.format(s=sentinel), OUT=str(tmp_path / "o"))
    assert not sentinel.exists(), "the AOI text was executed by a shell"
    assert result.returncode != 0
    assert "is not valid" in result.stderr and "Write the AOI as" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.geojson"))


@_NEEDS_MAKE
def test_make_detect_other_variables_are_quoted(tmp_path: Path) -> None:
    """The other user values reach the command as single arguments too (one run, all set)."""
    names = ["OUT", "BEFORE", "AFTER", "CONFIG", "SOURCE", "BEFORE_DATE", "AFTER_DATE",
             "RADIUS_M"]
    values = {name: f"x; touch {tmp_path / name}" for name in names}
    result = _make("detect", tmp_path, AOI="88.29,43.38", **values)
    assert not [n for n in names if (tmp_path / n).exists()], "a value was run by a shell"
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert "Error:" in result.stderr, result.stderr


@_NEEDS_MAKE
def test_make_watch_sites_is_quoted(tmp_path: Path) -> None:
    """SITES with shell syntax is a missing site file (exit 2), not a command."""
    sentinel = tmp_path / "sentinel"
    result = _make("watch", tmp_path, SITES=f"x.geojson; touch {sentinel}",
                   OUT=str(tmp_path / "o"), OFFLINE="1")
    assert not sentinel.exists()
    assert result.returncode != 0 and "does not exist" in result.stderr, result.stderr


@_NEEDS_MAKE
@pytest.mark.parametrize("target", ["detect", "watch"])
def test_make_empty_out_is_a_usage_error(target: str, tmp_path: Path) -> None:
    """`make detect OUT=` (an empty variable) is refused (exit 2, 'empty'), not a run that
    writes into the project folder; the missing input would stop it later in any case."""
    extra = ({"BEFORE": str(tmp_path / "a.tif"), "AFTER": str(tmp_path / "b.tif")}
             if target == "detect" else {"SITES": str(tmp_path / "none.geojson")})
    result = _make(target, tmp_path, OUT="", **extra)
    assert result.returncode == 2, result.stderr
    assert "'--out': the folder name is empty" in result.stderr, result.stderr


@pytest.mark.parametrize("location", ["ftp://127.0.0.1/a.png", "file:///etc/passwd",
                                      "gopher://127.0.0.1/", "data:image/png;base64,iVBORw0K",
                                      "javascript:alert(1)", "FILE:///etc/passwd"])
def test_redirect_to_other_scheme_is_refused(location: str, tmp_path: Path) -> None:
    """A 302 to any scheme but http/https is refused before a request is made there."""
    server: LoopbackServer
    with serve({"/a.png": b"\x89PNG\r\n\x1a\n"}) as server:
        server.fault("/a.png", "redirect", location=location)
        client = HttpClient(FetchContext(cache_dir=tmp_path, timeout_s=2.0, max_retries=0),
                            backoff_s=0.01)
        with pytest.raises(FetchError, match="not an http"):
            client.get_bytes(server.url("/a.png"))
        assert server.count("/a.png") == 1


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://x/y", "/etc/passwd",
                                 "HTTP:/no-slashes", "  https://x", "javascript:x"])
def test_config_url_other_schemes_refused(url: str, tmp_path: Path) -> None:
    """A source URL in the config must be http(s); anything else is a ConfigError."""
    from pipeline.config import load_sources
    from pipeline.errors import ConfigError

    path = tmp_path / "sources.toml"
    path.write_text(f"[sources.x]\ntype = 'xyz'\nurl = '{url}'\n")
    with pytest.raises(ConfigError, match="only http"):
        load_sources(path)


@_NEEDS_MAKE
@pytest.mark.parametrize(("value", "on"), [("", False), ("0", False), ("no", False),
                                           ("False", False), ("OFF", False), ("1", True),
                                           ("yes", True), ("1; touch pwned", True)])
def test_make_switches_are_off_for_0_no_false_off(value: str, on: bool, tmp_path: Path) -> None:
    """OFFLINE=0 (no, false, off) leaves --offline out of the command make runs, as FORCE and
    JSON do theirs; any other value turns it on, and only the literal flag reaches the shell
    (make -n: the commands are printed, not run)."""
    for target, names in (("detect", ["OFFLINE"]), ("watch", ["FORCE", "OFFLINE", "JSON"])):
        printed = subprocess.run(
            [MAKE or "make", "-n", "-o", STAMP, target, *(f"{n}={value}" for n in names)],
            cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
        for name in names:
            assert (f"--{name.lower()}" in printed) is on, printed
        assert "pwned" not in printed
