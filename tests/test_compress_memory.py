"""Memory (error feedback, DGC momentum) and the run state of GradientCompression."""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

import distad.compress as C

N = 512


def gradients(steps: int, n: int = N, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n, dtype=np.float32) for _ in range(steps)]


def compress_step(memory: C.Memory, c: C.Compressor, g: np.ndarray, rng) -> np.ndarray:
    """One step of one rank: compensate, compress, decompress, update; returns what was sent."""
    compensated = memory.compensate("b", g)
    sent = c.decompress(c.compress(compensated, rng), g.size)
    memory.update("b", compensated, sent)
    return sent


@pytest.mark.parametrize("spec", ["topk:0.05", "qsgd:2", "onebit", "efsign", "sign", "randk:0.1"])
def test_error_feedback_telescopes_sent_plus_residual_to_the_gradient_sum(spec):
    c, memory, rng = C.get(spec).compressor, C.ErrorFeedback(), np.random.default_rng(0)
    grads, sent, rounding = gradients(30), [], np.zeros(N)
    for g in grads:
        sent.append(compress_step(memory, c, g, rng))
        # float32 rounds g + e and (g + e) - sent: half an ulp of each, per step
        rounding += 2.0**-23 * (np.abs(sent[-1]) + 2 * np.abs(memory.residual["b"]))
    total = np.sum(sent, axis=0, dtype=np.float64) + memory.residual["b"]
    assert np.all(np.abs(total - np.sum(grads, axis=0, dtype=np.float64)) <= rounding + 1e-6)


def test_error_feedback_compensates_with_the_residual_left_last_step():
    memory = C.ErrorFeedback()
    g = np.array([1.0, 2.0, 3.0], np.float32)
    memory.update("b", memory.compensate("b", g), np.array([1.0, 0.0, 0.0], np.float32))
    np.testing.assert_array_equal(memory.compensate("b", g), [1.0, 4.0, 6.0])


def test_dgc_accumulates_momentum_and_masks_it_where_sent():
    memory = C.DGCMomentum(momentum=0.5)
    g = np.array([1.0, 2.0, 4.0], np.float32)
    v = memory.compensate(0, g)  # u = g, v = u
    memory.update(0, v, np.array([0.0, 0.0, 4.0], np.float32))
    np.testing.assert_array_equal(memory.u["0"], [1.0, 2.0, 0.0])
    np.testing.assert_array_equal(memory.v["0"], [1.0, 2.0, 0.0])
    # next step: u = 0.5 u + g, v = v + u
    np.testing.assert_array_equal(memory.compensate(0, g), [1.0 + 1.5, 2.0 + 3.0, 4.0])


def test_dgc_velocity_telescopes_sent_plus_velocity_to_the_momentum_sum():
    c, memory, rng = C.TopK(0.05), C.DGCMomentum(0.9), np.random.default_rng(0)
    momenta, sent = [], []
    for g in gradients(20):
        before = memory.u.get("b", np.zeros(N, np.float32)) * np.float32(0.9) + g
        momenta.append(before)
        sent.append(compress_step(memory, c, g, rng))
    total = np.sum(sent, axis=0, dtype=np.float64) + memory.v["b"]
    np.testing.assert_allclose(total, np.sum(momenta, axis=0, dtype=np.float64), atol=1e-4)


@pytest.mark.parametrize("make", [C.ErrorFeedback, C.DGCMomentum])
@pytest.mark.parametrize("spec", ["topk:0.05", "randk:0.1:rescale", "threshold:0.05"])
def test_memory_updates_from_a_sparse_contribution_as_from_the_dense_one(make, spec):
    """Sparsifiers hand error feedback a SparseVector (k elements, not n): the memory it leaves
    is bit for bit the one the dense decompression leaves, step after step."""
    c = C.get(spec).compressor
    sparse_memory, dense_memory = make(), make()
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    for g in gradients(5):
        for memory, rng, sparse in ((sparse_memory, rng_a, True), (dense_memory, rng_b, False)):
            compensated = memory.compensate("b", g)
            payload = c.compress(compensated, rng)
            sent = c.contribution(payload, N) if sparse else c.decompress(payload, N)
            assert isinstance(sent, C.SparseVector) == sparse
            memory.update("b", compensated, sent)
        for key, value in dense_memory.state_dict().items():
            np.testing.assert_array_equal(sparse_memory.state_dict()[key], value, err_msg=key)


@pytest.mark.parametrize("make", [C.ErrorFeedback, C.DGCMomentum, C.NoMemory])
def test_memory_state_dict_round_trips_and_resumes_identically(make):
    c, rng = C.TopK(0.1), np.random.default_rng(0)
    first = make()
    for g in gradients(3):
        compress_step(first, c, g, rng)
    state = first.state_dict()
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in state.values())
    second = make()
    second.load_state_dict(state)
    assert state.keys() == second.state_dict().keys()
    for g in gradients(2, seed=1):
        a = compress_step(first, c, g, np.random.default_rng(5))
        b = compress_step(second, c, g, np.random.default_rng(5))
        np.testing.assert_array_equal(a, b)


def test_memory_rejects_a_bucket_whose_shape_changed():
    memory = C.ErrorFeedback()
    g = np.ones(4, np.float32)
    memory.update(7, memory.compensate(7, g), g)
    with pytest.raises(ValueError, match=r"bucket '7' has state of shape \(4,\), got .* \(5,\)"):
        memory.compensate(7, np.ones(5, np.float32))


def test_memory_load_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unexpected key 'momentum.0'"):
        C.ErrorFeedback().load_state_dict({"momentum.0": np.zeros(3, np.float32)})


SPECS_WITH_STATE = ["qsgd:4+ef", "topk:0.05+dgc", "randk:0.1+ef", "powersgd:2+ef", "threshold:0.02"]


@pytest.mark.parametrize("spec", SPECS_WITH_STATE)
def test_resumed_gradient_compression_matches_an_uninterrupted_one_bit_for_bit(spec):
    comm, grads = MPI.COMM_SELF, gradients(6, n=4096)
    shapes = [(64, 60), (256,)]
    run = C.get(spec, seed=3)
    for g in grads[:3]:
        run.reduce_bucket(comm, 0, g, shapes=shapes)
    state = {k: v.copy() for k, v in run.state_dict().items()}
    resumed = C.get(spec, seed=3)
    resumed.load_state_dict(state)
    for g in grads[3:]:
        a = run.reduce_bucket(comm, 0, g, shapes=shapes).mean
        b = resumed.reduce_bucket(comm, 0, g, shapes=shapes).mean
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("spec", ["topk:0.05+ef", "powersgd:2+ef", "topk:0.05+dgc"])
@pytest.mark.parametrize("old,new", [(4, 2), (2, 3)])
def test_regrouped_state_keeps_what_the_ranks_owe_the_average(spec, old, new):
    """Elastic resume: every new rank's memory is the old ranks' mean (so the mean over ranks,
    what the next averaged update adds, is unchanged); Q and the shared stream are rank 0's;
    rank j keeps old rank j's stream, a new rank gets a fresh one."""
    states = []
    for r, g in enumerate(gradients(old, n=4096)):
        run = C.get(spec, seed=3)
        # the streams reduce_bucket makes on rank r of a real run (here every run is rank 0)
        run._rank_rng, run._shared_rng = (np.random.default_rng(s) for s in ([3, 0, r], [3, 1]))
        run.reduce_bucket(MPI.COMM_SELF, 0, g * (r + 1), shapes=[(64, 60), (256,)])
        states.append(run.state_dict())
    regrouped = [C.get(spec, seed=3).regroup_state_dicts(states, j) for j in range(new)]
    for key in states[0]:
        if key.startswith("memory."):
            want = np.mean([s[key] for s in states], axis=0)
            assert not np.array_equal(states[0][key], states[1][key])
            mean = np.mean([s[key] for s in regrouped], axis=0)
            np.testing.assert_allclose(mean, want, rtol=1e-6, atol=1e-6)
        elif key == "rng.rank":
            for j, s in enumerate(regrouped):
                fresh = C.gradient_compression.rng_state_array(np.random.default_rng([3, 0, j]))
                np.testing.assert_array_equal(s[key], states[j][key] if j < old else fresh)
        else:
            assert all(np.array_equal(s[key], states[0][key]) for s in regrouped)
    C.get(spec, seed=3).load_state_dict(regrouped[-1])  # loads


def test_regroup_refuses_states_of_different_runs():
    a, b = C.get("topk:0.1+ef"), C.get("topk:0.1+ef")
    a.reduce_bucket(MPI.COMM_SELF, 0, gradients(1, n=512)[0])
    b.reduce_bucket(MPI.COMM_SELF, 1, gradients(1, n=512)[0])
    with pytest.raises(ValueError, match="rank 1's state has keys"):
        a.regroup_state_dicts([a.state_dict(), b.state_dict()], 0)


def test_gradient_compression_load_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unexpected keys \['rng.other'\]"):
        C.get("topk:0.1+ef").load_state_dict({"rng.other": np.zeros(6, np.uint64)})


def test_gradient_compression_state_holds_only_numpy_arrays():
    run = C.get("powersgd:2+ef")
    run.reduce_bucket(MPI.COMM_SELF, "layer", gradients(1, n=4096)[0])
    state = run.state_dict()
    assert set(state) == {"memory.residual.layer", "powersgd.q.layer", "rng.rank", "rng.shared"}
    assert all(isinstance(v, np.ndarray) for v in state.values())


@pytest.mark.parametrize("spec", ["topk:0.05+ef", "qsgd:4+ef", "none", "powersgd:2+ef", "sign"])
def test_reduce_bucket_into_the_gradient_buffer_matches_a_fresh_mean(spec):
    comm, grads = MPI.COMM_SELF, gradients(3, n=4096)
    fresh, into = C.get(spec, seed=3), C.get(spec, seed=3)
    for g in grads:
        want = fresh.reduce_bucket(comm, 0, g).mean
        buffer = g.copy()
        result = into.reduce_bucket(comm, 0, buffer, out=buffer)
        assert result.mean is buffer
        np.testing.assert_array_equal(buffer, want)
    for key, value in fresh.state_dict().items():
        np.testing.assert_array_equal(into.state_dict()[key], value)


def test_error_feedback_reuses_one_array_per_bucket_from_step_to_step():
    memory, c, rng = C.ErrorFeedback(), C.TopK(0.05), np.random.default_rng(0)
    compress_step(memory, c, gradients(1)[0], rng)
    residual = memory.residual["b"]
    compensated = memory.compensate("b", gradients(1, seed=1)[0])
    assert compensated is residual  # the residual's array, now holding g + e
    memory.update("b", compensated, c.decompress(c.compress(compensated), N))
    assert memory.residual["b"] is residual


@pytest.mark.parametrize("shapes", [None, [(64, 40), (40,), (30, 30)]])
def test_powersgd_contribution_subtracts_exactly_its_dense_form(shapes):
    """PowerSGD hands error feedback a LowRankVector (P, Q per matrix, the values of the small
    tensors): subtracting it band by band gives bit for bit what subtracting its dense form
    does, and the dense form is P Q^T on the compressed matrices and x on the rest."""
    n = 64 * 40 + 40 + 900 if shapes else 5000
    x = gradients(1, n=n)[0]
    result = C.aggregate(MPI.COMM_SELF, x, C.PowerSGD(2), np.random.default_rng(0),
                         strategy="powersgd", shapes=shapes, need_sent=True)
    assert not isinstance(result.sent, np.ndarray)
    dense = np.asarray(result.sent)
    residual = x.copy()
    result.sent.subtract_from(residual)
    np.testing.assert_array_equal(residual, x - dense)
    blocks = C.PowerSGD(2).plan(n, shapes)
    for b in blocks:
        part = slice(b.start, b.start + b.size)
        if not b.compressed:
            np.testing.assert_array_equal(dense[part], x[part])
    assert any(b.compressed for b in blocks)
    np.testing.assert_allclose(dense, result.mean, rtol=1e-5, atol=1e-6)  # one rank: sent = mean
