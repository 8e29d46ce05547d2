"""Gradient compression: compressors, memory (error feedback, DGC) and aggregation over MPI.

Three separate axes, as in GRACE: a :class:`Compressor` encodes a flat float32 bucket into a
:class:`Payload` of wire arrays and back; a :class:`Memory` feeds what compression left behind
into the next step; an aggregation strategy (``aggregate.py``, the only code here that calls
MPI) averages the payloads over the ranks. ``get(spec)`` builds the three from a spec string
such as ``"topk:0.01+ef"`` into a :class:`GradientCompression`. See docs/compression.md.
"""

from .aggregate import (
    STRATEGIES,
    Aggregated,
    CostModel,
    aggregate,
    allgather_payloads,
    allreduce_payloads,
    choose_aggregation,
    dense_allreduce,
    majority_vote,
    powersgd_exchange,
    two_phase_exchange,
)
from .base import Compressor, Payload, SparseVector
from .casts import BF16, FP16, Identity
from .gradient_compression import GradientCompression
from .memory import DGCMomentum, ErrorFeedback, Memory, NoMemory
from .powersgd import PowerSGD
from .quantizers import QSGD, EFSign, Int8, OneBit, Sign, TernGrad
from .sparsifiers import RandK, Threshold, TopK
from .spec import get, names, parse_compressor, usage

__all__ = [
    "BF16",
    "FP16",
    "QSGD",
    "STRATEGIES",
    "Aggregated",
    "Compressor",
    "CostModel",
    "DGCMomentum",
    "EFSign",
    "ErrorFeedback",
    "GradientCompression",
    "Identity",
    "Int8",
    "Memory",
    "NoMemory",
    "OneBit",
    "Payload",
    "PowerSGD",
    "RandK",
    "Sign",
    "SparseVector",
    "TernGrad",
    "Threshold",
    "TopK",
    "aggregate",
    "allgather_payloads",
    "allreduce_payloads",
    "choose_aggregation",
    "dense_allreduce",
    "get",
    "majority_vote",
    "names",
    "parse_compressor",
    "powersgd_exchange",
    "two_phase_exchange",
    "usage",
]
