"""Learning-rate schedules: step decay, cosine annealing, linear warm-up.

Each schedule is a closed form lr(epoch) per parameter group, from the
group's "initial_lr" (its lr when the first schedule was attached). As in
PyTorch, constructing a schedule sets epoch 0; call `sched.step()` after
`opt.step()` once per epoch (or per iteration, if the counts are in steps).
"""

from __future__ import annotations

import math
from typing import Any

from .optimizer import Optimizer

__all__ = ["CosineAnnealingLR", "LRScheduler", "LinearWarmup", "StepLR"]


class LRScheduler:
    """Base class: sets each group's lr to `lr_at(last_epoch)` on every `step()`."""

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(self).__name__}: expected an Optimizer, got "
                            f"{type(optimizer).__name__}")
        self.optimizer = optimizer
        for i, g in enumerate(optimizer.param_groups):
            if last_epoch == -1:
                g.setdefault("initial_lr", g["lr"])
            elif "initial_lr" not in g:
                raise KeyError(f"{type(self).__name__}: resuming at epoch {last_epoch} needs "
                               f"'initial_lr' in parameter group {i}")
        self.base_lrs = [float(g["initial_lr"]) for g in optimizer.param_groups]
        self.last_epoch = last_epoch
        self.step()

    def lr_at(self, epoch: int) -> list[float]:
        """The learning rate of every parameter group at `epoch`."""
        raise NotImplementedError

    def step(self) -> None:
        """Advance one epoch and write the new learning rates into the optimizer."""
        self.last_epoch += 1
        self._last_lr = self.lr_at(self.last_epoch)
        for g, lr in zip(self.optimizer.param_groups, self._last_lr):
            g["lr"] = lr

    def seek(self, epoch: int) -> None:
        """Set the learning rates of `epoch` directly, as `epoch` calls of `step()` after
        construction would (a run resumed at another step count than it saved)."""
        if epoch < 0:
            raise ValueError(f"{type(self).__name__}.seek: epoch must be >= 0, got {epoch}")
        self.last_epoch = epoch - 1
        self.step()

    def get_last_lr(self) -> list[float]:
        """The learning rates set by the last `step()` (one per parameter group)."""
        return list(self._last_lr)

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers and lists: everything but the optimizer."""
        return {k: (v.state_dict() if isinstance(v, LRScheduler) else
                    list(v) if isinstance(v, list) else v)
                for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for k, v in state_dict.items():
            own = self.__dict__.get(k)
            if isinstance(own, LRScheduler):
                own.load_state_dict(v)
            else:
                self.__dict__[k] = list(v) if isinstance(v, list) else v


class StepLR(LRScheduler):
    """lr = initial_lr * gamma ** (epoch // step_size)."""

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1,
                 last_epoch: int = -1) -> None:
        if step_size < 1:
            raise ValueError(f"StepLR: step_size must be >= 1, got {step_size}")
        self.step_size, self.gamma = int(step_size), float(gamma)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, epoch: int) -> list[float]:
        return [base * self.gamma ** (epoch // self.step_size) for base in self.base_lrs]


class CosineAnnealingLR(LRScheduler):
    """lr = eta_min + (initial_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2.

    (The closed form; past T_max it rises again, periodically.)
    """

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0,  # noqa: N803
                 last_epoch: int = -1) -> None:
        if T_max < 1:
            raise ValueError(f"CosineAnnealingLR: T_max must be >= 1, got {T_max}")
        self.T_max, self.eta_min = int(T_max), float(eta_min)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, epoch: int) -> list[float]:
        c = (1.0 + math.cos(math.pi * epoch / self.T_max)) / 2.0
        return [self.eta_min + (base - self.eta_min) * c for base in self.base_lrs]


class LinearWarmup(LRScheduler):
    """Rise linearly from start_factor * initial_lr (epoch 0) to initial_lr (epoch warmup_steps).

    Afterwards the lr stays at initial_lr, or follows `after` (another schedule
    on the same optimizer) shifted by warmup_steps:
    `LinearWarmup(opt, 5, after=CosineAnnealingLR(opt, T_max=95))`.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int, start_factor: float = 0.0,
                 after: LRScheduler | None = None, last_epoch: int = -1) -> None:
        if warmup_steps < 1:
            raise ValueError(f"LinearWarmup: warmup_steps must be >= 1, got {warmup_steps}")
        if not 0.0 <= start_factor <= 1.0:
            raise ValueError(f"LinearWarmup: start_factor must be in [0, 1], got {start_factor}")
        if after is not None and after.optimizer is not optimizer:
            raise ValueError("LinearWarmup: `after` must schedule the same optimizer")
        self.warmup_steps, self.start_factor, self.after = int(warmup_steps), start_factor, after
        super().__init__(optimizer, last_epoch)

    def lr_at(self, epoch: int) -> list[float]:
        if epoch >= self.warmup_steps:
            return self.after.lr_at(epoch - self.warmup_steps) if self.after else \
                list(self.base_lrs)
        f = self.start_factor + (1.0 - self.start_factor) * epoch / self.warmup_steps
        return [base * f for base in self.base_lrs]
