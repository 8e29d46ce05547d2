"""Data parallelism over pipelines: 2 pipelines of 2 stages on 4 ranks (a dp x pp grid).

Each pipeline trains on its half of every epoch; the two copies of each stage
average their gradients (DataParallel over the grid's dp group) during the
last micro-batch's backward.

Run: OMP_NUM_THREADS=1 mpiexec -n 4 python examples/dp_pp_digits.py
"""

import time

import numpy as np

import distad as ad

nn, F = ad.nn, ad.nn.functional
SEED, EPOCHS, BATCH, MICRO = 0, 20, 32, 4


def main():
    comm = ad.comm.Communicator()
    ad.comm.failfast.install()
    g = ad.parallel.grid(dp=comm.size // 2, pp=2)      # stage-major: ranks {0,1} are stage 0
    start = time.perf_counter()
    X, y = ad.data.load_digits()
    X_tr, X_te, y_tr, y_te = ad.data.train_test_split(X, y, test_size=0.2, seed=SEED)
    sampler = ad.data.DistributedSampler(len(X_tr), g.dp_size, g.dp_rank, seed=SEED)
    loader = ad.data.DataLoader(ad.data.ArrayDataset(X_tr, y_tr), BATCH, sampler=sampler)
    rng = np.random.default_rng(SEED)
    model = nn.Sequential(nn.Linear(64, 128, rng=rng), nn.ReLU(),
                          nn.Linear(128, 128, rng=rng), nn.ReLU(), nn.Linear(128, 10, rng=rng))
    pp = ad.parallel.PipelineParallel(model, g.pp, microbatches=MICRO, data_parallel=g.dp)
    print(f"{g}: layers {pp.partition[pp.stage]}", flush=True)
    opt = ad.optim.Adam(pp.parameters(), lr=3e-3)

    for epoch in range(EPOCHS):
        loader.set_epoch(epoch)
        for xb, yb in loader:
            opt.zero_grad()
            loss = pp.train_step(xb, yb, F.cross_entropy)
            opt.step()
        if epoch % 5 == 4 and comm.rank == 0:
            print(f"epoch {epoch + 1:3d}  loss of pipeline 0 {loss:.4f}", flush=True)

    # Each pipeline evaluates half of the test set; the last stages' counts are summed.
    part = np.array_split(np.arange(len(X_te)), g.dp_size)[g.dp_rank]
    logits = pp.predict(X_te[part])
    correct = np.array([float((logits.argmax(1) == y_te[part]).sum()) if pp.is_last else 0.0])
    comm.allreduce(correct, out=correct)
    if comm.rank == 0:
        print(f"dp={g.dp_size} x pp={g.pp_size} test accuracy {correct[0] / len(y_te):.4f} in "
              f"{time.perf_counter() - start:.1f} s")
    pp.close()
    g.free()


if __name__ == "__main__":
    main()
