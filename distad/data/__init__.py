"""Data for distad: the bundled digits, synthetic sets, batching and per-rank shards.

Pure numpy, no MPI: a :class:`DistributedSampler` takes its rank and the number of
ranks as plain ints (e.g. from ``ad.comm.Communicator``), so everything here runs
and tests in one process.

>>> X, y = load_digits()                                  # (1797, 64) float32, int64
>>> X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.2, seed=0)
>>> sampler = DistributedSampler(len(X_tr), num_replicas=4, rank=1, seed=0)
>>> loader = DataLoader(ArrayDataset(X_tr, y_tr), batch_size=16, sampler=sampler)
>>> for epoch in range(2):
...     loader.set_epoch(epoch)                           # reshuffles every rank alike
...     for xb, yb in loader:
...         pass
"""

from distad.data.dataset import ArrayDataset, Dataset
from distad.data.digits import load_digits
from distad.data.loader import DataLoader
from distad.data.npz import load_npz
from distad.data.sampler import DistributedSampler, epoch_permutation, shard_indices
from distad.data.split import split_indices, train_test_split
from distad.data.synthetic import make_classification, make_regression

__all__ = [
    "ArrayDataset",
    "DataLoader",
    "Dataset",
    "DistributedSampler",
    "epoch_permutation",
    "load_digits",
    "load_npz",
    "make_classification",
    "make_regression",
    "shard_indices",
    "split_indices",
    "train_test_split",
]
