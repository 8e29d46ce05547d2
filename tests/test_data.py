"""distad.data: bundled digits, splits, synthetic sets, batching and per-rank shards."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distad.data import (
    ArrayDataset,
    DataLoader,
    DistributedSampler,
    load_digits,
    make_classification,
    make_regression,
    shard_indices,
    split_indices,
    train_test_split,
)

# (n, num_replicas): divisible, not divisible, more ranks than samples, one rank.
SIZES = [(10, 2), (10, 3), (7, 4), (3, 8), (100, 7), (1797, 4), (1, 1)]
SIZES_DROP_LAST = [(n, p) for n, p in SIZES if n >= p]  # n < p is rejected with drop_last


def all_shards(n, p, **kwargs):
    return [DistributedSampler(n, p, r, **kwargs).indices() for r in range(p)]


# ---------------------------------------------------------------- digits


def test_digits_are_1797_rows_of_64_float32_pixels_in_unit_interval():
    X, _ = load_digits()
    assert X.shape == (1797, 64)
    assert X.dtype == np.float32
    assert X.min() == 0.0 and X.max() == 1.0


def test_digits_labels_are_int64_with_ten_roughly_balanced_classes():
    _, y = load_digits()
    assert y.shape == (1797,) and y.dtype == np.int64
    counts = np.bincount(y)
    assert len(counts) == 10
    assert counts.min() >= 170 and counts.max() <= 190


def test_digits_without_normalize_are_the_raw_integer_pixels():
    raw, _ = load_digits(normalize=False, dtype=np.int64)
    X, _ = load_digits()
    assert raw.min() == 0 and raw.max() == 16
    np.testing.assert_array_equal(raw.astype(np.float32) / 16, X)


def test_digits_image_shape_gives_nchw_images_of_the_same_pixels():
    images, _ = load_digits(shape=(1, 8, 8))
    X, _ = load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == np.float32
    np.testing.assert_array_equal(images[:, 0].reshape(1797, 64), X)


def test_digits_dtype_option_gives_float64():
    X, _ = load_digits(dtype=np.float64)
    assert X.dtype == np.float64


def test_digits_calls_return_independent_writable_arrays():
    X, y = load_digits()
    X[:] = -1.0
    y[:] = -1
    X2, y2 = load_digits()
    assert X2.min() == 0.0 and y2.min() == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"shape": (1, 8, 7)}, "64 pixels"), ({"dtype": np.int32}, "floating dtype")],
)
def test_digits_reject_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_digits(**kwargs)


# ---------------------------------------------------------------- split


def test_split_parts_are_disjoint_and_cover_every_sample():
    _, y = load_digits()
    train, test = split_indices(y, test_size=0.2, seed=0)
    assert train.dtype == np.int64 and test.dtype == np.int64
    assert len(np.intersect1d(train, test)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(len(y)))


def test_split_test_fraction_rounds_up_to_a_count_like_scikit_learn():
    X, y = load_digits()
    _, X_test, _, y_test = train_test_split(X, y, test_size=0.2)
    assert len(X_test) == len(y_test) == math.ceil(0.2 * 1797)


def test_split_is_stratified_each_class_within_one_sample_of_its_share():
    X, y = load_digits()
    _, _, y_train, y_test = train_test_split(X, y, test_size=0.2, seed=3)
    n_test, counts = len(y_test), np.bincount(y)
    exact_share = n_test * counts / len(y)
    assert np.all(np.abs(np.bincount(y_test, minlength=10) - exact_share) < 1)
    np.testing.assert_array_equal(np.bincount(y_train) + np.bincount(y_test), counts)


def test_split_is_deterministic_for_a_seed_and_changes_with_the_seed():
    X, y = load_digits()
    first, again = train_test_split(X, y, seed=7), train_test_split(X, y, seed=7)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    other = train_test_split(X, y, seed=8)
    assert not np.array_equal(first[3], other[3])


def test_split_keeps_rows_paired_with_their_labels_and_dtypes():
    _, y = load_digits()
    X = np.arange(len(y), dtype=np.float32)[:, None]  # each row holds its own index
    X_train, X_test, y_train, y_test = train_test_split(X, y)
    assert X_train.dtype == np.float32 and y_train.dtype == np.int64
    np.testing.assert_array_equal(y_test, y[X_test[:, 0].astype(np.int64)])
    np.testing.assert_array_equal(y_train, y[X_train[:, 0].astype(np.int64)])


def test_split_without_stratify_takes_a_count_and_accepts_2d_targets():
    X, y = make_regression(50, 3, n_targets=2)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=10, stratify=False)
    assert X_test.shape == (10, 3) and y_test.shape == (10, 2)
    assert X_train.shape == (40, 3) and y_train.shape == (40, 2)


@pytest.mark.parametrize("test_size", [0.0, 1.0, 1.5, 0, 100, -3])
def test_split_rejects_test_size_leaving_a_part_empty(test_size):
    with pytest.raises(ValueError, match="test_size"):
        split_indices(np.arange(100) % 2, test_size=test_size)


def test_split_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="same first axis"):
        train_test_split(np.zeros((5, 2)), np.zeros(4))


# ---------------------------------------------------------------- synthetic


def test_make_classification_gives_float32_features_and_balanced_int64_labels():
    X, y = make_classification(1003, 17, 4, seed=1)
    assert X.shape == (1003, 17) and X.dtype == np.float32
    assert y.shape == (1003,) and y.dtype == np.int64
    counts = np.bincount(y)
    assert len(counts) == 4 and counts.max() - counts.min() <= 1


def test_make_classification_is_a_function_of_its_seed():
    a, b, c = (make_classification(200, 5, 3, seed=s) for s in (4, 4, 5))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_make_classification_blobs_are_learnable_by_nearest_class_mean():
    X, y = make_classification(2000, 32, 5, seed=0, class_sep=6.0)
    means = np.stack([X[y == k].mean(axis=0) for k in range(5)])
    nearest = np.argmin(((X[:, None, :] - means[None]) ** 2).sum(axis=-1), axis=1)
    assert np.mean(nearest == y) > 0.95


def test_make_regression_targets_follow_the_linear_teacher_up_to_the_noise():
    X, y, W = make_regression(4000, 8, 3, seed=2, noise=0.5, bias=1.5, return_coef=True)
    assert X.dtype == y.dtype == W.dtype == np.float32
    assert X.shape == (4000, 8) and y.shape == (4000, 3) and W.shape == (8, 3)
    residual = y - (X @ W + np.float32(1.5))
    assert abs(residual.std() - 0.5) < 0.02
    assert abs(residual.mean()) < 0.02


def test_make_regression_with_one_target_is_a_column():
    _, y = make_regression(10, 4, seed=0)
    assert y.shape == (10, 1)


def test_make_regression_float64_option_and_noise_free_targets_are_exact():
    X, y, W = make_regression(20, 3, seed=0, noise=0.0, dtype=np.float64, return_coef=True)
    assert X.dtype == np.float64
    np.testing.assert_array_equal(y, X @ W)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: make_classification(0, 3, 2), ValueError, "n_samples"),
        (lambda: make_classification(10, 3, 1), ValueError, "n_classes"),
        (lambda: make_classification(10, 3.0, 2), TypeError, "n_features"),
        (lambda: make_classification(10, 3, 2, dtype=np.int32), ValueError, "floating"),
        (lambda: make_regression(10, 3, noise=-1.0), ValueError, "noise"),
    ],
)
def test_synthetic_generators_reject_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------- ArrayDataset


def test_array_dataset_gathers_a_batch_from_an_index_array_keeping_dtypes():
    X = np.arange(20, dtype=np.float32).reshape(10, 2)
    y = np.arange(10, dtype=np.int64)
    ds = ArrayDataset(X, y)
    xb, yb = ds[np.array([7, 2, 2], dtype=np.int64)]
    assert len(ds) == 10
    np.testing.assert_array_equal(xb, X[[7, 2, 2]])
    np.testing.assert_array_equal(yb, [7, 2, 2])
    assert xb.dtype == np.float32 and yb.dtype == np.int64


def test_array_dataset_rejects_arrays_of_different_lengths():
    with pytest.raises(ValueError, match="first axis"):
        ArrayDataset(np.zeros((5, 2)), np.zeros(4))


# ---------------------------------------------------------------- DataLoader


def digits_loader(**kwargs):
    X, y = load_digits()
    return DataLoader(ArrayDataset(X, y), **kwargs)


def test_loader_covers_every_sample_exactly_once_per_epoch():
    y = np.arange(103)
    loader = DataLoader(ArrayDataset(y), batch_size=10, shuffle=True, seed=1)
    for _ in range(2):
        seen = np.concatenate([yb for (yb,) in loader])
        np.testing.assert_array_equal(np.sort(seen), y)


def test_loader_batches_have_the_batch_shape_and_dtypes_with_a_short_last_batch():
    batches = list(digits_loader(batch_size=64, shuffle=True))
    for xb, yb in batches[:-1]:
        assert xb.shape == (64, 64) and xb.dtype == np.float32
        assert yb.shape == (64,) and yb.dtype == np.int64
    assert batches[-1][0].shape == (1797 % 64, 64)


def test_loader_len_is_the_number_of_batches():
    assert len(digits_loader(batch_size=64)) == len(list(digits_loader(batch_size=64))) == 29
    assert len(digits_loader(batch_size=64, drop_last=True)) == 28


def test_loader_drop_last_yields_only_full_batches():
    batches = list(digits_loader(batch_size=64, drop_last=True))
    assert len(batches) == 28 and all(len(yb) == 64 for _, yb in batches)


def test_loader_without_shuffle_keeps_the_data_set_order():
    y = np.arange(25)
    seen = np.concatenate([yb for (yb,) in DataLoader(ArrayDataset(y), batch_size=4)])
    np.testing.assert_array_equal(seen, y)


def test_loader_same_seed_and_epoch_give_the_identical_order():
    def order(seed, epoch):
        loader = DataLoader(ArrayDataset(np.arange(50)), batch_size=7, shuffle=True, seed=seed)
        loader.set_epoch(epoch)
        return np.concatenate([yb for (yb,) in loader])

    np.testing.assert_array_equal(order(3, 5), order(3, 5))
    assert not np.array_equal(order(3, 5), order(3, 6))
    assert not np.array_equal(order(3, 5), order(4, 5))


def test_loader_consecutive_passes_reshuffle_like_successive_epochs():
    loader = DataLoader(ArrayDataset(np.arange(50)), batch_size=50, shuffle=True, seed=2)
    (first,), (second,) = next(iter(loader)), next(iter(loader))
    assert not np.array_equal(first, second)
    loader.set_epoch(1)
    np.testing.assert_array_equal(next(iter(loader))[0], second)


def test_loader_with_a_sampler_iterates_that_ranks_shard_per_epoch():
    sampler = DistributedSampler(50, 3, 1, seed=4)
    loader = DataLoader(ArrayDataset(np.arange(50)), batch_size=5, sampler=sampler)
    loader.set_epoch(2)
    assert sampler.epoch == 2
    seen = np.concatenate([yb for (yb,) in loader])
    np.testing.assert_array_equal(seen, shard_indices(50, 3, 1, seed=4, epoch=2))
    assert len(loader) == math.ceil(len(sampler) / 5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": 2.5}, TypeError, "batch_size"),
        ({"batch_size": 4, "shuffle": True, "sampler": range(3)}, ValueError, "exclusive"),
    ],
)
def test_loader_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        DataLoader(ArrayDataset(np.arange(10)), **kwargs)


# ---------------------------------------------------------------- DistributedSampler


@pytest.mark.parametrize(
    ("n", "p", "drop_last"),
    [(n, p, False) for n, p in SIZES] + [(n, p, True) for n, p in SIZES_DROP_LAST],
)
def test_sampler_shards_have_equal_sizes_on_every_rank(n, p, drop_last):
    shards = all_shards(n, p, drop_last=drop_last)
    expected = n // p if drop_last else math.ceil(n / p)
    assert all(len(s) == expected and s.dtype == np.int64 for s in shards)


@pytest.mark.parametrize(("n", "p"), SIZES_DROP_LAST)
def test_sampler_shards_with_drop_last_are_disjoint_and_miss_fewer_than_p(n, p):
    everything = np.concatenate(all_shards(n, p, drop_last=True, seed=5))
    assert len(np.unique(everything)) == len(everything) == n - n % p


@pytest.mark.parametrize(("n", "p"), SIZES)
def test_sampler_shards_cover_the_data_set_and_repeat_only_the_padding(n, p):
    everything = np.concatenate(all_shards(n, p, seed=5))
    total = math.ceil(n / p) * p
    assert len(everything) == total
    counts = np.bincount(everything, minlength=n)
    assert len(counts) == n and counts.min() >= 1
    # Padding wraps around the epoch's order, so repeats are spread evenly.
    assert counts.max() - counts.min() <= 1 and counts.sum() - n == total - n


@pytest.mark.parametrize(("n", "p"), SIZES)
def test_sampler_same_seed_and_epoch_give_identical_shards(n, p):
    for rank in range(p):
        a, b = DistributedSampler(n, p, rank, seed=9), DistributedSampler(n, p, rank, seed=9)
        a.set_epoch(3)
        b.set_epoch(3)
        np.testing.assert_array_equal(a.indices(), b.indices())
        np.testing.assert_array_equal(a.indices(), a.indices())


def test_sampler_reshuffles_per_epoch_and_per_seed():
    sampler = DistributedSampler(100, 4, 2, seed=0)
    epoch0 = sampler.indices()
    sampler.set_epoch(1)
    assert not np.array_equal(epoch0, sampler.indices())
    assert not np.array_equal(epoch0, DistributedSampler(100, 4, 2, seed=1).indices())


def test_sampler_without_shuffle_strides_through_the_data_set_in_order():
    # The order 0..9 is padded to 12 by wrapping to its start: 0..9, 0, 1.
    shards = all_shards(10, 3, shuffle=False)
    assert [s.tolist() for s in shards] == [[0, 3, 6, 9], [1, 4, 7, 0], [2, 5, 8, 1]]


def test_sampler_iterates_its_indices_as_python_ints_and_len_matches():
    sampler = DistributedSampler(23, 4, 3, seed=1)
    items = list(sampler)
    assert len(sampler) == len(items) == 6
    assert all(type(i) is int for i in items)
    assert items == sampler.indices().tolist()


@pytest.mark.parametrize("p", [1, 2, 4])
def test_sampler_rank_batches_together_equal_the_single_process_batch(p):
    # The promise behind data parallelism: p ranks with batch b see, step by step,
    # the samples one process sees with batch p * b under the same seed and epoch.
    n, b, seed, epoch = 96, 4, 11, 2
    data = ArrayDataset(np.arange(n))
    single = DataLoader(data, batch_size=p * b, shuffle=True, seed=seed)
    single.set_epoch(epoch)
    ranks = []
    for r in range(p):
        loader = DataLoader(data, batch_size=b, sampler=DistributedSampler(n, p, r, seed=seed))
        loader.set_epoch(epoch)
        ranks.append(list(loader))
    for step, (global_batch,) in enumerate(single):
        union = np.concatenate([ranks[r][step][0] for r in range(p)])
        np.testing.assert_array_equal(np.sort(union), np.sort(global_batch))


@pytest.mark.parametrize("n,p_old,p_new,b,steps", [(96, 2, 4, 4, 5), (97, 4, 3, 5, 2),
                                                   (50, 3, 1, 2, 7), (1797, 4, 2, 16, 11)])
def test_sampler_start_shares_out_the_rest_of_the_epoch_a_run_on_other_ranks_left(
        n, p_old, p_new, b, steps):
    """After k steps on p ranks of b samples, entries [0, k p b) of the epoch's order are used;
    with start = k p b the new ranks' shards hold the rest, each entry once (plus padding)."""
    used = np.concatenate([DistributedSampler(n, p_old, r, seed=3).indices()[:steps * b]
                           for r in range(p_old)])
    order = shard_indices(n, 1, 0, seed=3)
    np.testing.assert_array_equal(np.sort(used), np.sort(order[:steps * p_old * b]))
    rest = np.concatenate([shard_indices(n, p_new, r, seed=3, start=steps * p_old * b)
                           for r in range(p_new)])
    assert len(rest) == -(-(n - steps * p_old * b) // p_new) * p_new
    np.testing.assert_array_equal(np.unique(rest), np.sort(order[steps * p_old * b:]))
    sampler = DistributedSampler(n, p_new, 0, seed=3)
    sampler.set_epoch(0, steps * p_old * b)
    assert len(sampler) == len(rest) // p_new
    sampler.set_epoch(1)
    assert len(sampler) == -(-n // p_new)


def test_sampler_start_must_leave_part_of_the_epoch():
    with pytest.raises(ValueError, match="start 10 leaves nothing of an epoch of n=10"):
        shard_indices(10, 2, 0, start=10)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((10, 4, 4), {}, ValueError, "rank 4 is out of range"),
        ((10, 4, -1), {}, ValueError, "rank must be >= 0"),
        ((10, 0, 0), {}, ValueError, "num_replicas must be >= 1"),
        ((0, 2, 0), {}, ValueError, "n must be >= 1"),
        ((10.0, 2, 0), {}, TypeError, "n must be an integer"),
        ((10, 2, True), {}, TypeError, "rank must be an integer"),
        ((10, 2, 0), {"seed": -1}, ValueError, "seed"),
        ((3, 4, 0), {"drop_last": True}, ValueError, "no samples"),
    ],
)
def test_sampler_rejects_bad_arguments_naming_them(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        DistributedSampler(*args, **kwargs)


def test_sampler_rejects_a_negative_epoch():
    with pytest.raises(ValueError, match="epoch"):
        DistributedSampler(10, 2, 0).set_epoch(-1)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300),
    p=st.integers(1, 16),
    seed=st.integers(0, 2**32 - 1),
    epoch=st.integers(0, 1000),
    drop_last=st.booleans(),
)
def test_sampler_shards_partition_the_epoch_order_for_any_size(n, p, seed, epoch, drop_last):
    if drop_last and n < p:
        return
    shards = [shard_indices(n, p, r, seed=seed, epoch=epoch, drop_last=drop_last) for r in range(p)]
    size = n // p if drop_last else math.ceil(n / p)
    assert all(len(s) == size for s in shards)
    everything = np.concatenate(shards)
    assert everything.min() >= 0 and everything.max() < n
    distinct = len(np.unique(everything))
    if drop_last:
        assert distinct == len(everything)  # disjoint
    else:
        assert distinct == n  # covers; the only repeats are the p*size - n padding
    again = [shard_indices(n, p, r, seed=seed, epoch=epoch, drop_last=drop_last) for r in range(p)]
    assert all(np.array_equal(a, b) for a, b in zip(shards, again, strict=True))


# ---- .npz files of the user's own ----------------------------------------------------------

def _blobs(n=400, seed=0):
    """Three well-separated Gaussian classes in 5 dimensions."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    X = rng.standard_normal((n, 5)) + 4.0 * np.eye(3, 5)[y]
    return X, y


def test_load_npz_reads_x_and_y_as_float32_and_int64(tmp_path):
    from distad.data import load_npz

    X, y = _blobs()
    np.savez(tmp_path / "d.npz", X=X, y=y.astype(np.float64))  # float labels that are integers
    got = load_npz(tmp_path / "d.npz")
    assert got["X"].dtype == np.float32 and got["y"].dtype == np.int64
    np.testing.assert_array_equal(got["y"], y)
    np.testing.assert_allclose(got["X"], X.astype(np.float32))


@pytest.mark.parametrize("arrays,message", [
    ({"X": np.zeros((3, 2))}, "expected arrays X and y"),
    ({"X": np.zeros((3, 2)), "y": np.zeros(4, int)}, r"same n > 0, got \(3, 2\) and \(4,\)"),
    ({"X": np.zeros((3, 2)), "y": np.array([0, -1, 2])}, "class labels 0, 1, 2"),
    ({"X": np.zeros((3, 2)), "y": np.array([0.5, 1.0, 2.0])}, "class labels"),
    ({"X": np.array([[0.0, np.nan]] * 3), "y": np.zeros(3, int)}, "NaN or infinite"),
    ({"X_train": np.zeros((3, 2)), "y_train": np.zeros(3, int), "X_test": np.zeros((2, 3)),
      "y_test": np.zeros(2, int)}, "differ in shape"),
    ({"X": np.array([[{}]] * 2, dtype=object), "y": np.zeros(2, int)}, "without pickle"),
])
def test_load_npz_names_what_is_wrong(tmp_path, arrays, message):
    from distad.data import load_npz

    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        load_npz(tmp_path / "bad.npz")


@pytest.mark.parametrize("split", [False, True])
def test_training_job_learns_a_dataset_from_an_npz_file(tmp_path, split):
    from distad.train.config import TrainConfig
    from distad.train.job import run

    X, y = _blobs()
    if split:
        np.savez(tmp_path / "d.npz", X_train=X[:300], y_train=y[:300], X_test=X[300:],
                 y_test=y[300:])
    else:
        np.savez(tmp_path / "d.npz", X=X, y=y)
    summary = run(TrainConfig(dataset=str(tmp_path / "d.npz"), hidden="16", epochs=5, lr=0.1,
                              progress=False))
    assert summary["test_acc"] > 0.95


def test_training_job_says_which_dataset_file_is_missing(tmp_path):
    from distad.train.config import TrainConfig
    from distad.train.job import run

    with pytest.raises(SystemExit, match="--dataset .*nope.npz"):
        run(TrainConfig(dataset=str(tmp_path / "nope.npz"), progress=False))
