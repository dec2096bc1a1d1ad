"""scripts/doc_section.py: one script's ``## `` section of a shared Markdown report.

Several benchmark scripts write into ``docs/benchmarks.md``; each owns the sections it writes
and must leave the others as they are. :func:`write_section` puts one section in (in place of
the old one, or at the end) and writes the whole file atomically (``pipeline.files``), so a
reader or a killed run never sees half a report.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from pipeline.files import atomic_write_text  # noqa: E402  (after the path set-up above)

__all__ = ["replace_section", "write_section"]


def replace_section(text: str, section: str) -> str:
    """``text`` with the section that has ``section``'s heading (its first line, ``## ...``)
    replaced by ``section``, up to the next ``## `` heading; appended if absent."""
    heading = section.split("\n", 1)[0]
    if not heading.startswith("## "):
        raise ValueError(f"a section starts with its '## ' heading, not {heading!r}")
    start = 0 if text.startswith(heading + "\n") else text.find("\n" + heading + "\n") + 1
    if start == 0 and not text.startswith(heading + "\n"):
        return text.rstrip("\n") + "\n\n" + section
    end = text.find("\n## ", start + len(heading))
    return text[:start] + section + (text[end:] if end >= 0 else "")


def write_section(path: Path, section: str, *, title: str = "# Benchmarks\n") -> None:
    """Put ``section`` into the Markdown file ``path`` (made with ``title`` if missing),
    written whole to a temporary file beside it and renamed over it."""
    old = path.read_text(encoding="utf-8") if path.exists() else title
    atomic_write_text(path, replace_section(old, section), overwrite=True)
