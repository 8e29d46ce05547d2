"""Every compressor trains under DataParallel; every rank holds the same bits after every step."""

import hashlib

import numpy as np
import pytest

import distad as ad

pytestmark = pytest.mark.mpi(min_size=2)

SPECS = ["none", "fp16", "bf16", "int8", "qsgd:16", "terngrad", "sign", "efsign+ef", "onebit+ef",
         "topk:0.05+ef", "randk:0.05+ef", "threshold:1e-3+ef", "powersgd:2+ef", "topk:0.05+dgc",
         "topk:0.05@two_phase", "qsgd:16@allgather"]


def digest(model) -> np.ndarray:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(np.ascontiguousarray(p.data).tobytes())
    return np.frombuffer(h.digest(), np.uint8)


@pytest.mark.parametrize("spec", SPECS)
def test_every_spec_trains_with_all_ranks_bit_identical_after_every_step(comm, spec):
    X, y = ad.data.load_digits()
    model = ad.nn.Sequential(ad.nn.Linear(64, 32, rng=0), ad.nn.ReLU(), ad.nn.Linear(32, 10, rng=1))
    dp = ad.parallel.DataParallel(model, comm, compressor=spec, first_bucket_mb=0.001,
                                  measure_every=3)  # measuring changes nothing of the step
    opt = ad.optim.SGD(model.parameters(), lr=0.01 if spec == "sign" else 0.2, momentum=0.9)
    rows = np.arange(comm.rank, 1600, comm.size)
    losses = []
    for step in range(12):
        idx = rows[step * 32:(step + 1) * 32]
        opt.zero_grad()
        loss = ad.nn.functional.cross_entropy(dp(X[idx]), y[idx])
        loss.backward()
        opt.step()
        if step % 3 == 2:  # the compressed average against the exact one
            err, cos = dp.stats.grad_error, dp.stats.grad_cosine
            assert np.isfinite(err) and err >= 0 and -1 - 1e-6 <= cos <= 1 + 1e-6
            assert (err == 0) == (spec == "none"), (spec, err)
        everyone = comm.allgather(digest(model))
        assert (everyone == everyone[0]).all(), f"{spec}: ranks diverged at step {step}"
        losses.append(comm.allreduce(np.array([float(loss.data)]))[0] / comm.size)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), f"{spec}: loss did not go down: {losses}"
    dp.close()
