"""Optimizer and learning-rate schedule registries.

Schedules are per-iteration multipliers of optim.lr (a LambdaLR stepped once per
optimizer step), so an epoch-based schedule stays right whatever the batch size.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .config import OptimConfig, ScheduleConfig

_OPTIMIZERS: dict[str, Callable[[list, OptimConfig], torch.optim.Optimizer]] = {}
_SCHEDULES: dict[str, Callable[[ScheduleConfig, float, int, int], Callable[[int], float]]] = {}


def register_optimizer(name: str):
    def wrap(fn):
        _OPTIMIZERS[name] = fn
        return fn
    return wrap


def register_schedule(name: str):
    def wrap(fn):
        _SCHEDULES[name] = fn
        return fn
    return wrap


def list_optimizers() -> list[str]:
    return sorted(_OPTIMIZERS)


def list_schedules() -> list[str]:
    return sorted(_SCHEDULES)


@register_optimizer("sgd")
def _sgd(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


@register_optimizer("adam")
def _adam(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def create_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return _OPTIMIZERS[cfg.name](list(model.parameters()), cfg)


@register_schedule("constant")
def _constant(cfg: ScheduleConfig, lr: float, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    return lambda step: 1.0


@register_schedule("cosine")
def _cosine(cfg: ScheduleConfig, lr: float, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    floor = cfg.eta_min / lr
    span = max(1, total_steps - warmup_steps)

    def multiplier(step: int) -> float:
        progress = min(1.0, (step - warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return multiplier


def lr_multiplier(cfg: ScheduleConfig, lr: float, steps_per_epoch: int, epochs: int) -> Callable[[int], float]:
    """The lr multiplier at each iteration (0-based): linear warm-up, then the schedule."""
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    after = _SCHEDULES[cfg.name](cfg, lr, steps_per_epoch * epochs, warmup_steps)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return after(step)
    return multiplier


def create_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, lr: float, steps_per_epoch: int,
                     epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, lr, steps_per_epoch, epochs))
