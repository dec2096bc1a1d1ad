"""The walkthrough notebooks run top to bottom against the current code (never go stale)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from _helpers import ROOT

NOTEBOOK = ROOT / "notebooks" / "dabancheng.ipynb"


def test_notebook_is_stored_without_outputs() -> None:
    """The committed notebook has no outputs or execution counts (stripped in git)."""
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)


def test_dabancheng_notebook_executes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every cell runs without error; it shows images, the findings table and a verified run."""
    nbformat = pytest.importorskip("nbformat", reason="nbformat is a dev dependency")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is a dev dependency")
    pytest.importorskip("matplotlib", reason="matplotlib is a dev dependency")
    monkeypatch.setenv("SITEWATCH_NOTEBOOK_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # the two dates, magnitude and mask, the overlay, the chips
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "compound-0001" in html  # the findings table
    text = "".join(o.get("text", "") for o in outputs)
    assert "verified" in text and "CHANGED" not in text
    (run_dir,) = [p for p in (tmp_path / "out").glob("*/*") if p.is_dir()]
    assert (run_dir / "changes.gpkg").is_file()
    assert os.environ["SITEWATCH_NOTEBOOK_OUT"] == str(tmp_path / "out")
