"""Tensor parallelism (Megatron-LM): a Linear layer's matrix split across the ranks of a group.

A column-parallel Linear keeps rows [r*k, (r+1)*k) of weight (out, in) — a
slice of the *output* features — so its input is replicated and its output is
sharded; a row-parallel Linear keeps columns [r*k, (r+1)*k) — a slice of the
*input* features — so it takes the sharded output of a column-parallel layer
and sums the ranks' partial products. Between the two, elementwise
activations run on the shards with no communication at all: an MLP block
costs one allreduce forward (reduce_from_parallel) and one backward
(copy_to_parallel), as in Shoeybi et al. 2019, section 3.

Initialisation draws the *full* matrix exactly as `nn.Linear` would (same
`rng`, same order) and keeps this rank's slice, so a tensor-parallel model
equals the single-process model of the same seed for any group size.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..autodiff import Tensor
from ..comm import Communicator
from ..comm.collectives import (
    copy_to_parallel,
    gather_from_parallel,
    reduce_from_parallel,
    scatter_to_parallel,
)
from ..nn import GELU, Identity, Linear, Module, Parameter, ReLU, Sequential, Sigmoid, Tanh
from ..nn import functional as F
from ..nn.norm import _BatchNorm

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "ShardedBatchNorm", "TensorParallelMLP",
           "tensor_parallel", "tensor_parallel_state_dict"]

# Layers that act elementwise: they may run on a shard between a column- and a row-parallel Linear.
ELEMENTWISE = (ReLU, Tanh, GELU, Sigmoid, Identity)


def _shard(n: int, comm: Communicator, what: str) -> slice:
    if n % comm.size:
        raise ValueError(f"{what}: {n} features cannot be split evenly over {comm.size} "
                         "tensor-parallel ranks")
    k = n // comm.size
    return slice(comm.rank * k, (comm.rank + 1) * k)


def _full_linear(in_features: int, out_features: int, bias: bool, rng: Any, dtype: Any,
                 source: Linear | None) -> Linear:
    if source is None:
        return Linear(in_features, out_features, bias=bias, rng=rng, dtype=dtype)
    if (source.in_features, source.out_features) != (in_features, out_features):
        raise ValueError(f"source {source!r} does not have in_features={in_features}, "
                         f"out_features={out_features}")
    return source


class ColumnParallelLinear(Module):
    """x @ weight.T + bias, output features split over `comm`: (..., in) -> (..., out/P).

    This rank holds weight rows and bias entries [r*out/P, (r+1)*out/P)
    (weight (out/P, in)). The input is replicated on every rank and enters
    through `copy_to_parallel` (its gradient is the allreduce of the shards'
    ones). With `gather_output` the shards are allgathered into the full
    (..., out) output by `gather_from_parallel` (its backward keeps this
    rank's chunk of the cotangent). `source`: a full Linear to shard instead of drawing a
    new one from `rng`. `out_features` must be divisible by `comm.size`.
    """

    def __init__(self, in_features: int, out_features: int, comm: Communicator,
                 bias: bool = True, gather_output: bool = False, rng: Any = None,
                 dtype: Any = np.float32, *, source: Linear | None = None) -> None:
        super().__init__()
        full = _full_linear(in_features, out_features, bias, rng, dtype, source)
        rows = _shard(full.out_features, comm, "ColumnParallelLinear")
        self.in_features, self.out_features = full.in_features, full.out_features
        self.comm, self.gather_output = comm, bool(gather_output)
        self.weight = Parameter(full.weight.data[rows])
        if full.bias is not None:
            self.bias = Parameter(full.bias.data[rows])
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: Linear, comm: Communicator, gather_output: bool = False
                    ) -> ColumnParallelLinear:
        """This rank's column-parallel shard of an existing Linear (its weights are copied)."""
        return cls(linear.in_features, linear.out_features, comm, linear.bias is not None,
                   gather_output, source=linear)

    def forward(self, x: Any) -> Tensor:
        y = F.linear(copy_to_parallel(x, self.comm), self.weight, self.bias)
        return gather_from_parallel(y, self.comm) if self.gather_output else y

    def full_state(self) -> dict[str, np.ndarray]:
        """{"weight": (out, in), "bias": (out,)} gathered from every rank. Collective."""
        return {k: _gather(p.data, self.comm, 0) for k, p in self._parameters.items()
                if p is not None}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"(this rank: {self.weight.shape[0]}), ranks={self.comm.size}, "
                f"gather_output={self.gather_output}")


class RowParallelLinear(Module):
    """x @ weight.T + bias, input features split over `comm`: (..., in/P) -> (..., out).

    This rank holds weight columns [r*in/P, (r+1)*in/P) (weight (out, in/P));
    the partial products are summed by `reduce_from_parallel` and the bias
    (out,), replicated, is added once after the sum. With `input_is_parallel`
    (default) x is already this rank's shard, e.g. the output of a
    ColumnParallelLinear; otherwise x is replicated (..., in) and each rank
    takes its slice with `scatter_to_parallel`. `in_features` must be divisible by `comm.size`.
    """

    def __init__(self, in_features: int, out_features: int, comm: Communicator,
                 bias: bool = True, input_is_parallel: bool = True, rng: Any = None,
                 dtype: Any = np.float32, *, source: Linear | None = None) -> None:
        super().__init__()
        full = _full_linear(in_features, out_features, bias, rng, dtype, source)
        self._cols = _shard(full.in_features, comm, "RowParallelLinear")
        self.in_features, self.out_features = full.in_features, full.out_features
        self.comm, self.input_is_parallel = comm, bool(input_is_parallel)
        self.weight = Parameter(full.weight.data[:, self._cols])
        if full.bias is not None:
            self.bias = Parameter(full.bias.data)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: Linear, comm: Communicator, input_is_parallel: bool = True
                    ) -> RowParallelLinear:
        """This rank's row-parallel shard of an existing Linear (its weights are copied)."""
        return cls(linear.in_features, linear.out_features, comm, linear.bias is not None,
                   input_is_parallel, source=linear)

    def forward(self, x: Any) -> Tensor:
        if not self.input_is_parallel:
            x = scatter_to_parallel(x, self.comm)
        y = reduce_from_parallel(F.linear(x, self.weight), self.comm)
        return y if self.bias is None else y + self.bias

    def full_state(self) -> dict[str, np.ndarray]:
        """{"weight": (out, in), "bias": (out,)}, the weight gathered from all ranks. Collective."""
        out = {"weight": _gather(self.weight.data, self.comm, 1)}
        if self.bias is not None:
            out["bias"] = self.bias.data.copy()
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (this rank: {self.weight.shape[1]}), "
                f"out_features={self.out_features}, ranks={self.comm.size}, "
                f"input_is_parallel={self.input_is_parallel}")


class ShardedBatchNorm(_BatchNorm):
    """A BatchNorm (or SyncBatchNorm) on this rank's slice of the features, between a column-
    and a row-parallel Linear.

    Batch normalisation's statistics are per feature, so a slice of the features needs nothing
    from the other tensor-parallel ranks; a SyncBatchNorm keeps its sum over the data-parallel
    ranks (who hold the same slice). Weight, bias and running statistics are `source`'s slice;
    `full_state()` gathers them.
    """

    def __init__(self, source: _BatchNorm, comm: Communicator) -> None:
        k = _shard(source.num_features, comm, type(source).__name__)
        like = source.weight if source.weight is not None else source.running_mean
        super().__init__(k.stop - k.start, source.eps, source.momentum,
                         source.weight is not None, source.track_running_stats,
                         like.dtype if like is not None else np.float32)
        object.__setattr__(self, "_dims", source._dims)
        object.__setattr__(self, "_group_sum", source._group_sum)
        object.__setattr__(self, "comm", comm)
        self.full_features = source.num_features
        for name in ("weight", "bias"):  # parameters (Tensors)
            if getattr(self, name) is not None:
                getattr(self, name).data[...] = getattr(source, name).data[k]
        if self.track_running_stats:  # buffers (arrays)
            self.running_mean[...] = source.running_mean[k]
            self.running_var[...] = source.running_var[k]
            self.num_batches_tracked[...] = source.num_batches_tracked

    def full_state(self) -> dict[str, np.ndarray]:
        """Weight, bias and running statistics gathered from every rank. Collective."""
        return {name: value.data.copy() if value.data.ndim == 0 else
                _gather(value.data, self.comm, 0) for name, value in self._state_items()}

    def extra_repr(self) -> str:
        return f"{self.full_features} (this rank: {self.num_features}), ranks={self.comm.size}"


class TensorParallelMLP(Module):
    """The Megatron MLP block: ColumnParallelLinear -> activation -> RowParallelLinear.

    (..., d_model) -> (..., d_model) with the hidden layer (d_hidden, divisible
    by `comm.size`) sharded: input and output are replicated on every rank of
    `comm`, one allreduce forward and one backward. `activation` is an
    elementwise Module (default GELU). Parameters are named fc1.* and fc2.*.
    """

    def __init__(self, d_model: int, d_hidden: int, comm: Communicator,
                 activation: Module | None = None, bias: bool = True, rng: Any = None,
                 dtype: Any = np.float32) -> None:
        super().__init__()
        self.fc1 = ColumnParallelLinear(d_model, d_hidden, comm, bias, rng=rng, dtype=dtype)
        self.act = activation if activation is not None else GELU()
        self.fc2 = RowParallelLinear(d_hidden, d_model, comm, bias, rng=rng, dtype=dtype)

    @classmethod
    def from_linears(cls, fc1: Linear, fc2: Linear, comm: Communicator,
                     activation: Module | None = None) -> TensorParallelMLP:
        """Shard an existing pair Linear(d, h), Linear(h, d) (weights copied)."""
        self = cls.__new__(cls)
        Module.__init__(self)
        self.fc1 = ColumnParallelLinear.from_linear(fc1, comm)
        self.act = activation if activation is not None else GELU()
        self.fc2 = RowParallelLinear.from_linear(fc2, comm)
        return self

    def forward(self, x: Any) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def tensor_parallel(model: Sequential, comm: Communicator) -> Sequential:
    """The same Sequential with its Linear layers split over `comm`, Megatron-style.

    Linear layers are paired: the first of a pair becomes column-parallel and
    the next one, reached through elementwise activations only (ReLU, Tanh,
    GELU, Sigmoid, Identity), row-parallel, so each pair costs one allreduce.
    A column-parallel layer left without a partner (another kind of layer
    follows, or the model ends) gathers its output. Other layers are kept as
    they are (replicated). Layer indices, hence state_dict keys, are unchanged;
    weights are copied from `model`.
    """
    layers = list(model)
    out: list[Module] = []
    open_column: int | None = None  # index in `out` of a column-parallel layer awaiting its row
    for layer in layers:
        if isinstance(layer, Linear):
            if open_column is None:
                out.append(ColumnParallelLinear.from_linear(layer, comm))
                open_column = len(out) - 1
            else:
                out.append(RowParallelLinear.from_linear(layer, comm))
                open_column = None
        elif isinstance(layer, ELEMENTWISE):
            out.append(layer)
        elif isinstance(layer, _BatchNorm) and open_column is not None:
            out.append(ShardedBatchNorm(layer, comm))  # per feature: it runs on the shard
        else:
            if open_column is not None:
                out[open_column].gather_output = True
                open_column = None
            out.append(layer)
    if open_column is not None:
        out[open_column].gather_output = True
    return Sequential(*out)


def tensor_parallel_state_dict(model: Module) -> dict[str, np.ndarray]:
    """The state dict of the unsplit model: tensor-parallel layers' shards gathered. Collective.

    Keys and order are those of `model.state_dict()`, with each column- or
    row-parallel layer's entries replaced by the full arrays, so the result
    loads into the single-process model that `tensor_parallel` was made from.
    """
    state = model.state_dict()
    for prefix, mod in model.named_modules():
        if isinstance(mod, (ColumnParallelLinear, RowParallelLinear, ShardedBatchNorm)):
            for k, v in mod.full_state().items():
                state[f"{prefix}.{k}" if prefix else k] = v
    return state


def _gather(shard: np.ndarray, comm: Communicator, axis: int) -> np.ndarray:
    return np.concatenate(comm.allgather(np.ascontiguousarray(shard)), axis=axis)
