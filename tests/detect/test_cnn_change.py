"""Tests for pipeline.detect.cnn_change: the network's change mask, in memory and by blocks."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
from _helpers import SHARED_DATA, random_cnn_weights
from numpy.testing import assert_array_equal

from pipeline.detect.cnn_change import (
    MASK_NODATA,
    _tile_chunks,
    check_cnn_input,
    cnn_change_mask,
    cnn_probability,
)
from pipeline.detect.convnet import _parallel_probability, predict_change_cnn, tiled_probability
from pipeline.detect.learned import change_probability_mask
from pipeline.errors import ConfigError, PipelineError


def _real_crop(size: int) -> tuple[np.ndarray, np.ndarray]:
    """``size`` x ``size`` of the LEVIR-CD tile test_5 (both dates), or skip without it."""
    from pipeline.datasets import _read_png

    folder = SHARED_DATA / "levir_cd_tiles"
    paths = [folder / d / "levircd_test_5.png" for d in ("A", "B")]
    if not all(p.exists() for p in paths):
        pytest.skip(f"no LEVIR-CD tile under {folder}")
    a, b = (_read_png(p)[:, 1024 - size:, 1024 - size:] for p in paths)
    return np.ascontiguousarray(a), np.ascontiguousarray(b)


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """One BLAS thread, as in a detect run: OpenBLAS threads beside Dask's made the network's
    small matrix products about 3x slower on the shared 2-core machine."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def weights():
    """The shipped network's arrays."""
    from pipeline.models import load_cnn

    return load_cnn().weights


def test_cnn_probability_in_memory_is_predict_change_cnn(weights):
    """NumPy input: exactly `predict_change_cnn`, by default with the four mirrorings."""
    a, b = _real_crop(160)
    assert_array_equal(cnn_probability(a, b, weights=weights),
                       predict_change_cnn(a, b, weights=weights))
    assert_array_equal(cnn_probability(a, b, weights=weights, flips=False),
                       predict_change_cnn(a, b, weights=weights, flips=False))


def test_cnn_probability_chunked_equals_unchunked(weights):
    """Dask blocks (not whole tiles, rechunked), with nodata: the in-memory probability."""
    a, b = _real_crop(400)
    a[:, :50, :70] = np.nan
    b[:, 300:, 390:] = np.nan
    want = predict_change_cnn(a, b, weights=weights, tile_px=128, margin_px=64)
    with dask.config.set(scheduler="threads", num_workers=2):
        lazy = cnn_probability(da.from_array(a, chunks=(3, 150, 150)),
                               da.from_array(b, chunks=(3, 150, 150)),
                               weights=weights, tile_px=128, margin_px=64)
        assert isinstance(lazy, da.Array) and len(lazy.chunks[0]) == 3  # 128, 128, 144
        got = lazy.compute()
    assert_array_equal(np.isnan(got), np.isnan(want))
    # whole-scene statistics summed block by block: equal up to their last bits
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, equal_nan=True)
    assert np.nanmax(want) > 0.5 > np.nanmin(want)  # the crop has change and no change


def test_tile_chunks_whole_tiles_and_margin():
    """Chunks are whole tiles but the last, and a last piece under the margin is merged."""
    assert _tile_chunks(1000, 300, 128, 64) == (256, 256, 256, 232)
    assert _tile_chunks(1050, 2048, 512, 64) == (1050,)
    assert _tile_chunks(1060, 512, 512, 64) == (512, 548)
    assert _tile_chunks(1100, 256, 512, 64) == (512, 512, 76)
    assert _tile_chunks(1200, 512, 512, 64) == (512, 512, 176)


def test_cnn_change_mask_chunked_equals_numpy():
    """The decision rule on Dask blocks (regions across borders, nodata) equals NumPy's."""
    rng = np.random.default_rng(4)
    prob = np.clip(rng.normal(0.3, 0.25, (240, 260)), 0, 1).astype(np.float32)
    prob[100:140, 60:200] = 0.9  # one region across several blocks
    prob[10:13, 10:13] = 0.95  # a small one
    prob[200:, :30] = np.nan
    want = cnn_change_mask(prob, threshold=0.5, smooth_sigma_px=1.0, min_area_px=40)
    assert want.dtype == np.uint8 and (want[200:, :30] == MASK_NODATA).all()
    rule = change_probability_mask(prob, threshold=0.5, min_area_px=40, smooth_sigma_px=1.0)
    assert_array_equal(want == 1, rule)
    with dask.config.set(scheduler="threads", num_workers=2):
        got = cnn_change_mask(da.from_array(prob, chunks=64), threshold=0.5,
                              smooth_sigma_px=1.0, min_area_px=40).compute()
    assert_array_equal(got, want)
    assert (want == 1).any() and (want == 0).any()
    assert want[11, 11] == 0  # under 40 px: dropped


def test_check_cnn_input_refuses_coarse_grid_and_other_bands():
    """Coarser than the limit or not three bands: a PipelineError naming the fix."""
    check_cnn_input(1.0, 3, max_res_m=1.5)
    with pytest.raises(ConfigError, match=r"1\.5 m or finer.*10 m.*--building-model none"):
        check_cnn_input(10.0, 3, max_res_m=1.5)
    with pytest.raises(PipelineError, match="3 bands.*these have 4"):
        check_cnn_input(0.5, 4, max_res_m=1.5)


@pytest.mark.parametrize("flips", [False, True])
def test_cnn_probability_random_weights_chunked_equals_unchunked(flips):
    """Any weights, synthetic input, blocks of whole tiles: the in-memory probability, with
    one pass and with the four mirrorings (which differ)."""
    w = random_cnn_weights()
    rng = np.random.default_rng(2)
    a, b = rng.normal(100, 20, (2, 3, 200, 176)).astype(np.float32)
    want = predict_change_cnn(a, b, weights=w, flips=flips, tile_px=64, margin_px=32)
    got = cnn_probability(da.from_array(a, chunks=(3, 64, 128)),
                          da.from_array(b, chunks=(3, 64, 128)), weights=w, flips=flips,
                          tile_px=64, margin_px=32).compute(scheduler="sync")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    other = predict_change_cnn(a, b, weights=w, flips=not flips, tile_px=64, margin_px=32)
    assert np.abs(other - want).max() > 1e-3


@pytest.mark.parametrize("flips", [False, True])
def test_parallel_tiles_equal_the_tile_loop(flips):
    """Tiles as parallel tasks: the loop's probability, to the bit (same windows, same
    order)."""
    w = random_cnn_weights(seed=3)
    rng = np.random.default_rng(5)
    a, b = rng.normal(0, 1, (2, 3, 200, 176)).astype(np.float32)
    want = tiled_probability(a, b, w, 64, 32, flips=flips)
    with dask.config.set(scheduler="threads", num_workers=2):
        got = _parallel_probability(a, b, w, 64, 32, flips=flips)
    assert_array_equal(got, want)


def test_cnn_probability_blocks_read_their_windows_when_they_run():
    """The inputs' chunks are no tasks of the probability's graph (else the scheduler loads
    every block's input ahead of the slow network tasks); each block reads only its tiles'
    windows (plus margin), one at a time."""
    import pipeline.detect.cnn_change as cnn_change

    w = random_cnn_weights()
    rng = np.random.default_rng(6)
    a, b = rng.normal(100, 20, (2, 3, 200, 176)).astype(np.float32)
    lazy_a = da.from_array(a, chunks=(3, 64, 64))
    lazy_b = da.from_array(b, chunks=(3, 64, 64))
    prob = cnn_probability(lazy_a, lazy_b, weights=w, flips=False, tile_px=64, margin_px=32)
    inputs = set(lazy_a.__dask_graph__()) | set(lazy_b.__dask_graph__())
    assert not inputs & set(prob.__dask_graph__())
    assert prob.chunks == ((64, 64, 72), (64, 64, 48))
    read: list[tuple[int, int]] = []
    call = cnn_change._Windows.__call__

    def spy(self, ys, xs):
        read.append((ys.stop - ys.start, xs.stop - xs.start))
        return call(self, ys, xs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cnn_change._Windows, "__call__", spy)
        got = prob.compute(scheduler="sync")
    assert max(read) == (64 + 2 * 32, 64 + 2 * 32) and len(read) == 4 * 3
    want = predict_change_cnn(a, b, weights=w, flips=False, tile_px=64, margin_px=32)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
