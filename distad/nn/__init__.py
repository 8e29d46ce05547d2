"""Models for distad, PyTorch-shaped: Module, Parameter, layers, losses, initialisers.

>>> model = ad.nn.Sequential(ad.nn.Linear(64, 128, rng=0), ad.nn.ReLU(), ad.nn.Linear(128, 10))
>>> loss = ad.nn.functional.cross_entropy(model(xb), yb)     # yb: integer labels
>>> list(model.state_dict())
['0.weight', '0.bias', '2.weight', '2.bias']

Layers with weights draw them from `rng=` (a numpy Generator, an int seed, or
None for the default Generator, reset by `ad.nn.init.manual_seed(s)`), so the
same seeds give the same model. `functional` (also `F`) holds the functional
forms; `init` the initialisers.
"""

from . import functional, init
from . import functional as F  # noqa: N812 — the name PyTorch users expect
from .containers import ModuleList, Sequential
from .conv import AvgPool2d, Conv2d, MaxPool2d
from .layers import GELU, Dropout, Embedding, Flatten, Identity, Linear, ReLU, Sigmoid, Tanh
from .losses import CrossEntropyLoss, MSELoss, NLLLoss
from .module import IncompatibleKeys, Module, Parameter, functional_call
from .norm import BatchNorm1d, BatchNorm2d, LayerNorm

__all__ = [
    "AvgPool2d", "BatchNorm1d", "BatchNorm2d", "Conv2d", "CrossEntropyLoss", "Dropout",
    "Embedding", "F", "Flatten", "GELU", "Identity", "IncompatibleKeys", "LayerNorm", "Linear",
    "MSELoss", "MaxPool2d", "Module",
    "ModuleList", "NLLLoss", "Parameter", "ReLU", "Sequential", "Sigmoid", "Tanh",
    "functional", "functional_call", "init",
]
