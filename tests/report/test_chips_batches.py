"""Chips encoded on threads, read from files or from pixels handed in: the same PNGs."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_array_equal
from PIL import Image

from pipeline.report import chipset
from pipeline.report.chipset import chip_targets, write_chips
from report.test_chips import _block, _evidence, _pair


@pytest.mark.parametrize("chunked", [False, True])
def test_threads_and_sources_give_the_same_chips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 chunked: bool) -> None:
    """One encoding thread (the caller's), two or three, windows read from the files (each
    opened once) or taken from pixels handed in (NumPy, or Dask computed window by window):
    the same PNGs, listed in the targets' order."""
    from pipeline.fetch.local import read_to_grid

    before, after, plan = _pair(tmp_path)
    found = [_evidence("compound-0001", "compound", _block(18, 22, 32, 42), (before, after)),
             _evidence("compound-0002", "compound", _block(2, 2, 12, 14), (before, after),
                       score=0.7),
             _evidence("change-0001", "change", _block(40, 40, 55, 58), (before, after))]
    images = {role: read_to_grid(str(ref.path), plan, role=role, chunks=16 if chunked else None)[0]
              for role, ref in (("before", before), ("after", after))}
    written = {}
    encoders: list[str] = []
    original = chipset._write_target
    monkeypatch.setattr(chipset, "_write_target", lambda *a, **k: encoders.append(
        threading.current_thread().name) or original(*a, **k))
    for name, threads, pixels in (("one", 1, None), ("two", 2, None), ("three", 3, None),
                                  ("handed", 2, images)):
        (tmp_path / name).mkdir()
        encoders.clear()
        written[name] = write_chips(tmp_path / name, chip_targets(found, plan), found,
                                    plan=plan, images=pixels, threads=threads)
        # one thread: encoded on the calling thread, no pool; else on the pool's threads
        on_caller = {n == threading.current_thread().name for n in encoders}
        assert len(encoders) == 3 and on_caller == {threads == 1}
    assert list(written["one"]) == ["compound-0001", "compound-0002", "change-0001"]
    for name in ("two", "three", "handed"):
        assert written[name] == written["one"] and list(written[name]) == list(written["one"])
        for paths in written["one"].values():
            for rel in paths.values():
                a, b = Image.open(tmp_path / "one" / rel), Image.open(tmp_path / name / rel)
                assert a.info == b.info
                assert_array_equal(np.asarray(a), np.asarray(b))


def test_stretch_pair_equals_the_plain_formula() -> None:
    """The in-place stretch gives the bytes of the plain float64 formula (NaN, inf, flat)."""
    from pipeline.report.chips import NODATA_RGB, stretch_pair

    rng = np.random.default_rng(5)
    for n_bands, scale in ((3, 255.0), (1, 1e4), (4, 1.0), (3, 0.0)):
        before = (rng.random((n_bands, 37, 41)) * scale).astype(np.float32)
        after = (rng.random((n_bands, 37, 41)) * scale + 3).astype(np.float32)
        before[:, :3] = np.nan
        after[0, 5, 5], after[-1, 6, 6] = np.inf, -np.inf
        bands = [0, 1, 2] if n_bands >= 3 else [0, 0, 0]
        got = stretch_pair(before, after)
        for image, rgb in zip((before, after), got, strict=True):
            expected = np.zeros((*image.shape[1:], 3), np.uint8)
            for channel, band in enumerate(bands):
                both = np.concatenate([before[band].ravel(), after[band].ravel()])
                low, high = np.percentile(both[np.isfinite(both)], (2.0, 98.0))
                span = high - low if high > low else 1.0
                scaled = np.clip((image[band] - low) / span, 0.0, 1.0) * 255.0
                expected[..., channel] = np.nan_to_num(np.round(scaled), nan=0.0).astype(np.uint8)
            expected[~np.isfinite(image[bands]).all(axis=0)] = NODATA_RGB
            assert_array_equal(rgb, expected)


def test_each_thread_reads_with_its_own_files_and_all_are_closed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With two threads the windows are read on the pool's threads, each reader (a file
    handle, not thread-safe) by one thread only, and every reader is closed at the end;
    with one thread, one reader per date on the caller."""
    before, after, plan = _pair(tmp_path)
    found = [_evidence(f"compound-{k:04d}", "compound", _block(4 * k, 4 * k, 4 * k + 12,
                                                               4 * k + 14), (before, after))
             for k in range(1, 7)]
    readers: list[dict] = []
    original = chipset.GridWindows

    class Spy(original):  # type: ignore[misc, valid-type]
        def __init__(self, *a, **k) -> None:
            super().__init__(*a, **k)
            self.log = {"threads": set(), "closed": False}
            readers.append(self.log)

        def read(self, window):
            self.log["threads"].add(threading.current_thread().name)
            return super().read(window)

        def close(self) -> None:
            self.log["closed"] = True
            super().close()

    monkeypatch.setattr(chipset, "GridWindows", Spy)
    for name, threads in (("one", 1), ("two", 2)):
        readers.clear()
        (tmp_path / name).mkdir()
        written = write_chips(tmp_path / name, chip_targets(found, plan), found, plan=plan,
                              threads=threads)
        assert len(written) == 6
        assert all(r["closed"] and len(r["threads"]) == 1 for r in readers)
        used = set().union(*(r["threads"] for r in readers))
        if threads == 1:
            assert len(readers) == 2 and used == {threading.current_thread().name}
        else:
            assert threading.current_thread().name not in used
            assert len(readers) == 2 * len(used) and 1 <= len(used) <= 2
