"""Chip windows read in batches and encoded on threads give the chips of one window at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_array_equal
from PIL import Image

from pipeline.report import chipset
from pipeline.report.chipset import chip_targets, write_chips
from report.test_chips import _block, _evidence, _pair


@pytest.mark.parametrize("chunked", [False, True])
def test_batches_and_threads_give_the_same_chips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 chunked: bool) -> None:
    from pipeline.fetch.local import read_to_grid

    before, after, plan = _pair(tmp_path)
    found = [_evidence("compound-0001", "compound", _block(18, 22, 32, 42), (before, after)),
             _evidence("compound-0002", "compound", _block(2, 2, 12, 14), (before, after),
                       score=0.7),
             _evidence("change-0001", "change", _block(40, 40, 55, 58), (before, after))]
    images = {role: read_to_grid(str(ref.path), plan, role=role, chunks=16 if chunked else None)[0]
              for role, ref in (("before", before), ("after", after))}
    written = {}
    for name, batch_px, threads in (("one", 1, 1), ("all", 1 << 30, 2), ("some", 900, 2)):
        monkeypatch.setattr(chipset, "READ_BATCH_PX", batch_px)
        monkeypatch.setattr(chipset, "ENCODE_THREADS", threads)
        (tmp_path / name).mkdir()
        written[name] = write_chips(tmp_path / name, chip_targets(found, plan), found,
                                    plan=plan, images=images)
    assert list(written["one"]) == ["compound-0001", "compound-0002", "change-0001"]
    for name in ("all", "some"):
        assert written[name] == written["one"]
        for paths in written["one"].values():
            for rel in paths.values():
                a, b = Image.open(tmp_path / "one" / rel), Image.open(tmp_path / name / rel)
                assert a.info == b.info
                assert_array_equal(np.asarray(a), np.asarray(b))
