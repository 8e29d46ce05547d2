"""Train an MLP on the 8x8 digits as a pipeline: one stage per rank, 1F1B over 4 micro-batches.

Run: OMP_NUM_THREADS=1 mpiexec -n 2 python examples/pipeline_digits.py      (or -n 4: four stages)
"""

import time

import numpy as np

import distad as ad

nn, F = ad.nn, ad.nn.functional
SEED, EPOCHS, BATCH, MICRO = 0, 20, 64, 4


def main():
    comm = ad.comm.Communicator()
    ad.comm.failfast.install()                          # one rank's error stops every rank
    start = time.perf_counter()
    X, y = ad.data.load_digits()
    X_tr, X_te, y_tr, y_te = ad.data.train_test_split(X, y, test_size=0.2, seed=SEED)
    loader = ad.data.DataLoader(ad.data.ArrayDataset(X_tr, y_tr), batch_size=BATCH,
                                shuffle=True, seed=SEED)
    rng = np.random.default_rng(SEED)                   # every rank builds the same model
    model = nn.Sequential(nn.Linear(64, 128, rng=rng), nn.ReLU(),
                          nn.Linear(128, 128, rng=rng), nn.ReLU(),
                          nn.Linear(128, 64, rng=rng), nn.ReLU(),
                          nn.Linear(64, 10, rng=rng))
    pp = ad.parallel.PipelineParallel(model, comm, microbatches=MICRO, schedule="1f1b")
    lo, hi = pp.partition[pp.stage]
    print(f"rank {comm.rank}: stage {pp.stage} holds layers {lo}..{hi - 1} "
          f"({sum(p.size for p in pp.parameters())} parameters)", flush=True)
    opt = ad.optim.Adam(pp.parameters(), lr=3e-3)      # each stage updates its own layers

    for epoch in range(EPOCHS):
        loader.set_epoch(epoch)
        for xb, yb in loader:                           # every rank reads the same batch
            opt.zero_grad()
            loss = pp.train_step(xb, yb, F.cross_entropy)   # the same loss on every rank
            opt.step()
        if epoch % 5 == 4 and comm.rank == 0:
            print(f"epoch {epoch + 1:3d}  loss {loss:.4f}", flush=True)

    logits = pp.predict(X_te)                           # the last stage has the output
    correct = np.array([float((logits.argmax(1) == y_te).sum()) if pp.is_last else 0.0])
    comm.allreduce(correct, out=correct)
    if comm.rank == 0:
        print(f"pipeline ({comm.size} stages) test accuracy {correct[0] / len(y_te):.4f} in "
              f"{time.perf_counter() - start:.1f} s")
    pp.close()


if __name__ == "__main__":
    main()
