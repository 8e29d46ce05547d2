"""The compressor catalogue, one process: each behaviour against a closed-form oracle."""

from __future__ import annotations

import numpy as np
import pytest

import distad.compress as C
from distad.bench.compress import DEFAULT_SPECS

SPECS = [*DEFAULT_SPECS, "randk:0.01:rescale", "onebit:64", "qsgd:4", "powersgd:1"]
SIZES = [1, 7, 8, 1000, 4099]


def bucket(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n, dtype=np.float32)


def compressor(spec: str) -> C.Compressor:
    return C.get(spec).compressor


def round_trip(c: C.Compressor, x: np.ndarray, seed: int = 1) -> np.ndarray:
    return c.decompress(c.compress(x, np.random.default_rng(seed)), x.size)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("spec", SPECS)
def test_float32_in_gives_float32_out_of_shape_n(spec, n):
    out = round_trip(compressor(spec), bucket(n))
    assert out.dtype == np.float32 and out.shape == (n,)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("spec", SPECS)
def test_wire_bytes_equal_the_payload_arrays_nbytes(spec, n):
    c = compressor(spec)
    payload = c.compress(bucket(n), np.random.default_rng(1))
    actual = sum(a.nbytes for a in payload.arrays)
    assert payload.nbytes == actual == payload.to_bytes().nbytes
    if c.fixed_size:
        assert c.wire_bytes(n) == actual
    else:  # threshold: 8 bytes per element sent, however many the data selects
        assert actual == 8 * payload.arrays[0].size


@pytest.mark.parametrize("spec", SPECS)
def test_payload_rebuilt_from_its_bytes_decompresses_the_same(spec):
    c, x = compressor(spec), bucket(4099)
    payload = c.compress(x, np.random.default_rng(1))
    again = c.unpack(payload.to_bytes().copy(), x.size, payload.meta)
    np.testing.assert_array_equal(c.decompress(again, x.size), c.decompress(payload, x.size))


@pytest.mark.parametrize("spec", SPECS)
def test_non_float32_bucket_is_rejected_naming_the_operation(spec):
    with pytest.raises(ValueError, match=r"compress: expected a non-empty 1-D float32 array"):
        compressor(spec).compress(np.ones(8), np.random.default_rng(0))


@pytest.mark.parametrize(
    ("spec", "n"),
    [("qsgd:4", 48), ("terngrad", 48), ("int8:stochastic", 48), ("randk:0.25:rescale", 48)],
)
def test_unbiased_quantizer_averages_to_the_input_over_2000_draws(spec, n):
    c = compressor(spec)
    assert c.unbiased
    x = bucket(n, seed=3)
    rng = np.random.default_rng(4)
    draws = np.stack([c.decompress(c.compress(x, rng), n) for _ in range(2000)])
    mean = draws.mean(axis=0, dtype=np.float64)
    stderr = draws.std(axis=0, ddof=1, dtype=np.float64) / np.sqrt(len(draws))
    # Coordinates that never vary (on a level) must be exact up to float rounding.
    assert np.all(np.abs(mean - x) <= 4 * stderr + 1e-6 * np.abs(x).max())


def test_topk_keeps_exactly_the_k_largest_magnitudes():
    n, ratio = 300_000, 0.01  # large enough for the sampled-threshold path
    x = bucket(n, seed=5)
    c = C.TopK(ratio)
    values, indices = c.compress(x).arrays
    k = max(1, round(ratio * n))
    assert values.size == indices.size == k == np.unique(indices).size
    np.testing.assert_array_equal(values, x[indices])
    np.testing.assert_array_equal(np.sort(np.abs(values)), np.sort(np.abs(x))[-k:])


def test_topk_with_ties_and_zeros_still_keeps_k_of_the_largest():
    x = np.zeros(200_000, np.float32)
    x[::1000] = np.float32(2.0)  # 200 equal nonzeros, fewer than k: the rest are zeros
    values, indices = C.TopK(0.01).compress(x).arrays
    assert indices.size == 2000 == np.unique(indices).size
    assert np.count_nonzero(values == 2.0) == 200


def test_topk_decompresses_to_the_kept_values_and_zeros_elsewhere():
    x = bucket(1000, seed=6)
    out = round_trip(C.TopK(0.05), x)
    kept = out != 0
    assert kept.sum() == 50
    np.testing.assert_array_equal(out[kept], x[kept])
    assert np.abs(x[~kept]).max() <= np.abs(x[kept]).min()


def test_threshold_sends_every_element_above_its_threshold_and_nothing_below():
    x = bucket(1 << 20, seed=7)
    values, indices = C.Threshold(1e-3).compress(x, np.random.default_rng(0)).arrays
    sent = np.zeros(x.size, bool)
    sent[indices] = True
    np.testing.assert_array_equal(values, x[indices])
    assert np.abs(x[sent]).min() > np.abs(x[~sent]).max()
    assert 0.5e-3 < sent.mean() < 2e-3  # the sampled quantile lands near the target density


def test_randk_picks_the_same_indices_on_ranks_that_share_a_seed():
    c = C.RandK(0.1)
    a = c.compress(bucket(500, seed=1), np.random.default_rng(9))
    b = c.compress(bucket(500, seed=2), np.random.default_rng(9))
    np.testing.assert_array_equal(a.meta["indices"], b.meta["indices"])
    assert c.wire_bytes(500) == 4 * 50  # values only: the indices never travel


def test_randk_sends_the_values_at_distinct_sorted_indices():
    x = bucket(1000, seed=8)
    payload = C.RandK(0.1).compress(x, np.random.default_rng(0))
    idx = payload.meta["indices"]
    assert idx.size == 100 and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(payload.arrays[0], x[idx])


def test_powersgd_is_exact_on_a_matrix_of_rank_at_most_r():
    rng = np.random.default_rng(10)
    m = (rng.standard_normal((60, 2)) @ rng.standard_normal((2, 60))).astype(np.float32)
    c = C.PowerSGD(2)
    assert c.plan(m.size)[0].rows == 60  # the flat bucket is read as this 60 x 60 matrix
    out = round_trip(c, m.reshape(-1))
    np.testing.assert_allclose(out, m.reshape(-1), rtol=1e-4, atol=1e-4 * np.abs(m).max())


def test_powersgd_sends_small_buckets_uncompressed():
    c, x = C.PowerSGD(4), bucket(30)
    assert c.wire_bytes(30) == 4 * 30
    np.testing.assert_array_equal(round_trip(c, x), x)


def test_fp16_rounds_to_nearest_half_and_overflows_to_inf():
    x = np.array([1.0, 1 + 2.0**-11, 65504.0, 70000.0, -1e6, 1e-8], np.float32)
    out = round_trip(C.FP16(), x)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(out, x.astype(np.float16).astype(np.float32))
    assert out[3] == np.inf and out[4] == -np.inf


def _bf16_reference(x: np.ndarray) -> np.ndarray:
    """Nearest bfloat16 by float64 arithmetic, ties to an even last bit."""
    bits = x.view(np.uint32)
    lo = (bits & np.uint32(0xFFFF0000)).view(np.float32).astype(np.float64)
    hi_bits = (bits & np.uint32(0xFFFF0000)) + np.uint32(0x10000)
    hi = hi_bits.view(np.float32).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        d_lo, d_hi = np.abs(x - lo), np.abs(hi - x)
    even_lo = ((bits >> np.uint32(16)) & np.uint32(1)) == 0
    take_lo = (d_lo < d_hi) | ((d_lo == d_hi) & even_lo)
    return np.where(take_lo, bits & np.uint32(0xFFFF0000), hi_bits).view(np.float32)


def test_bf16_rounds_to_nearest_even_like_a_float64_reference():
    rng = np.random.default_rng(11)
    bits = rng.integers(0, 0x7F000000, 200_000, dtype=np.uint32)  # finite, no overflow
    bits[:1000] = (bits[:1000] & np.uint32(0xFFFF0000)) | np.uint32(0x8000)  # exact ties
    bits[1000:2000] |= np.uint32(0x80000000)  # negatives
    x = bits.view(np.float32)
    np.testing.assert_array_equal(round_trip(C.BF16(), x), _bf16_reference(x))


def test_bf16_keeps_nan_and_inf_and_rounds_past_the_largest_value_to_inf():
    x = np.array([np.nan, -np.nan, np.inf, -np.inf, 3.4e38, -3.4e38, 0.0], np.float32)
    out = round_trip(C.BF16(), x)
    assert np.isnan(out[:2]).all()
    np.testing.assert_array_equal(out[2:], [np.inf, -np.inf, np.inf, -np.inf, 0.0])


def test_int8_levels_use_the_shared_scale_it_is_given():
    x = np.array([0.5, -0.25, 1.0], np.float32)
    payload = C.Int8().compress(x, meta={"scale": np.float32(2.0)})
    np.testing.assert_array_equal(payload.arrays[0], [32, -16, 64])  # round(127 x / 2)
    assert payload.nbytes == 3  # the scale is shared, not sent


def test_int8_bucket_with_nan_decompresses_to_nan_everywhere():
    x = np.array([1.0, np.nan, 2.0], np.float32)
    assert np.isnan(round_trip(C.Int8(), x)).all()


def test_sign_decompresses_to_plus_minus_one_with_zero_as_plus():
    x = np.array([-2.0, 0.0, 3.0, -0.5, 1e-9, 7, -7, 0, 1], np.float32)
    np.testing.assert_array_equal(round_trip(C.Sign(), x), np.where(x >= 0, 1, -1))


def test_efsign_scales_signs_by_the_mean_magnitude():
    x = bucket(1001, seed=12)
    expected = np.float32(np.abs(x).mean(dtype=np.float64)) * np.where(x >= 0, 1, -1)
    np.testing.assert_allclose(round_trip(C.EFSign(), x), expected, rtol=1e-6)


def test_onebit_reconstructs_each_column_with_its_positive_and_negative_means():
    x = bucket(100, seed=13)  # 6 columns of 16, then a column of 4
    out = round_trip(C.OneBit(16), x)
    for start in range(0, 100, 16):
        col, got = x[start : start + 16], out[start : start + 16]
        pos = col >= 0
        np.testing.assert_allclose(got[pos], col[pos].mean(), rtol=1e-6)
        np.testing.assert_allclose(got[~pos], col[~pos].mean(), rtol=1e-6)


def test_onebit_column_without_negatives_sends_only_its_positive_mean():
    x = np.abs(bucket(32, seed=14))
    out = round_trip(C.OneBit(16), x)
    np.testing.assert_allclose(out[:16], x[:16].mean(), rtol=1e-6)


def test_identity_payload_is_the_bucket_itself():
    x = bucket(10)
    payload = C.Identity().compress(x)
    assert payload.arrays[0] is x and C.Identity().wire_bytes(10) == 40


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("spec", SPECS)
def test_decompress_into_out_equals_a_fresh_decompress_and_returns_out(spec, n):
    c = compressor(spec)
    payload = c.compress(bucket(n), np.random.default_rng(1))
    out = np.full(n, np.nan, np.float32)  # stale contents must not leak through
    got = c.decompress(payload, n, out=out)
    assert got is out
    np.testing.assert_array_equal(out, c.decompress(payload, n))


@pytest.mark.parametrize("spec", ["fp16", "int8", "topk:0.1", "sign", "powersgd:2"])
def test_decompress_rejects_an_out_of_the_wrong_dtype_or_shape(spec):
    c, x = compressor(spec), bucket(1000)
    payload = c.compress(x, np.random.default_rng(1))
    for bad in (np.empty(1000, np.float64), np.empty(999, np.float32)):
        with pytest.raises(ValueError, match="out must be a writeable contiguous float32"):
            c.decompress(payload, 1000, out=bad)


@pytest.mark.parametrize("spec", ["fp16", "bf16", "int8", "qsgd:4", "sign", "onebit"])
def test_a_kept_payload_is_never_overwritten_by_the_next_compress(spec):
    c = compressor(spec)
    first = c.compress(bucket(4099, seed=1), np.random.default_rng(1))
    before = [a.copy() for a in first.arrays]
    second = c.compress(bucket(4099, seed=2), np.random.default_rng(1))
    for a, b, kept in zip(first.arrays, second.arrays, before):
        assert not np.shares_memory(a, b)
        np.testing.assert_array_equal(a, kept)


def test_a_released_payload_array_is_reused_by_the_next_compress():
    c, x = C.Int8(), bucket(4099)
    address = c.compress(x).arrays[0].__array_interface__["data"][0]
    assert c.compress(x).arrays[0].__array_interface__["data"][0] == address


def test_fp16_matches_numpy_astype_bit_for_bit_over_the_whole_float32_range():
    rng = np.random.default_rng(15)
    bits = rng.integers(0, 2**32, 1 << 20, dtype=np.uint32)
    tiny = rng.standard_normal(1 << 18, dtype=np.float32) * np.float32(1e-5)  # half subnormals
    x = np.concatenate([bits.view(np.float32), tiny, np.float32([0.0, -0.0, 65519.99, 65520])])
    x = x[~np.isnan(x)]  # NaN payloads: numpy keeps some mantissa bits, checked below
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(C.FP16().compress(x).arrays[0].view(np.uint16), want)


def test_fp16_keeps_nan():
    x = np.array([1.0, np.nan, -np.nan, 2.0], np.float32)
    assert np.isnan(round_trip(C.FP16(), x)[1:3]).all()


def test_topk_keeps_the_lowest_indices_among_ties_at_the_kth_magnitude():
    x = np.zeros(300_000, np.float32)
    x[::100] = np.float32(3.0)  # 3000 equal magnitudes, k = 2000 of them fit
    x[1::1000] = np.float32(-5.0)  # 300 larger ones, all kept
    values, indices = C.TopK(2000 / x.size).compress(x).arrays
    ties = np.flatnonzero(x == 3.0)[: 2000 - 300]
    np.testing.assert_array_equal(
        indices, np.sort(np.concatenate([ties, np.arange(1, x.size, 1000)]))
    )
    np.testing.assert_array_equal(values, x[indices])


@pytest.mark.parametrize(("n", "k"), [(1000, 50), (1000, 300), (100_000, 1000)])
def test_randk_indices_are_distinct_sorted_and_uniform(n, k):
    from distad.compress.sparsifiers import sample_indices

    rng, draws = np.random.default_rng(16), 3000
    counts = np.zeros(n, np.int64)
    for _ in range(draws):
        idx = sample_indices(rng, n, k)
        assert idx.size == k and np.all(np.diff(idx) > 0) and idx[0] >= 0 and idx[-1] < n
        counts[idx] += 1
    mean, std = draws * k / n, np.sqrt(draws * k / n * (1 - k / n))
    assert np.abs(counts - mean).max() < 5.5 * std  # each index in a draw with probability k/n


def test_fp16_decodes_every_half_bit_pattern_like_numpy():
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = halves[np.isfinite(halves)]  # alone, so no block falls back to numpy's cast
    got = C.FP16().decompress(C.Payload((finite,)), finite.size)
    np.testing.assert_array_equal(got.view(np.uint32), finite.astype(np.float32).view(np.uint32))
    special = np.float16([1.0, np.inf, -np.inf, np.nan, -2.0])
    got = C.FP16().decompress(C.Payload((special,)), special.size)
    np.testing.assert_array_equal(got, special.astype(np.float32))


@pytest.mark.parametrize("shape, dtype", [((1 << 19,), np.float32), ((300, 1000), np.float64),
                                          ((10,), np.float32)])
def test_zero_fill_clears_small_large_and_strided_arrays(shape, dtype):
    from distad._blocked import zero_fill

    a = np.full(shape, np.nan, dtype)
    assert zero_fill(a) is a and not a.any()
    b = np.full((2,) + shape, 7.0, dtype)[:, ...].swapaxes(0, -1)  # not C-contiguous
    zero_fill(b)
    assert not b.any()
    a.fill(3.0)  # the zero source is not a's memory: it stays zero for the next caller
    c = np.full(shape, 1.0, dtype)
    assert not zero_fill(c).any()


@pytest.mark.parametrize("spec", ["topk:0.01", "randk:0.01", "threshold:0.01"])
def test_sparse_decompress_of_a_large_bucket_clears_stale_contents(spec):
    n = 1 << 19  # 2 MB: zeroed by a copy, not fill
    c = compressor(spec)
    x = bucket(n, seed=3)
    payload = c.compress(x, np.random.default_rng(1))
    out = c.decompress(payload, n, out=np.full(n, np.nan, np.float32))
    values, indices = (payload.arrays[0], payload.meta["indices"]) if spec.startswith(
        "randk") else payload.arrays
    np.testing.assert_array_equal(out[indices], values)
    assert np.count_nonzero(out) == np.count_nonzero(values)


@pytest.mark.parametrize("spec", ["topk:0.01", "threshold:0.01"])
def test_a_nan_in_a_large_bucket_is_sent_not_dropped(spec):
    """The sparsifiers' magnitude order puts NaN above every number (as np.sort does), so a
    NaN gradient reaches the other ranks instead of vanishing into the residual."""
    x = bucket(1 << 19, seed=4)
    x[12345] = np.nan
    values, indices = compressor(spec).compress(x, np.random.default_rng(0)).arrays
    assert 12345 in indices and np.isnan(values[list(indices).index(12345)])
    assert np.isnan(values).sum() == 1
