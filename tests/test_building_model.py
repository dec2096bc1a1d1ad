"""Tests for pipeline.building_model: the network's change mask inside a detect run."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import xarray as xr
from _helpers import random_cnn_weights

from pipeline.building_model import cnn_mask
from pipeline.detect.cnn_change import cnn_change_mask, cnn_probability
from pipeline.models import CnnModel


class _Store:
    """A stand-in for the run's scratch store: 'stores' a Dask array by computing it."""

    def __init__(self) -> None:
        self.kept: list[str] = []
        self.dropped: list[str] = []
        self.stored: set[str] = set()

    def keep(self, *items, also=()):
        out = []
        for item in items:
            data = item.data if isinstance(item, xr.DataArray) else item
            if isinstance(data, da.Array) and data.name not in self.stored:
                self.kept.append(data.name)
                data = da.from_array(data.compute(), chunks=data.chunks,
                                     name=f"stored-{len(self.stored)}")
                self.stored.add(data.name)
                item = item.copy(data=data) if isinstance(item, xr.DataArray) else data
            out.append(item)
        result = out[0] if len(out) == 1 else out
        return (result, dask.compute(*also)) if also else result

    def drop(self, *items):
        for item in items:
            data = item.data if isinstance(item, xr.DataArray) else item
            self.dropped.append(getattr(data, "name", ""))


def test_cnn_mask_stores_a_lazy_input_while_the_network_reads_it():
    """A lazy after (e.g. the shift) is stored before the network's window reads and dropped
    after; an input already stored is not stored again; the mask is the direct rule's."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(100, 20, (2, 3, 96, 80)).astype(np.float32)
    b[:, 30:50, 20:40] += 60
    store = _Store()
    before = store.keep(xr.DataArray(da.from_array(a, chunks=(3, 64, 64)),
                                     dims=("band", "y", "x")))
    store.kept.clear()
    after = xr.DataArray(da.from_array(b, chunks=(3, 64, 64)) + 0, dims=("band", "y", "x"))
    mask = xr.DataArray(da.zeros((96, 80), np.uint8, chunks=64), dims=("y", "x"))
    model = CnnModel(weights=random_cnn_weights(), threshold=0.5, smooth_sigma_px=1.0,
                     min_area_m2=2.0, card={"model_file": "m.npz", "model_sha256": "0"})
    got, info = cnn_mask(before, after, mask, model, res_m=1.0, scratch=store)
    assert store.kept[0] == after.data.name  # the lazy after, first
    assert "stored-1" in store.dropped  # its stored copy, once read
    assert before.data.name not in store.kept and before.data.name not in store.dropped
    prob = cnn_probability(a, b, weights=model.weights)
    want = cnn_change_mask(prob, threshold=0.5, smooth_sigma_px=1.0, min_area_px=2)
    np.testing.assert_array_equal(got.values, want)
    assert info["changed_share"] == float((want == 1).mean())
    assert "bounding box" in info["nodata_edge"]
