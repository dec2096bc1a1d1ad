"""The documents stay true: the commands they show run and print what they say; links resolve.

A command is run when it sits in a ```` ```console ```` block of README.md or docs/*.md, on a
line starting ``$ `` (a line ending in ``\\`` continues on the next one). The lines after it,
up to the next ``$ ``, are what it prints (stdout, then stderr), compared line by line with runs
of whitespace equal: ``...`` skips any number of lines, ``<run-id>``, ``<version>``,
``<path>`` and ``<seconds>`` match one word, and ``(exit status N)`` is the expected exit
status (default 0).
In a command, ``DIR/<run-id>`` is the newest run folder under ``DIR``.

Each document's commands run in order in their own scratch folder, which links to every
top-level entry of the project except the folders the documented runs write (``out``,
``evidence``, ``watchdata``: so they land there, not in the checkout), with an empty download
cache and every HTTP proxy pointed at a closed port (a command that reaches for the internet
fails instead of fetching). Shell blocks that are not
run (``sh``, ``bash``, ``shell``) must say why in a ``<!-- not run: ... -->`` comment above.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED_DOCS = DOCS + [p for p in (ROOT / "scripts" / "README.md", ROOT / "seeds" / "README.md",
                                  ROOT / "seeds" / "sites" / "README.md") if p.exists()]
SHELL_LANGS = {"sh", "bash", "shell"}
NOT_RUN = re.compile(r"<!--\s*not run\b[^:]*:\s*\S.*-->")
PLACEHOLDER = re.compile(r"<(run-id|version|path|seconds)>")
EXIT = re.compile(r"^\(exit status (\d+)\)$")
# The scratch folder keeps its own output folders; everything else links to the checkout.
LOCAL_ENTRIES = {"out", "evidence", "watchdata", ".git", "aspi.geojson", "pyproject.toml"}
COMMAND_TIMEOUT_S = 600


@dataclass
class Fence:
    """A fenced code block: its language, first line number (1-based) and body lines."""

    lang: str
    line: int
    body: list[str]
    before: str  # the nearest non-blank line above the opening fence


@dataclass
class Command:
    """A ``$ `` command of a console block and what the document says it prints."""

    doc: Path
    line: int
    text: str
    expected: list[str] = field(default_factory=list)
    exit_status: int = 0

    def where(self) -> str:
        """``README.md:36`` style location."""
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def fences(text: str) -> list[Fence]:
    """Every fenced code block of a Markdown text."""
    found, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^(`{3,})\s*([\w-]*)", lines[i])
        if not m:
            i += 1
            continue
        before = next((x for x in reversed(lines[:i]) if x.strip()), "")
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith(m.group(1))),
                   len(lines))
        found.append(Fence(m.group(2).lower(), i + 1, lines[i + 1:end], before))
        i = end + 1
    return found


def commands(doc: Path) -> list[Command]:
    """The commands of a document's console blocks, in order."""
    out: list[Command] = []
    for fence in fences(doc.read_text(encoding="utf-8")):
        if fence.lang != "console":
            continue
        current, continuing = None, False
        for offset, raw in enumerate(fence.body, start=1):
            if continuing and current is not None:
                current.text += " " + raw.strip().rstrip("\\").strip()
                continuing = raw.rstrip().endswith("\\")
            elif raw.startswith("$ "):
                current = Command(doc, fence.line + offset, raw[2:].rstrip().rstrip("\\").strip())
                continuing = raw.rstrip().endswith("\\")
                out.append(current)
            elif current is not None and (m := EXIT.match(raw.strip())):
                current.exit_status = int(m.group(1))
            elif current is not None and raw.strip():
                current.expected.append(raw)
    return out


def _line_regex(expected: str) -> re.Pattern[str]:
    parts = []
    for word in expected.split():
        pieces = PLACEHOLDER.split(word)
        # split() with one group alternates text, group name, text ...
        parts.append("".join(re.escape(p) if k % 2 == 0 else r"\S+?"
                             for k, p in enumerate(pieces)))
    return re.compile(r"\s+".join(parts) + r"\Z")


def match_output(expected: list[str], actual: list[str]) -> str | None:
    """None when ``actual`` shows ``expected``; else what differs, in one sentence.

    Expected lines match actual lines one to one and in order, whitespace runs equal;
    ``...`` skips any number of lines. Without a final ``...`` the output must end there.
    """
    actual = [" ".join(a.split()) for a in actual if a.strip()]

    def walk(e: int, a: int) -> int | None:
        """Index of the first expected line that cannot be matched from (e, a), or None."""
        if e == len(expected):
            return None if a == len(actual) else e
        if expected[e].strip() == "...":
            worst = e + 1
            for start in range(a, len(actual) + 1):
                failed = walk(e + 1, start)
                if failed is None:
                    return None
                worst = max(worst, failed)
            return worst
        if a < len(actual) and _line_regex(expected[e].strip()).match(actual[a]):
            return walk(e + 1, a + 1)
        return e

    failed = walk(0, 0)
    if failed is None:
        return None
    if failed == len(expected):
        return f"the output goes on after the last line shown: {actual[-1]!r}"
    return f"no output line matches {' '.join(expected[failed].split())!r}"


def _newest_run(folder: Path) -> str:
    runs = sorted(p.parent.name for p in folder.glob("*/manifest.json"))
    return runs[-1] if runs else "<no-run-yet>"


def resolve(text: str, cwd: Path) -> str:
    """Replace ``DIR/<run-id>`` in a command by the newest run folder under ``cwd/DIR``."""
    return re.sub(r"(\S+?)/<run-id>",
                  lambda m: f"{m.group(1)}/{_newest_run(cwd / m.group(1))}", text)


def make_sandbox(path: Path) -> Path:
    """A scratch folder that links to the checkout's entries but keeps its outputs."""
    path.mkdir(parents=True, exist_ok=True)
    for entry in ROOT.iterdir():
        if entry.name not in LOCAL_ENTRIES:
            (path / entry.name).symlink_to(entry)
    # make's setup rule compares .venv/.installed with pyproject.toml: the doc test checks the
    # documents against the environment as installed, it does not reinstall it.
    shutil.copy2(ROOT / "pyproject.toml", path / "pyproject.toml")
    stamp = ROOT / ".venv" / ".installed"
    if stamp.exists():
        t = stamp.stat().st_mtime - 1
        os.utime(path / "pyproject.toml", (t, t))
    return path


def offline_env(cache: Path) -> dict[str, str]:
    """The test's environment: an empty cache, no make variables, proxies to a closed port."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"AOI", "OUT", "BEFORE", "AFTER", "RADIUS_M", "CONFIG", "SOURCE",
                        "BEFORE_DATE", "AFTER_DATE", "OFFLINE", "SITES", "SCHEDULER", "FORCE",
                        "JSON", "SITEWATCH_CONFIG", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    closed = "http://127.0.0.1:9"
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                "all_proxy"):
        env[key] = closed
    env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
               SITEWATCH_CACHE=str(cache), GDAL_HTTP_TIMEOUT="5")
    return env


def run_command(cmd: Command, cwd: Path, env: dict[str, str]) -> str | None:
    """Run one documented command; None if it did what the document says, else why not."""
    shell_text = resolve(cmd.text, cwd)
    proc = subprocess.run(shell_text, shell=True, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT_S)
    output = proc.stdout.splitlines() + proc.stderr.splitlines()
    if proc.returncode != cmd.exit_status:
        tail = "\n".join(output[-8:])
        return (f"{cmd.where()}: `{cmd.text}` exited {proc.returncode}, the document says "
                f"{cmd.exit_status}; its output ends:\n{tail}")
    problem = match_output(cmd.expected, output)
    if problem:
        shown = "\n".join(output[:12])
        return f"{cmd.where()}: `{cmd.text}`: {problem}; it printed:\n{shown}"
    return None


@pytest.fixture(scope="module")
def doc_runs(tmp_path_factory) -> dict[Path, tuple[Path, list[str]]]:
    """Every document's commands run once: its scratch folder and the problems found."""
    results = {}
    for doc in DOCS:
        cmds = commands(doc)
        if not cmds:
            continue
        base = tmp_path_factory.mktemp(doc.stem.replace(".", "_"))
        sandbox, env = make_sandbox(base / "project"), offline_env(base / "cache")
        results[doc] = (sandbox, [p for c in cmds if (p := run_command(c, sandbox, env))])
    return results


def _doc_ids() -> list[str]:
    return [str(d.relative_to(ROOT)) for d in DOCS if commands(d)]


@pytest.mark.parametrize("doc_name", _doc_ids())
def test_docs_commands_print_what_the_document_says(doc_runs, doc_name):
    """Every console command of the document exits as shown and prints the lines shown."""
    _, problems = doc_runs[ROOT / doc_name]
    assert not problems, "\n\n".join(problems)


def test_docs_readme_runs_make_detect_and_verify():
    """The README shows the default run, and the evidence checks, as commands that are run."""
    texts = [c.text for c in commands(ROOT / "README.md")]
    assert "make detect" in texts
    assert any(t.startswith(".venv/bin/sitewatch verify ") for t in texts)
    assert not any(t.startswith("make test") for t in texts)  # it would run this test


def test_docs_readme_picture_comes_from_the_run(doc_runs, tmp_path):
    """scripts/readme_picture.py makes, from the README's make detect run, the committed
    picture (same size and pixels), and the README shows that picture."""
    sandbox, _ = doc_runs[ROOT / "README.md"]
    run = sandbox / "out" / "dabancheng" / _newest_run(sandbox / "out" / "dabancheng")
    out = tmp_path / "picture.png"
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "python"),
                           str(ROOT / "scripts" / "readme_picture.py"), str(run), "--output",
                           str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    committed = ROOT / "docs" / "img" / "dabancheng_compound.png"
    with Image.open(out) as made, Image.open(committed) as shown:
        assert made.size == shown.size
        made_px = np.asarray(made.convert("RGB"), dtype=np.int16)
        shown_px = np.asarray(shown.convert("RGB"), dtype=np.int16)
    # the same pixels: PNG is lossless and the chips are made deterministically; 2 levels
    # allow only for rounding in another library version's stretch, not a moved outline
    off = np.abs(made_px - shown_px).max(axis=-1) > 2
    assert not off.any(), (f"{int(off.sum())} of {off.size} pixels differ from the committed "
                           "picture: regenerate it with scripts/readme_picture.py")
    assert "](docs/img/dabancheng_compound.png)" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_docs_shell_blocks_not_run_say_why(doc):
    """A shell block outside the console blocks carries a `<!-- not run: why -->` comment."""
    silent = [f"{doc.name}:{f.line}" for f in fences(doc.read_text(encoding="utf-8"))
              if f.lang in SHELL_LANGS and not NOT_RUN.search(f.before)]
    assert not silent, f"shell blocks neither run nor marked '<!-- not run: why -->': {silent}"


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading.strip().lower()).replace("`", "")
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    """Anchors of a Markdown file's headings (outside code blocks), duplicates numbered."""
    seen: dict[str, int] = {}
    code_lines = {f.line + k for f in fences(doc.read_text(encoding="utf-8"))
                  for k in range(len(f.body) + 2)}
    for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), start=1):
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m and number not in code_lines:
            slug = github_slug(m.group(1))
            seen[slug] = seen.get(slug, -1) + 1
    return {s if n == 0 else f"{s}-{n}" for s, count in seen.items() for n in range(count + 1)}


def links(doc: Path) -> list[tuple[int, str]]:
    """Relative link and image targets of a Markdown file, outside code, with line numbers."""
    text = doc.read_text(encoding="utf-8")
    code_lines = {f.line + k for f in fences(text) for k in range(len(f.body) + 2)}
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        if number in code_lines:
            continue
        line = re.sub(r"`[^`]*`", "", line)
        for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", line):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):
                found.append((number, target))
    return found


@pytest.mark.parametrize("doc", LINKED_DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_docs_links_and_images_resolve(doc):
    """Every relative link names an existing file (and heading); every image exists."""
    broken = []
    for number, target in links(doc):
        path_part, _, anchor = target.partition("#")
        dest = (doc.parent / path_part).resolve() if path_part else doc
        if not dest.exists():
            broken.append(f"{doc.name}:{number}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{doc.name}:{number}: {target} (no heading #{anchor})")
    assert not broken, "\n".join(broken)


def test_docs_output_matcher_catches_differences():
    """The matcher accepts the shown lines and rejects a changed, missing or extra line."""
    shown = ["wrote out/a/<run-id>", "x  1", "...", "summary 2"]
    assert match_output(shown, ["wrote out/a/2026X-1", "x\t1", "y", "z", "summary\t2"]) is None
    assert match_output(shown, ["wrote out/a/2026X-1", "x 1", "summary 2"]) is None
    assert "x 1" in match_output(shown, ["wrote out/a/r", "x 2", "summary 2"])
    assert "summary 2" in match_output(shown, ["wrote out/a/r", "x 1", "summary 3"])
    assert "goes on" in match_output(shown, ["wrote out/a/r", "x 1", "summary 2", "more"])
    assert match_output(["ok <path>."], ["ok /tmp/a b."]) is not None
    assert github_slug("What `make detect` shows") == "what-make-detect-shows"
    assert github_slug("Watch: scheduled runs, over sites") == "watch-scheduled-runs-over-sites"


def _table_rows(text: str) -> list[list[str]]:
    """Cells of the Markdown table rows of a text."""
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.lstrip().startswith("|")]


def test_docs_method_parameter_defaults_match_the_config():
    """Every `section.key` row of method.md's tables shows the default of configs/default.toml."""
    import tomllib

    config = tomllib.loads((ROOT / "configs" / "default.toml").read_text(encoding="utf-8"))
    checked, wrong = 0, []
    for cells in _table_rows((ROOT / "docs" / "method.md").read_text(encoding="utf-8")):
        keys = re.findall(r"`([\w.]+)`", cells[0]) if len(cells) > 1 else []
        if not keys or "." not in keys[0]:
            continue
        section, values = keys[0].split(".")[0], re.findall(r"`([^`]+)`", cells[1])
        if not values:  # a key without a default (change.threshold: automatic)
            continue
        if len(values) != len(keys):
            wrong.append(f"{cells[0]}: {len(keys)} keys, {len(values)} values")
            continue
        for key, shown in zip(keys, values, strict=True):
            name = key.split(".")[-1]
            have = config.get(section, {}).get(name, "<missing from default.toml>")
            checked += 1
            if tomllib.loads(f"v = {shown}")["v"] != have:
                wrong.append(f"{section}.{name}: method.md says {shown}, default.toml {have!r}")
    assert checked >= 40, f"only {checked} parameters found in method.md's tables"
    assert not wrong, "\n".join(wrong)


def test_docs_analyst_guide_names_real_properties():
    """Every property the analyst guide's tables explain is a name the pipeline writes."""
    source = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "pipeline").rglob("*.py"))
    text = (ROOT / "docs" / "analyst-guide.md").read_text(encoding="utf-8")
    section = text[text.index("## 4. Reading a finding"):text.index("## 5. QGIS")]
    names = {n for cells in _table_rows(section) for n in re.findall(r"`(\w+)`", cells[0])}
    assert len(names) >= 30, names
    unknown = sorted(n for n in names if f'"{n}"' not in source and f"'{n}'" not in source)
    assert not unknown, f"the guide explains properties the code never writes: {unknown}"


def _script(name: str, monkeypatch: pytest.MonkeyPatch):
    """A module of scripts/ (which import each other by name)."""
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    return importlib.import_module(name)


def test_doc_section_replaces_only_its_own_section(monkeypatch, tmp_path):
    """write_section swaps one ## section in place (others byte for byte), appends a missing
    one, and leaves no temporary file; the current report is unchanged by its own section."""
    doc_section = _script("doc_section", monkeypatch)
    report = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    heading = "## Co-registration: ours against AROSICS"
    own = report[report.index(heading):]
    own = own[:own.find("\n## ") + 1] if "\n## " in own else own
    assert doc_section.replace_section(report, own) == report
    path = tmp_path / "benchmarks.md"
    path.write_text("# B\n\n## One\nold one\n\n## Two\nkept\n", encoding="utf-8")
    doc_section.write_section(path, "## One\nnew one\n")
    assert path.read_text() == "# B\n\n## One\nnew one\n\n## Two\nkept\n"
    doc_section.write_section(path, "## Three\nadded\n")
    doc_section.write_section(path, "## Two\nnew two\n")
    assert path.read_text() == ("# B\n\n## One\nnew one\n\n## Two\nnew two\n\n"
                                "## Three\nadded\n")
    assert [p.name for p in tmp_path.iterdir()] == ["benchmarks.md"]
    with pytest.raises(ValueError, match="heading"):
        doc_section.replace_section("# B\n", "no heading\n")


def test_bench_coreg_section_names_the_measured_cores(monkeypatch):
    """bench_coreg's report states the core count the run recorded, not a fixed one."""
    bench_coreg = _script("bench_coreg", monkeypatch)
    result = {"date": "2026-01-01 00:00 UTC", "argv": [], "repeat": 1, "git": "abc",
              "cores": 7, "load_start": "1.00", "load_end": "1.00", "arosics_problem": None,
              "cases": []}
    text = bench_coreg.markdown_section(result)
    assert "(7 cores)" in text and "2 cores" not in text


def test_bench_findings_list_compound_grades_and_towers(monkeypatch):
    """make bench's findings table counts the compounds per grade and the watchtowers (the
    bench scenes have none, so any is a false one); results of an earlier bench show '-'."""
    bench = _script("bench", monkeypatch)
    assert bench._grades({"grades": [1, 3, 1, None], "watchtowers": 5}) == (
        "grade 1: 2, grade 3: 1, grade None: 1; 5")
    assert bench._grades({"grades": [], "watchtowers": 0}) == "none; 0"
    assert bench._grades({"counts": {}}) == "-"
