"""Optimizer and learning-rate schedule registries.

    optimizer = create_optimizer(model, cfg.optim)          # weight-decay groups, optional Lookahead
    scheduler = create_scheduler(optimizer, cfg.schedule, cfg.optim.lr, steps_per_epoch, total_steps)

Schedules are per-iteration multipliers of optim.lr (a LambdaLR stepped once per
optimizer step), so an epoch-based schedule stays right whatever the batch size.
Each schedule is a function (cfg, lr, steps_per_epoch, total_steps, warmup_steps)
-> (step -> multiplier); the linear warm-up in front of it is shared.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable

import torch
from torch import nn

from .config.schema import OptimConfig, ScheduleConfig

Multiplier = Callable[[int], float]
_OPTIMIZERS: dict[str, Callable[[list, OptimConfig], torch.optim.Optimizer]] = {}
_SCHEDULES: dict[str, Callable[[ScheduleConfig, float, int, int, int], Multiplier]] = {}
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


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


# ---------------------------------------------------------------------------
# Optimizers. `params` is a list of param groups; a group's own weight_decay wins.


@register_optimizer("sgd")
def _sgd(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening,
                           nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)


@register_optimizer("adam")
def _adam(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


@register_optimizer("adamw")
def _adamw(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


@register_optimizer("adagrad")
def _adagrad(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(params, lr=cfg.lr, lr_decay=cfg.adagrad_lr_decay, eps=cfg.eps,
                               weight_decay=cfg.weight_decay)


@register_optimizer("asgd")
def _asgd(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    # torch keeps the running average in state["ax"]; the model itself is trained and evaluated
    # with the current (not averaged) weights. On CUDA, capturable: torch keeps ASGD's step, eta and mu
    # on the GPU either way, and otherwise reads each parameter's step back to the host every step
    # (`.item()`: ~62 host syncs a ResNet-18 step); capturable does that bookkeeping on the device.
    on_cuda = all(p.is_cuda for group in params for p in group["params"])
    return torch.optim.ASGD(params, lr=cfg.lr, lambd=cfg.asgd_lambd, alpha=cfg.asgd_alpha, t0=cfg.asgd_t0,
                            weight_decay=cfg.weight_decay, capturable=on_cuda)


class Lookahead(torch.optim.Optimizer):
    """Lookahead (Zhang et al. 2019) around any optimizer: every k steps, slow += alpha * (fast - slow), fast = slow.

    It shares the base optimizer's param_groups (the same list), so an LR scheduler or a
    GradScaler that changes or reads them acts on the base optimizer. The slow weights are
    the parameters' values at construction; state_dict holds both optimizers' state.
    """

    def __init__(self, base: torch.optim.Optimizer, k: int, alpha: float):
        if k < 1 or not 0 < alpha <= 1:
            raise ValueError(f"Lookahead needs k >= 1 and alpha in (0, 1], got k={k}, alpha={alpha}")
        # No super().__init__: that would copy the param groups, and the scheduler must move the base's lr.
        self.base, self.k, self.alpha = base, k, alpha
        self.param_groups = base.param_groups
        self.defaults = base.defaults
        self.state = defaultdict(dict)  # parameter -> {"slow": tensor}
        self.fast_steps = 0
        for p in self._params():
            self.state[p]["slow"] = p.detach().clone()

    def _params(self):
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.base.step(closure)
        self.fast_steps += 1
        if self.fast_steps % self.k == 0:
            for p in self._params():
                slow = self.state[p]["slow"]
                slow.add_(p.detach() - slow, alpha=self.alpha)
                p.copy_(slow)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"base": self.base.state_dict(), "fast_steps": self.fast_steps,
                "slow": [self.state[p]["slow"].clone() for p in self._params()], "k": self.k, "alpha": self.alpha}

    def load_state_dict(self, state_dict: dict) -> None:
        self.base.load_state_dict(state_dict["base"])
        self.param_groups = self.base.param_groups  # load_state_dict may rebuild the groups
        self.fast_steps = state_dict["fast_steps"]
        for p, slow in zip(self._params(), state_dict["slow"]):
            self.state[p]["slow"] = slow.to(device=p.device, dtype=p.dtype).clone()

    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha}, base={self.base!r})"


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """One group, or with wd_exclude_norm_bias a decayed group and a weight_decay=0 group
    (every parameter of a normalization layer, and every bias)."""
    if not cfg.wd_exclude_norm_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                (no_decay if isinstance(module, NORM_TYPES) or name == "bias" else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def create_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if cfg.name == "asgd" and len(groups) == 2:
        groups[1]["lambd"] = 0.0  # ASGD's lambd shrinks the weights every step: a decay, excluded alike
    optimizer = _OPTIMIZERS[cfg.name](groups, cfg)
    if cfg.lookahead_k is not None:
        optimizer = Lookahead(optimizer, cfg.lookahead_k, cfg.lookahead_alpha)
    return optimizer


# ---------------------------------------------------------------------------
# Schedules: multipliers of optim.lr at iteration `step` (0-based, counted from the first step of the run).


@register_schedule("constant")
def _constant(cfg: ScheduleConfig, lr: float, steps_per_epoch: int, total_steps: int, warmup_steps: int) -> Multiplier:
    return lambda step: 1.0


@register_schedule("cosine")
def _cosine(cfg: ScheduleConfig, lr: float, steps_per_epoch: int, total_steps: int, warmup_steps: int) -> Multiplier:
    """From 1 down to eta_min/lr over t_max_epochs (or the rest of the run) after warm-up; then eta_min."""
    floor = cfg.eta_min / lr
    span = (round(cfg.t_max_epochs * steps_per_epoch) if cfg.t_max_epochs is not None
            else total_steps - warmup_steps)
    span = max(1, span)

    def multiplier(step: int) -> float:
        progress = min(1.0, (step - warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return multiplier


@register_schedule("step")
def _step(cfg: ScheduleConfig, lr: float, steps_per_epoch: int, total_steps: int, warmup_steps: int) -> Multiplier:
    """gamma ** (number of whole periods since the first step); period in iterations or epochs."""
    every = cfg.step_every_iters or max(1, round(cfg.step_every_epochs * steps_per_epoch))
    return lambda step: cfg.gamma ** (step // every)


@register_schedule("multistep")
def _multistep(cfg: ScheduleConfig, lr: float, steps_per_epoch: int, total_steps: int,
               warmup_steps: int) -> Multiplier:
    """gamma ** (number of milestones reached); milestone e is iteration round(e * steps_per_epoch)."""
    milestones = [round(e * steps_per_epoch) for e in cfg.milestones_epochs]
    return lambda step: cfg.gamma ** sum(step >= m for m in milestones)


@register_schedule("onecycle")
def _onecycle(cfg: ScheduleConfig, lr: float, steps_per_epoch: int, total_steps: int, warmup_steps: int) -> Multiplier:
    """torch's OneCycleLR (two cosine phases, lr only, momentum not cycled) over the steps after warm-up."""
    steps = max(2, total_steps - warmup_steps)
    start = 1.0 / cfg.onecycle_div_factor
    end = start / cfg.onecycle_final_div_factor
    peak_step = cfg.onecycle_pct_start * steps - 1  # torch's phase boundary: float(pct * total) - 1
    last_step = steps - 1

    def cos_anneal(a: float, b: float, pct: float) -> float:
        return b + (a - b) / 2.0 * (math.cos(math.pi * pct) + 1)

    def multiplier(step: int) -> float:
        t = min(step - warmup_steps, last_step)
        if t <= peak_step:
            return cos_anneal(start, 1.0, t / peak_step) if peak_step > 0 else 1.0
        return cos_anneal(1.0, end, (t - peak_step) / (last_step - peak_step))
    return multiplier


def lr_multiplier(cfg: ScheduleConfig, lr: float, steps_per_epoch: int, total_steps: int) -> Multiplier:
    """The lr multiplier at each iteration (0-based): linear warm-up, then the schedule."""
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    after = _SCHEDULES[cfg.name](cfg, lr, steps_per_epoch, total_steps, warmup_steps)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return after(step)
    return multiplier


def create_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, lr: float, steps_per_epoch: int,
                     total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimizer step; total_steps is the whole run's optimizer steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, lr, steps_per_epoch, total_steps))
