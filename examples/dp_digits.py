"""Data-parallel training in your own script: run it as

    .venv/bin/mpiexec -n 4 .venv/bin/python examples/dp_digits.py [--compress topk:0.01+ef]
    .venv/bin/mpiexec -n 4 .venv/bin/python examples/dp_digits.py --zero

Every rank builds the same model, trains on its shard of every epoch, and
DataParallel averages the gradients during backward. With --zero each rank keeps the
momentum of a quarter of the parameters only, receives only that quarter's averaged
gradients (a reduce-scatter), updates it, and gathers the rest (ZeRO). Without mpiexec it
runs as one rank.
"""

import argparse

import numpy as np

import distad as ad

p = argparse.ArgumentParser()
p.add_argument("--compress", default="none")
p.add_argument("--epochs", type=int, default=20)
p.add_argument("--zero", action="store_true", help="shard the optimizer over the ranks")
args = p.parse_args()

ad.comm.failfast.install()                       # an exception on any rank ends the job
comm = ad.comm.Communicator()
X, y = ad.data.load_digits()
Xtr, Xte, ytr, yte = ad.data.train_test_split(X, y, test_size=0.2, seed=0)

model = ad.nn.Sequential(ad.nn.Linear(64, 256, rng=0), ad.nn.ReLU(), ad.nn.Linear(256, 10, rng=1))
dp = ad.parallel.DataParallel(model, comm, compressor=args.compress)
if args.zero:  # the optimizer takes over DataParallel's exchange: reduce-scatter, allgather
    opt = ad.parallel.ZeroRedundancyOptimizer(model.parameters(), ad.optim.SGD, comm,
                                              data_parallel=dp, lr=0.2, momentum=0.9)
else:
    opt = ad.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
sampler = ad.data.DistributedSampler(len(Xtr), comm.size, comm.rank, seed=0)
loader = ad.data.DataLoader(ad.data.ArrayDataset(Xtr, ytr), batch_size=32, sampler=sampler)

for epoch in range(args.epochs):
    loader.set_epoch(epoch)                      # a new shuffle, the same on every rank
    for xb, yb in loader:
        opt.zero_grad()
        ad.nn.functional.cross_entropy(dp(xb), yb).backward()   # gradients averaged here
        opt.step()

# Evaluate a disjoint slice of the test set on each rank, then sum the counts.
idx = np.array_split(np.arange(len(Xte)), comm.size)[comm.rank]
with ad.no_grad():
    correct = np.array([(model(Xte[idx]).data.argmax(1) == yte[idx]).sum(), len(idx)], float)
comm.allreduce(correct, out=correct)
if comm.rank == 0:
    print(f"{comm.size} rank(s), compress={args.compress}, zero={args.zero}: test accuracy "
          f"{correct[0] / correct[1]:.4f}, {dp.stats.bytes_sent} bytes sent per rank last step")
