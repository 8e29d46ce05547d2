"""The Optimizer base class: parameter groups, per-parameter state, state_dict.

Shaped like PyTorch's: `param_groups` is a list of dicts, each with "params"
(a list of Parameters) and its hyperparameters; `state` maps a Parameter to a
dict of numpy arrays and plain numbers. Updates are written in place into
`p.data`; gradients (`p.grad`) are read, never modified.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from distad._blocked import BLOCK, block_slices
from distad.autodiff import Tensor, enable_grad, mark_modified

__all__ = ["Optimizer"]

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]


class Optimizer:
    """Base class: holds `param_groups`, `state`, `defaults`; subclasses define `step`.

    `params` is an iterable of Parameters (one group) or of dicts, each with a
    "params" entry and optional per-group hyperparameters that override
    `defaults`. `state_dict()` gives {"state": {index: {name: array | number}},
    "param_groups": [{hyper: value, "params": [indices]}]} with parameters
    numbered in group order, as in PyTorch; no objects that need pickle.
    """

    # State entries that have the parameter's shape (checked and cast on load).
    per_param_state: tuple[str, ...] = ()

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        self.defaults = dict(defaults)
        self.state: dict[Tensor, dict[str, Any]] = {}
        self.param_groups: list[dict[str, Any]] = []
        groups = list(params) if not isinstance(params, Tensor) else [params]
        if not groups:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for g in groups:
            self.add_param_group(g)

    def add_param_group(self, group: dict[str, Any]) -> None:
        """Add a group of parameters with its own hyperparameters (the rest from defaults)."""
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(f"{type(self).__name__}: a parameter group is a dict with 'params'")
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        name = type(self).__name__
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"{name}: can only optimize Tensors, got {type(p).__name__}")
            if not p.is_leaf or not p.requires_grad:
                raise ValueError(f"{name}: can only optimize leaf Tensors that require a gradient")
            if not np.issubdtype(p.dtype, np.floating):
                raise TypeError(f"{name}: parameters must be floating point, got {p.dtype}")
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if len({id(p) for p in params}) != len(params) or any(id(p) in seen for p in params):
            raise ValueError(f"{name}: a parameter appears more than once")
        unknown = set(group) - set(self.defaults) - {"params"}
        if unknown:
            raise TypeError(f"{name}: unknown hyperparameters {sorted(unknown)}")
        full = {**self.defaults, **group, "params": params}
        self._check_group(full)
        self.param_groups.append(full)

    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate one group's hyperparameters (subclasses raise ValueError)."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop every parameter's gradient (None; or zeros with set_to_none=False)."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None if set_to_none or p.grad is None else np.zeros_like(p.data)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update from the current `.grad`s; `closure` (if given) recomputes the loss first."""
        loss = None
        if closure is not None:
            with enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, p.grad, self.state.setdefault(p, {}), group)
                    mark_modified(p)
        return loss

    def _update(self, p: Tensor, grad: np.ndarray, state: dict, group: dict) -> None:
        raise NotImplementedError

    def _blocked(self, kernel: Callable[..., None], arrays: Sequence[np.ndarray | None],
                 *args: Any) -> None:
        """`kernel(*arrays, *args, t1, t2)` on consecutive blocks of `arrays` (the weights
        first, then arrays of their shape: gradient, state; None passes through), with two
        scratch arrays kept from step to step, so that the kernel's chain of operations stays
        in cache (distad._blocked). Arrays that are not C-contiguous, or not of the weights'
        dtype, get one call on the whole arrays with fresh scratch instead."""
        w = arrays[0]
        if not all(a is None or (a.flags.c_contiguous and a.dtype == w.dtype) for a in arrays):
            kernel(*arrays, *args, np.empty_like(w), np.empty_like(w))
            return
        flat = [None if a is None else a.reshape(-1) for a in arrays]
        cache = self.__dict__.setdefault("_blocks", {})
        if w.dtype not in cache:
            cache[w.dtype] = (np.empty(BLOCK, w.dtype), np.empty(BLOCK, w.dtype))
        t1, t2 = cache[w.dtype]
        for s in block_slices(w.size):
            k = s.stop - s.start
            kernel(*(None if a is None else a[s] for a in flat), *args, t1[:k], t2[:k])

    # ---- state ---------------------------------------------------------------------------
    def _indexed_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _indexed_groups(self) -> list[dict[str, Any]]:
        """The parameter groups as state_dict() gives them: hyperparameters (copied), and
        the parameters as their indices in group order."""
        groups, start = [], 0
        for g in self.param_groups:
            n = len(g["params"])
            groups.append({**{k: copy.deepcopy(v) for k, v in g.items() if k != "params"},
                           "params": list(range(start, start + n))})
            start += n
        return groups

    def state_dict(self) -> dict[str, Any]:
        """A deep copy of state and hyperparameters, parameters referred to by index."""
        params = self._indexed_params()
        index = {id(p): i for i, p in enumerate(params)}
        state = {index[id(p)]: _copy_state(s) for p, s in self.state.items() if id(p) in index}
        return {"state": dict(sorted(state.items())), "param_groups": self._indexed_groups()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore state and hyperparameters saved by `state_dict()` (copied, cast to dtypes)."""
        name = type(self).__name__
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{name}.load_state_dict: the state has {len(groups)} parameter "
                             f"groups, this optimizer {len(self.param_groups)}")
        for i, (saved, own) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(own["params"]):
                raise ValueError(f"{name}.load_state_dict: group {i} has "
                                 f"{len(saved['params'])} parameters in the state, "
                                 f"{len(own['params'])} here")
        by_index = {}
        for saved, own in zip(groups, self.param_groups):
            for i, p in zip(saved["params"], own["params"]):
                by_index[int(i)] = p
        new_state: dict[Tensor, dict[str, Any]] = {}
        for i, s in state_dict["state"].items():
            p = by_index.get(int(i))
            if p is None:
                raise ValueError(f"{name}.load_state_dict: state for unknown parameter {i}")
            new_state[p] = self._cast_state(p, int(i), _copy_state(s))
        for saved, own in zip(groups, self.param_groups):
            for k, v in saved.items():
                if k != "params":
                    own[k] = copy.deepcopy(v)
        self.state = new_state

    def _cast_state(self, p: Tensor, index: int, state: dict[str, Any]) -> dict[str, Any]:
        for k in self.per_param_state:
            v = state.get(k)
            if v is None:
                continue
            if np.shape(v) != p.shape:
                raise ValueError(f"{type(self).__name__}.load_state_dict: state {k!r} of "
                                 f"parameter {index} has shape {np.shape(v)}, the parameter "
                                 f"{p.shape}")
            state[k] = np.asarray(v, dtype=p.dtype)
        return state

    @property
    def state_nbytes(self) -> int:
        """Bytes of the arrays in this optimizer's state (what it keeps besides the
        parameters: Adam's two moments, SGD's momentum)."""
        return _nbytes(self.state)

    def __repr__(self) -> str:
        lines = [type(self).__name__ + " ("]
        for i, g in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines += [f"    {k}: {v}" for k, v in sorted(g.items()) if k != "params"]
        return "\n".join(lines) + "\n)"


def _copy_state(value: Any) -> Any:
    """Deep copy of arrays, numbers, None and lists/tuples/dicts of them (no other objects)."""
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, dict):
        return {k: _copy_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_state(v) for v in value)
    if value is None or isinstance(value, (numbers.Number, str, np.generic)):
        return value
    raise TypeError(f"optimizer state may hold arrays and numbers only, got {type(value).__name__}")


def _nbytes(value: Any) -> int:
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0
