"""Spec strings: ``COMPRESSOR[:ARG...][+MEMORY[:ARG]][@AGGREGATION]`` -> GradientCompression.

Examples: ``none``, ``fp16``, ``qsgd:16``, ``topk:0.01+ef``, ``randk:0.01:rescale``,
``topk:0.001+dgc:0.9``, ``powersgd:2+ef``, ``int8:stochastic@allgather``. The CLI passes its
``--compress`` value here.
"""

from __future__ import annotations

from collections.abc import Callable

from .aggregate import STRATEGIES, CostModel
from .base import Compressor
from .casts import BF16, FP16, Identity
from .gradient_compression import GradientCompression
from .memory import DGCMomentum, ErrorFeedback, Memory, NoMemory
from .powersgd import PowerSGD
from .quantizers import QSGD, EFSign, Int8, OneBit, Sign, TernGrad
from .sparsifiers import RandK, Threshold, TopK

_USAGE = {
    "none": "none",
    "fp16": "fp16",
    "bf16": "bf16",
    "int8": "int8[:stochastic]",
    "qsgd": "qsgd:LEVELS, e.g. qsgd:16",
    "terngrad": "terngrad",
    "sign": "sign",
    "efsign": "efsign",
    "onebit": "onebit[:COLUMN], e.g. onebit:1024",
    "topk": "topk:RATIO, e.g. topk:0.01",
    "randk": "randk:RATIO[:rescale], e.g. randk:0.01:rescale",
    "threshold": "threshold:DENSITY, e.g. threshold:1e-3",
    "powersgd": "powersgd:RANK, e.g. powersgd:2",
}
_PLAIN: dict[str, Callable[[], Compressor]] = {
    "none": Identity,
    "fp16": FP16,
    "bf16": BF16,
    "terngrad": TernGrad,
    "sign": Sign,
    "efsign": EFSign,
}


class _SpecError(ValueError):
    """A bad spec, already worded with the spec and the usage line."""


class _Args:
    """The ':'-separated arguments of one spec part, with errors that quote the spec."""

    def __init__(self, spec: str, usage: str, args: list[str]) -> None:
        self.spec, self.usage, self.args = spec, usage, args

    def error(self, what: str) -> _SpecError:
        return _SpecError(f"spec {self.spec!r}: {what} (usage: {self.usage})")

    def count(self, least: int, most: int) -> list[str]:
        if not least <= len(self.args) <= most:
            raise self.error(f"takes {least}..{most} arguments, got {len(self.args)}")
        return self.args

    def number(self, i: int, kind: type = float):
        try:
            return kind(self.args[i])
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise self.error(f"{self.args[i]!r} is not {what}") from None

    def flag(self, i: int, word: str) -> bool:
        if len(self.args) <= i:
            return False
        if self.args[i] != word:
            raise self.error(f"unknown option {self.args[i]!r}")
        return True


def _build(name: str, a: _Args) -> Compressor:
    if name in _PLAIN:
        a.count(0, 0)
        return _PLAIN[name]()
    if name == "int8":
        a.count(0, 1)
        return Int8(stochastic=a.flag(0, "stochastic"))
    if name == "onebit":
        return OneBit(a.number(0, int)) if a.count(0, 1) else OneBit()
    if name == "randk":
        a.count(1, 2)
        return RandK(a.number(0), rescale=a.flag(1, "rescale"))
    a.count(1, 1)
    if name == "qsgd":
        return QSGD(a.number(0, int))
    if name == "topk":
        return TopK(a.number(0))
    if name == "threshold":
        return Threshold(a.number(0))
    return PowerSGD(a.number(0, int))


_MEMORIES = {"ef": "+ef", "dgc": "+dgc[:MOMENTUM]"}


def names() -> tuple[str, ...]:
    """The compressor names ``get`` knows."""
    return tuple(_USAGE)


def usage() -> str:
    """One line listing the grammar and every compressor, memory and aggregation."""
    compressors = ", ".join(_USAGE.values())
    return (
        f"compressors: {compressors}; memory: {', '.join(_MEMORIES.values())}; "
        f"aggregation: @auto, {', '.join('@' + s for s in STRATEGIES)}"
    )


def parse_compressor(text: str, spec: str | None = None) -> Compressor:
    """The compressor of a spec's first part, e.g. ``"topk:0.01"`` -> ``TopK(0.01)``."""
    spec = text if spec is None else spec
    name, *args = text.strip().split(":")
    if name not in _USAGE:
        raise ValueError(f"unknown compressor {name!r} in spec {spec!r}; {usage()}")
    a = _Args(spec, _USAGE[name], args)
    try:
        return _build(name, a)
    except _SpecError:
        raise
    except ValueError as e:  # a constructor's own check, e.g. a ratio outside (0, 1]
        raise a.error(str(e)) from None


def _parse_memory(text: str, spec: str) -> Memory:
    name, *args = text.split(":")
    if name == "ef" and not args:
        return ErrorFeedback()
    if name == "dgc" and len(args) <= 1:
        a = _Args(spec, _MEMORIES["dgc"], args)
        momentum = a.number(0) if args else 0.9
        try:
            return DGCMomentum(momentum)
        except ValueError as e:
            raise a.error(str(e)) from None
    raise ValueError(f"unknown memory {'+' + text!r} in spec {spec!r}; {usage()}")


def get(spec: str, *, seed: int = 0, cost_model: CostModel | None = None) -> GradientCompression:
    """Build a :class:`GradientCompression` from a spec string.

    ``COMPRESSOR[:ARG...][+MEMORY[:ARG]][@AGGREGATION]``: the compressor and its arguments
    (see ``usage()``), an optional memory (``+ef`` error feedback, ``+dgc[:m]`` DGC momentum
    correction, sparsifiers only), an optional aggregation that overrides the compressor's
    preferred one (``@auto`` lets the cost model choose). ``seed`` seeds the per-rank and
    shared random streams. Raises ValueError naming the bad part and listing the valid ones.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"compression spec must be a non-empty string, got {spec!r}; {usage()}")
    body, at, aggregation = spec.strip().partition("@")
    head, plus, memory_text = body.partition("+")
    if "+" in memory_text:
        raise ValueError(f"spec {spec!r} has more than one memory; {usage()}")
    compressor = parse_compressor(head, spec)
    memory = _parse_memory(memory_text, spec) if plus else NoMemory()
    if isinstance(memory, DGCMomentum) and not compressor.sparse:
        raise ValueError(
            f"spec {spec!r}: DGC momentum correction masks the coordinates a sparsifier sent; "
            f"use it with topk, randk or threshold, not {compressor.name}"
        )
    if at and aggregation != "auto" and aggregation not in STRATEGIES:
        raise ValueError(f"unknown aggregation {'@' + aggregation!r} in spec {spec!r}; {usage()}")
    try:
        return GradientCompression(
            compressor,
            memory,
            aggregation if at else None,
            cost_model if cost_model is not None else CostModel(),
            seed,
        )
    except ValueError as e:
        raise ValueError(f"spec {spec!r}: {e}") from None
