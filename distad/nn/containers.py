"""Containers: Sequential (a chain of modules) and ModuleList (a list of them)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from .module import Module

__all__ = ["ModuleList", "Sequential"]


def _index(i: int, n: int, owner: str) -> int:
    if not -n <= i < n:
        raise IndexError(f"{owner}: index {i} is out of range for {n} modules")
    return i % n


class Sequential(Module):
    """Modules applied in order: `Sequential(a, b, c)(x) == c(b(a(x)))`.

    The children are named "0", "1", ... so parameters and state_dict keys read
    "0.weight", "0.bias", "2.weight" as in PyTorch. Indexable (an int gives a
    module, a slice a new Sequential sharing the modules), iterable, `len`.
    """

    def __init__(self, *modules: Module) -> None:
        super().__init__()
        for i, m in enumerate(modules):
            self.add_module(str(i), m)

    def __getitem__(self, i: int | slice) -> Any:
        mods = list(self._modules.values())
        if isinstance(i, slice):
            return Sequential(*mods[i])
        return mods[_index(i, len(mods), "Sequential")]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def append(self, module: Module) -> Sequential:
        """Add `module` at the end (named by its position); returns self."""
        self.add_module(str(len(self)), module)
        return self

    def forward(self, x: Any) -> Any:
        for m in self._modules.values():
            x = m(x)
        return x


class ModuleList(Module):
    """A list of modules whose parameters are registered ("0.weight", "1.weight", ...)."""

    def __init__(self, modules: Iterable[Module] = ()) -> None:
        super().__init__()
        for m in modules:
            self.append(m)

    def __getitem__(self, i: int | slice) -> Any:
        mods = list(self._modules.values())
        if isinstance(i, slice):
            return ModuleList(mods[i])
        return mods[_index(i, len(mods), "ModuleList")]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def append(self, module: Module) -> ModuleList:
        self.add_module(str(len(self)), module)
        return self
