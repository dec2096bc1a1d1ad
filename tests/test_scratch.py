"""The chunked run's scratch store: dropped arrays' files are deleted on a thread of their own."""

from __future__ import annotations

import threading
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
from numpy.testing import assert_array_equal

import pipeline.run as run


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def _stored(scratch: run._Scratch, seed: int) -> tuple[np.ndarray, da.Array]:
    values = np.random.default_rng(seed).random((64, 96), dtype=np.float32)
    return values, scratch.keep(da.from_array(values, chunks=32))


def test_drop_deletes_on_another_thread_and_wait_joins_it(tmp_path, monkeypatch):
    deleted_by: list[str] = []
    real = run._delete_chunks

    def delete(folder, names):
        deleted_by.append(threading.current_thread().name)
        real(folder, names)

    monkeypatch.setattr(run, "_delete_chunks", delete)
    scratch = run._Scratch(tmp_path)
    values_a, a = _stored(scratch, 1)
    values_b, b = _stored(scratch, 2)
    assert len(_files(tmp_path)) == 12  # 2 x 3 chunks of each
    scratch.drop(a)
    scratch.wait()
    assert deleted_by == ["sitewatch-scratch-delete"]
    assert _files(tmp_path) == {f"array2-{i}-{j}.npy" for i in range(2) for j in range(3)}
    assert_array_equal(b.compute(), values_b)  # the other array is untouched
    scratch.drop(a)  # dropped already: nothing to delete, no thread
    assert deleted_by == ["sitewatch-scratch-delete"]


def test_drop_all_but_keeps_only_the_items(tmp_path):
    scratch = run._Scratch(tmp_path)
    _, a = _stored(scratch, 1)
    values_b, b = _stored(scratch, 2)
    _, c = _stored(scratch, 3)
    scratch.drop_all_but(b, np.zeros(3))  # NumPy data is not stored: ignored
    scratch.wait()
    assert _files(tmp_path) == {f"array2-{i}-{j}.npy" for i in range(2) for j in range(3)}
    assert list(scratch.files) == [b.name]
    assert_array_equal(b.compute(), values_b)


def test_drop_all_but_a_lazy_array_drops_nothing(tmp_path):
    """A kept item that is not stored may read the stored ones: none is deleted."""
    scratch = run._Scratch(tmp_path)
    _, a = _stored(scratch, 1)
    values_b, b = _stored(scratch, 2)
    lazy = a + b
    scratch.drop_all_but(lazy)
    scratch.wait()
    assert len(_files(tmp_path)) == 12
    assert_array_equal(lazy.compute(), a.compute() + values_b)


def test_a_file_that_cannot_be_deleted_is_left_without_a_traceback(tmp_path, monkeypatch):
    """The deleting thread swallows the error (no traceback on stderr); the file stays for
    the folder's removal at the end of the run."""
    raised: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: raised.append(args.exc_value))
    real_unlink = Path.unlink

    def unlink(self, *args, **kwargs):
        if self.name == "array1-0-0.npy":
            raise PermissionError(13, "Permission denied", str(self))
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", unlink)
    scratch = run._Scratch(tmp_path)
    _, a = _stored(scratch, 1)
    scratch.drop(a)
    scratch.wait()
    assert raised == []
    assert _files(tmp_path) == {"array1-0-0.npy"}


def test_scratch_folder_waits_for_deletions_then_removes_itself(tmp_path, monkeypatch):
    """The folder is removed only after the deleting threads ended (else its removal and
    theirs would race), also when the run fails."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    release, order = threading.Event(), []
    real = run._delete_chunks

    def slow(folder, names):
        release.wait(10)
        real(folder, names)
        order.append("deleted")

    monkeypatch.setattr(run, "_delete_chunks", slow)
    with pytest.raises(RuntimeError, match="boom"), run._scratch_folder() as scratch:
        _, a = _stored(scratch, 1)
        scratch.drop(a)
        threading.Timer(0.3, release.set).start()
        raise RuntimeError("boom")
    order.append("removed")
    assert order == ["deleted", "removed"]
    assert list(tmp_path.iterdir()) == []
