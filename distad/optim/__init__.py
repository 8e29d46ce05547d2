"""Optimizers for distad, PyTorch-shaped: SGD, Adam, AdamW, L-BFGS, clipping, schedules.

>>> opt = ad.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
>>> opt.zero_grad(); loss.backward(); ad.optim.clip_grad_norm(model.parameters(), 1.0)
>>> opt.step()
>>> sched = ad.optim.CosineAnnealingLR(opt, T_max=10); sched.step()   # once per epoch

Updates are written in place into each parameter's `data`; gradients are
only read (clipping replaces them). `state_dict()` holds numpy arrays and plain
numbers only.
"""

from .adam import Adam, AdamW
from .clip import clip_grad_norm, clip_grad_value
from .lbfgs import LBFGS
from .optimizer import Optimizer
from .schedules import CosineAnnealingLR, LinearWarmup, LRScheduler, StepLR
from .sgd import SGD

__all__ = [
    "LBFGS", "SGD", "Adam", "AdamW", "CosineAnnealingLR", "LRScheduler", "LinearWarmup",
    "Optimizer", "StepLR", "clip_grad_norm", "clip_grad_value",
]
