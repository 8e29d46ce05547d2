"""Loss modules: thin wrappers over the functional losses, for use in model definitions."""

from __future__ import annotations

from typing import Any

from distad.autodiff import Tensor

from . import functional as F
from .module import Module

__all__ = ["CrossEntropyLoss", "MSELoss", "NLLLoss"]


class CrossEntropyLoss(Module):
    """`F.cross_entropy(logits (N, C), labels (N,), label_smoothing, reduction)`."""

    def __init__(self, label_smoothing: float = 0.0, reduction: str = "mean") -> None:
        super().__init__()
        self.label_smoothing, self.reduction = float(label_smoothing), reduction

    def forward(self, logits: Any, labels: Any) -> Tensor:
        return F.cross_entropy(logits, labels, self.label_smoothing, self.reduction)


class NLLLoss(Module):
    """`F.nll_loss(log_probs (N, C), labels (N,), reduction)`."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, log_probs: Any, labels: Any) -> Tensor:
        return F.nll_loss(log_probs, labels, self.reduction)


class MSELoss(Module):
    """`F.mse_loss(prediction, target, reduction)`."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, prediction: Any, target: Any) -> Tensor:
        return F.mse_loss(prediction, target, self.reduction)
