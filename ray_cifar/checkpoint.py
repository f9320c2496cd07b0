"""Full training state: everything needed to continue a run at the next epoch. No Ray, no DALI.

A checkpoint is nanoGPT's `{model, optimizer, iter_num, best_val_loss, config}` and a
little more: the scheduler, the fp16 grad scaler, the epoch just finished, the optimizer
step, the best value of `tune.metric` so far (and its epoch), and the per-epoch metrics
history (so rows reported just before a crash can be recovered). Lookahead's slow weights
travel inside its optimizer state dict.

Files are loaded with `torch.load(..., weights_only=True)`: a checkpoint holds tensors,
numbers, strings, lists and dicts only, never pickled code.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

STATE_FILE = "state.pt"


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler, *, epoch: int, step: int,
                   best: dict[str, Any], history: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """The state after `epoch` epochs (1-based count of finished epochs) and `step` optimizer steps."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "step": step,
        "best": dict(best),
        "history": [dict(h) for h in history],
        "config": config,
    }


def save_state(state: dict[str, Any], directory: str) -> str:
    """Write `state` into `directory` (atomically: a reader never sees half a file)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, STATE_FILE)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_state(directory: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(os.path.join(directory, STATE_FILE), map_location=map_location, weights_only=True)


def restore(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler) -> None:
    """Load a training state into freshly built objects (same config, same device)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
