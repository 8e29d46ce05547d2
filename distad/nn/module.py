"""Parameter and Module: the containers every layer is built from (PyTorch-shaped).

A Module registers the Parameters and sub-Modules assigned to its attributes,
in assignment order; that order gives `named_parameters()` and the keys of
`state_dict()` ("0.weight", "0.bias", "2.weight" for a Sequential), exactly as
PyTorch names them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np

from distad.autodiff import Tensor, mark_modified

__all__ = ["Parameter", "Module", "IncompatibleKeys", "functional_call"]


class Parameter(Tensor):
    """A leaf Tensor that a Module registers as trainable (`requires_grad=True`).

    `data` is a private, writeable copy of the given array: floating dtypes are
    kept (float32 by default, float64 for gradient checks), anything else is
    cast to float32. Optimizers update `data` in place; `grad` is replaced, never
    mutated.
    """

    __slots__ = ()

    def __init__(self, data: Any, requires_grad: bool = True) -> None:
        arr = data.data if isinstance(data, Tensor) else np.asarray(data)
        dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float32
        super().__init__(np.array(arr, dtype=dtype, copy=True), requires_grad=requires_grad)

    def __repr__(self) -> str:
        body = np.array2string(self.data, separator=", ", prefix="Parameter(")
        return f"Parameter({body}, dtype={self.data.dtype})"


class IncompatibleKeys(NamedTuple):
    """What `Module.load_state_dict(strict=False)` could not match."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class Module:
    """Base class of layers and models: holds Parameters and sub-Modules, maps inputs to outputs.

    Subclasses call `super().__init__()`, assign Parameters and Modules as
    attributes (they are registered in that order) and define `forward`;
    `module(x)` calls `forward(x)`. `training` is True after construction and
    switched recursively by `train()` / `eval()` (Dropout and BatchNorm read it).
    Buffers (`register_buffer`) are arrays that are state but not parameters, such as
    BatchNorm's running statistics: no gradient, but saved in `state_dict`, cast by `to`
    and kept equal across ranks by DataParallel.
    """

    training: bool

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "_buffers", {})
        object.__setattr__(self, "_non_persistent", set())
        object.__setattr__(self, "training", True)

    # ---- registration --------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        params = self.__dict__.get("_parameters")
        if params is None:
            raise AttributeError(f"cannot assign {name!r} before Module.__init__() was called "
                                 f"(call super().__init__() first in {type(self).__name__})")
        modules = self.__dict__["_modules"]
        if isinstance(value, Parameter):
            self._forget(name)
            params[name] = value
        elif isinstance(value, Module):
            self._forget(name)
            modules[name] = value
        elif name in params:
            if value is not None and not isinstance(value, Tensor):
                raise TypeError(f"cannot assign {type(value).__name__} to parameter {name!r} "
                                "(expected a Parameter or None)")
            params[name] = value
        elif name in modules:
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} to submodule {name!r} "
                                "(expected a Module or None)")
            modules[name] = None
        elif name in self.__dict__["_buffers"]:
            if value is not None and not isinstance(value, np.ndarray):
                raise TypeError(f"cannot assign {type(value).__name__} to buffer {name!r} "
                                "(expected a numpy array or None)")
            self.__dict__["_buffers"][name] = value
        else:
            object.__setattr__(self, name, value)

    def _forget(self, name: str) -> None:
        self.__dict__.pop(name, None)
        self.__dict__["_parameters"].pop(name, None)
        self.__dict__["_modules"].pop(name, None)
        self.__dict__["_buffers"].pop(name, None)
        self.__dict__["_non_persistent"].discard(name)

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: registered parameters and submodules.
        d = self.__dict__
        if "_parameters" in d:
            if name in d["_parameters"]:
                return d["_parameters"][name]
            if name in d["_modules"]:
                return d["_modules"][name]
            if name in d["_buffers"]:
                return d["_buffers"][name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name: str) -> None:
        if name in self._parameters:
            del self._parameters[name]
        elif name in self._modules:
            del self._modules[name]
        elif name in self._buffers:
            del self._buffers[name]
            self._non_persistent.discard(name)
        else:
            object.__delattr__(self, name)

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        """Register `param` under `name`; None reserves the name (e.g. `bias=False`)."""
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"register_parameter: {name!r} must be a Parameter or None, "
                            f"got {type(param).__name__}")
        self._forget(name)
        self._parameters[name] = param

    def register_buffer(self, name: str, value: np.ndarray | None,
                        persistent: bool = True) -> None:
        """Register the array `value` as a buffer under `name` (None reserves the name).

        A buffer is state without a gradient (BatchNorm's running mean): `module.name` reads
        and assigns it, `state_dict` saves it unless `persistent=False`.
        """
        if value is not None and not isinstance(value, np.ndarray):
            raise TypeError(f"register_buffer: {name!r} must be a numpy array or None, "
                            f"got {type(value).__name__}")
        self._forget(name)
        self._buffers[name] = value
        if not persistent:
            self._non_persistent.add(name)

    def add_module(self, name: str, module: Module | None) -> None:
        """Register `module` as a child under `name` (what attribute assignment does)."""
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"add_module: {name!r} must be a Module, got {type(module).__name__}")
        self._forget(name)
        self._modules[name] = module

    # ---- traversal -----------------------------------------------------------------------
    def named_modules(self, prefix: str = "", memo: set | None = None
                      ) -> Iterator[tuple[str, Module]]:
        """(name, module) for self and every descendant, pre-order, each module once."""
        memo = set() if memo is None else memo
        if id(self) in memo:
            return
        memo.add(id(self))
        yield prefix, self
        for name, child in self._modules.items():
            if child is not None:
                yield from child.named_modules(f"{prefix}.{name}" if prefix else name, memo)

    def modules(self) -> Iterator[Module]:
        """Self and every descendant module, pre-order."""
        for _, m in self.named_modules():
            yield m

    def named_children(self) -> Iterator[tuple[str, Module]]:
        for name, child in self._modules.items():
            if child is not None:
                yield name, child

    def children(self) -> Iterator[Module]:
        """The direct sub-modules, in registration order."""
        for _, child in self.named_children():
            yield child

    def named_parameters(self, prefix: str = "", recurse: bool = True
                         ) -> Iterator[tuple[str, Parameter]]:
        """(dotted name, Parameter) in registration order; a shared Parameter appears once."""
        seen: set[int] = set()
        mods = self.named_modules(prefix) if recurse else iter([(prefix, self)])
        for mod_prefix, mod in mods:
            for name, p in mod._parameters.items():
                if p is None or id(p) in seen:
                    continue
                seen.add(id(p))
                yield (f"{mod_prefix}.{name}" if mod_prefix else name), p

    def parameters(self, recurse: bool = True) -> Iterator[Parameter]:
        """The Parameters of `named_parameters()` (an iterator, as in PyTorch)."""
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(self, prefix: str = "", recurse: bool = True
                      ) -> Iterator[tuple[str, np.ndarray]]:
        """(dotted name, array) of every buffer, in registration order."""
        mods = self.named_modules(prefix) if recurse else iter([(prefix, self)])
        for mod_prefix, mod in mods:
            for name, b in mod._buffers.items():
                if b is not None:
                    yield (f"{mod_prefix}.{name}" if mod_prefix else name), b

    def buffers(self, recurse: bool = True) -> Iterator[np.ndarray]:
        """The arrays of `named_buffers()`."""
        for _, b in self.named_buffers(recurse=recurse):
            yield b

    # ---- modes, gradients, dtype ---------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        """Set `training` on self and every descendant; returns self."""
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self) -> Module:
        """`train(False)`: Dropout becomes the identity."""
        return self.train(False)

    def zero_grad(self) -> None:
        """Set every parameter's `.grad` to None (PyTorch's default `set_to_none=True`)."""
        for p in self.parameters():
            p.grad = None

    def to(self, dtype: Any) -> Module:
        """Cast every parameter (and gradient) and every floating buffer to the floating
        `dtype` in place; returns self. Integer buffers (counters) keep their dtype."""
        dtype = np.dtype(dtype)
        if not np.issubdtype(dtype, np.floating):
            raise TypeError(f"Module.to: parameters must stay floating point, got {dtype}")
        for p in self.parameters():
            p.data = p.data.astype(dtype)
            if p.grad is not None:
                p.grad = p.grad.astype(dtype)
        for m in self.modules():
            for name, b in m._buffers.items():
                if b is not None and np.issubdtype(b.dtype, np.floating):
                    m._buffers[name] = b.astype(dtype)
        return self

    def float(self) -> Module:
        """`to(np.float32)`."""
        return self.to(np.float32)

    def double(self) -> Module:
        """`to(np.float64)` (for gradient checks)."""
        return self.to(np.float64)

    # ---- state ---------------------------------------------------------------------------
    def _state_items(self, prefix: str = "") -> Iterator[tuple[str, Any]]:
        # PyTorch's traversal: own parameters, own persistent buffers, then each child's,
        # recursively; no dedup. Each item has `.data` (read and assigned) and `.shape`.
        for name, p in self._parameters.items():
            if p is not None:
                yield prefix + name, p
        for name, b in self._buffers.items():
            if b is not None and name not in self._non_persistent:
                yield prefix + name, _BufferSlot(self, name)
        for name, child in self._modules.items():
            if child is not None:
                yield from child._state_items(f"{prefix}{name}.")

    def state_dict(self) -> dict[str, np.ndarray]:
        """{dotted name: copy of the parameter's or buffer's array}, in PyTorch's key order.

        The arrays are copies, so a later optimizer step does not change a saved
        state (PyTorch shares storage instead).
        """
        return {k: p.data.copy() for k, p in self._state_items()}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True
                        ) -> IncompatibleKeys:
        """Copy the arrays of `state_dict` into the parameters and buffers of the same names.

        Values are cast to each parameter's (buffer's) dtype. A shape mismatch always
        raises (naming the key and both shapes); missing or unexpected keys
        raise when `strict`, else they are returned as `IncompatibleKeys`.
        Nothing is changed unless every check passes.
        """
        own = dict(self._state_items())
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        errors = []
        if strict and (missing or unexpected):
            if missing:
                errors.append(f"missing keys: {missing}")
            if unexpected:
                errors.append(f"unexpected keys: {unexpected}")
        staged = []
        for k, p in own.items():
            if k not in state_dict:
                continue
            v = state_dict[k]
            arr = np.asarray(v.data if isinstance(v, Tensor) else v)
            if arr.shape != p.shape:
                errors.append(f"size mismatch for {k!r}: the state_dict has shape {arr.shape}, "
                              f"the parameter in this model has shape {p.shape}")
                continue
            staged.append((p, arr))
        if errors:
            raise ValueError(f"load_state_dict for {type(self).__name__}: " + "; ".join(errors))
        for p, arr in staged:
            if p.data.flags.writeable:
                p.data[...] = arr  # in place, as PyTorch's copy_: views of p.data stay valid
            else:
                p.data = np.array(arr, dtype=p.data.dtype, copy=True)
            if isinstance(p, Tensor):
                mark_modified(p)
        return IncompatibleKeys(missing, unexpected)

    # ---- calling and printing ------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def extra_repr(self) -> str:
        """The text inside the parentheses of this module's repr (its hyperparameters)."""
        return ""

    def __repr__(self) -> str:
        lines = [f"({name}): " + repr(child).replace("\n", "\n  ")
                 for name, child in self._modules.items()]
        extra = self.extra_repr()
        if not lines:
            return f"{type(self).__name__}({extra})"
        body = "\n  ".join(([extra] if extra else []) + lines)
        return f"{type(self).__name__}(\n  {body}\n)"


class _BufferSlot:
    """A module's buffer seen as `state_dict` sees a Parameter: `.data` and `.shape`."""

    def __init__(self, module: Module, name: str) -> None:
        self.module, self.name = module, name

    @property
    def data(self) -> np.ndarray:
        return self.module._buffers[self.name]

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self.module._buffers[self.name] = value

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape


def functional_call(module: Module, params: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
    """Call `module(*args, **kwargs)` with some parameters replaced by the given values.

    `params` maps dotted names (as in `named_parameters()`) to arrays or Tensors
    used for this call only, so a module can be differentiated as a function of
    its parameters: `ad.grad(lambda w: loss(functional_call(m, {"0.weight": w}, x)))`.
    The module's own Parameters are restored afterwards, even on error.
    """
    swapped = []
    try:
        for name, value in params.items():
            owner_path, _, leaf = name.rpartition(".")
            owner = module
            for part in owner_path.split(".") if owner_path else ():
                owner = owner._modules.get(part)
                if owner is None:
                    raise KeyError(f"functional_call: no submodule {part!r} in {name!r}")
            if leaf not in owner._parameters:
                raise KeyError(f"functional_call: {type(owner).__name__} has no parameter "
                               f"{leaf!r} (from {name!r})")
            swapped.append((owner, leaf, owner._parameters[leaf]))
            owner._parameters[leaf] = value if isinstance(value, Tensor) else Tensor(
                np.asarray(value))
        return module(*args, **kwargs)
    finally:
        for owner, leaf, original in reversed(swapped):
            owner._parameters[leaf] = original
