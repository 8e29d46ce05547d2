"""A Megatron-style tensor-parallel MLP block inside a small digits classifier.

The block's hidden layer (512 units) is split over the ranks: each holds 512/P
columns of the first matrix and rows of the second, and the block costs one
allreduce forward and one backward. The layers around it are replicated.

Run: OMP_NUM_THREADS=1 mpiexec -n 2 python examples/tensor_parallel_mlp.py      (P must divide 512)
"""

import time

import numpy as np

import distad as ad

nn, F = ad.nn, ad.nn.functional
SEED, EPOCHS, BATCH = 0, 20, 64


def main():
    comm = ad.comm.Communicator()
    ad.comm.failfast.install()
    start = time.perf_counter()
    X, y = ad.data.load_digits()
    X_tr, X_te, y_tr, y_te = ad.data.train_test_split(X, y, test_size=0.2, seed=SEED)
    loader = ad.data.DataLoader(ad.data.ArrayDataset(X_tr, y_tr), batch_size=BATCH,
                                shuffle=True, seed=SEED)
    rng = np.random.default_rng(SEED)                   # the same draws on every rank
    block = ad.parallel.TensorParallelMLP(128, 512, comm, activation=nn.ReLU(), rng=rng)
    model = nn.Sequential(nn.Linear(64, 128, rng=rng), nn.ReLU(), block,
                          nn.Linear(128, 10, rng=rng))
    print(f"rank {comm.rank}: fc1.weight {block.fc1.weight.shape}, "
          f"fc2.weight {block.fc2.weight.shape}", flush=True)
    opt = ad.optim.Adam(model.parameters(), lr=3e-3)

    for epoch in range(EPOCHS):
        loader.set_epoch(epoch)
        for xb, yb in loader:                           # every rank reads the same batch
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)       # replicated: the same on every rank
            loss.backward()
            opt.step()
        if epoch % 5 == 4 and comm.rank == 0:
            print(f"epoch {epoch + 1:3d}  loss {loss.item():.4f}", flush=True)

    with ad.no_grad():
        accuracy = float((model(X_te).data.argmax(1) == y_te).mean())
    full = ad.parallel.tensor_parallel_state_dict(model)   # shards gathered: loads unsplit
    if comm.rank == 0:
        print(f"tensor-parallel MLP ({comm.size} ranks) test accuracy {accuracy:.4f} in "
              f"{time.perf_counter() - start:.1f} s; full state: "
              f"{ {k: v.shape for k, v in full.items() if k.startswith('2.')} }")


if __name__ == "__main__":
    main()
