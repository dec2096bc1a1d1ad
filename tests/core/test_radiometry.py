"""Tests for pipeline.core.radiometry: per-band histogram and linear matching."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from pipeline.core.radiometry import normalize
from pipeline.errors import GridError, NoValidDataError
from pipeline.testing import make_pair

BLOCK = np.s_[20:60, 30:90]


def _unchanged(shape=(128, 128)):
    keep = np.ones(shape, bool)
    keep[BLOCK] = False
    return keep


def test_normalize_linear_recovers_gain_offset_exactly():
    """Without noise, 'linear' undoes gain and offset outside a large changed block."""
    before, after = make_pair(shape=(128, 128), change=BLOCK, gain=1.3, offset=-20.0)
    out = normalize(before, after, method="linear")
    keep = _unchanged()
    assert_allclose(out.values[:, keep], before.values[:, keep], atol=1e-3)


def test_normalize_linear_with_noise_is_unbiased():
    """With noise, 'linear' leaves no systematic difference on unchanged pixels."""
    before, after = make_pair(shape=(128, 128), change=BLOCK, gain=0.7, offset=35.0, noise=2.0)
    out = normalize(before, after, method="linear")
    diff = (out.values - before.values)[:, _unchanged()]
    assert np.abs(diff.mean(axis=1)).max() < 0.3
    # residual spread is the noise of both dates (sqrt(2) * 2 after scaling by 1/0.7)
    assert diff.std(axis=1).max() < 4.5


def test_normalize_histogram_matches_quantiles():
    """'histogram' makes after's quantiles equal before's, band by band."""
    before, after = make_pair(shape=(128, 128), change=None, gain=1.5, offset=12.0, noise=1.0)
    out = normalize(before, after, method="histogram")
    levels = np.linspace(0.01, 0.99, 25)
    for b in range(3):
        assert_allclose(np.quantile(out.values[b], levels), np.quantile(before.values[b], levels),
                        atol=0.5)


@pytest.mark.parametrize("method", ["histogram", "linear"])
def test_normalize_keeps_nan_and_grid(method):
    """NaN in after stay NaN, nothing else becomes NaN; dims, coords and CRS survive."""
    before, after = make_pair(shape=(96, 96), nodata_frac=0.2, gain=1.2)
    out = normalize(before, after, method=method)
    assert_array_equal(np.isnan(out.values), np.isnan(after.values))
    assert out.dims == after.dims and out.dtype == np.float32
    assert out.rio.crs == after.rio.crs
    assert out.rio.transform() == after.rio.transform()


@pytest.mark.parametrize("method", ["histogram", "linear"])
def test_normalize_dask_equals_numpy(method):
    """Dask input gives a lazy result equal to the NumPy one."""
    before, after = make_pair(shape=(96, 96), nodata_frac=0.1, gain=1.2, offset=5.0, noise=1.0)
    expected = normalize(before, after, method=method)
    lazy = normalize(before.chunk({"y": 40}), after.chunk({"y": 30, "x": 50}), method=method)
    assert lazy.chunks is not None
    assert_array_equal(lazy.values, expected.values)


def test_normalize_exclude_leaves_pixels_out_of_statistics():
    """Excluding the changed block makes 'histogram' match the unchanged pixels closely."""
    before, after = make_pair(shape=(128, 128), change=BLOCK, gain=1.3, offset=-20.0)
    keep = _unchanged()
    plain = normalize(before, after, method="histogram")
    masked = normalize(before, after, method="histogram", exclude=~keep)
    err_plain = np.abs(plain.values - before.values)[:, keep].mean()
    err_masked = np.abs(masked.values - before.values)[:, keep].mean()
    assert err_masked < 0.5 < err_plain


def test_normalize_none_is_identity():
    """'none' returns after itself."""
    before, after = make_pair()
    assert normalize(before, after, method="none") is after


def test_normalize_no_common_valid_pixel_raises():
    """No pixel valid in both dates raises NoValidDataError."""
    before, after = make_pair(shape=(32, 32))
    after = after.where(False)
    with pytest.raises(NoValidDataError, match="no pixel valid in both dates"):
        normalize(before, after, method="histogram")


def test_normalize_different_grids_raise():
    """Different grids raise GridError."""
    before, _ = make_pair(shape=(32, 32))
    _, after = make_pair(shape=(32, 40))
    with pytest.raises(GridError, match="different grids"):
        normalize(before, after, method="linear")


def test_quantile_map_equals_np_interp_bit_for_bit():
    """The binned piecewise-linear map gives np.interp's float64 result cast to float32."""
    from pipeline.core.radiometry import _interp_np, _quantile_map_table, _quantile_table_np

    rng = np.random.default_rng(0)
    sample = rng.gamma(4.0, 20.0, 50_000)
    xp, fp = _quantile_table_np(sample * 1.1 + 3.0, np.round(sample))  # ties in after
    x = (rng.random((300, 400)) * 400 - 40).astype(np.float32)
    x[0, :5] = np.nan
    x[1, :len(xp)] = xp  # values on the knots
    x[2, :3] = [xp[0], xp[-1], np.nextafter(np.float32(xp[-1]), np.float32(0))]
    x[3, :4] = [np.inf, -np.inf, 1e30, -1e30]  # far outside the knots: clamped
    got = _interp_np(x, _quantile_map_table(xp, fp))
    expected = np.interp(x, xp, fp).astype(np.float32)
    assert got.dtype == np.float32
    assert_array_equal(got, expected)
    into = np.zeros((150, 400), np.float32)  # written into a given array (a strip)
    assert _interp_np(x[:150], _quantile_map_table(xp, fp), out=into) is into
    assert_array_equal(into, expected[:150])
    one = _interp_np(x, _quantile_map_table(xp[:1], fp[:1]))
    expected_one = np.interp(x, xp[:1], fp[:1]).astype(np.float32)
    expected_one[np.isnan(x)] = np.nan  # the map keeps NaN (np.interp does not with one knot)
    assert_array_equal(one, expected_one)


def test_normalize_histogram_dask_stays_lazy():
    """'histogram' keeps Dask input lazy; band-chunked input gives the same values."""
    import dask.array

    before, after = make_pair(shape=(96, 96), nodata_frac=0.1, gain=1.2, noise=1.0)
    expected = normalize(before, after, method="histogram")
    lazy = normalize(before.chunk({"y": 40}), after.chunk({"band": 1, "y": 50}),
                     method="histogram")
    assert isinstance(lazy.data, dask.array.Array)
    assert_array_equal(lazy.values, expected.values)


@pytest.mark.parametrize("seed", range(6))
def test_quantile_map_around_every_knot_equals_np_interp(seed):
    """Values at, just below and just above every knot (float32 neighbours), with knots in
    tight clusters (several in one bin) and at float32 values: np.interp's values, bit for bit."""
    from pipeline.core.radiometry import _interp_np, _quantile_map_table

    rng = np.random.default_rng(seed)
    spread = rng.gamma(2.0, 30.0, 300)
    clusters = rng.choice(spread, 20)[:, None] + rng.random((20, 6)) * 1e-3  # dense knots
    knots = np.concatenate([spread, clusters.ravel()])
    if seed % 2:  # knots that are float32 values, as quantiles of float32 pixels can be
        knots = knots.astype(np.float32).astype(np.float64)
    xp = np.unique(knots)
    fp = np.sort(rng.gamma(2.0, 30.0, len(xp)))
    x32 = xp.astype(np.float32)
    near = np.concatenate([x32, np.nextafter(x32, np.float32(np.inf)),
                           np.nextafter(x32, np.float32(-np.inf)),
                           (rng.random(5000) * (xp[-1] - xp[0]) * 1.2 + xp[0] - 5)
                           .astype(np.float32), [np.nan, np.inf, -np.inf]])
    got = _interp_np(near, _quantile_map_table(xp, fp))
    expected = np.interp(near.astype(np.float64), xp, fp).astype(np.float32)
    expected[np.isnan(near)] = np.nan
    assert_array_equal(got, expected)
