"""The one training loop: a config, the data splits and a device in; per-epoch metrics out.

Imports neither Ray nor DALI. The same function runs as a single process
(`python -m ray_cifar.train`), as each DDP rank of a Ray Train worker group, and
as each rank of the torch.multiprocessing DDP test. The caller owns the process
group; `on_epoch(metrics, model)` is how results leave (Ray reports, Parquet rows).
"""

from __future__ import annotations

import itertools
import math
import os
import time
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint, engine
from .config import Config
from .data import Splits, create_train_loader, eval_batches
from .models import create_model_from_config
from .optim import create_optimizer, create_scheduler

EpochCallback = Callable[[dict, Callable[[], dict]], None]  # (metrics, build the training state)


def build_model(cfg: Config, device: torch.device) -> nn.Module:
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = create_model_from_config(cfg.model).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def set_cpu_threads(cfg: Config, device: torch.device, local_world_size: int) -> None:
    if device.type == "cpu":
        # Ranks sharing a node share its cores; oversubscription makes every rank slower.
        torch.set_num_threads(cfg.train.torch_threads or max(1, (os.cpu_count() or 1) // local_world_size))


def training_length(cfg: Config, steps_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps, epochs) of the run: train.max_steps when set (the last epoch cut short), else whole epochs."""
    if cfg.train.max_steps is None:
        return cfg.train.epochs * steps_per_epoch, cfg.train.epochs
    return cfg.train.max_steps, math.ceil(cfg.train.max_steps / steps_per_epoch)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The global torch RNG seed of one rank's epoch (dropout, torch ops without a generator).

    A function of (seed, epoch, rank) rather than a stream that runs on, so a run resumed
    at epoch k draws exactly what the uninterrupted run drew."""
    return (seed * 1_000_003 + epoch * 1009 + rank * 7919) % (2**63)


def run_training(
    cfg: Config,
    splits: Splits,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    on_epoch: EpochCallback | None = None,
    local_world_size: int | None = None,
    log: Callable[[str], None] | None = print,
    resume: dict | None = None,
) -> nn.Module:
    """Train for cfg.train.epochs, or train.max_steps optimizer steps; calls on_epoch after each epoch (on every rank).

    `resume` is a state from `checkpoint.training_state` (a finished epoch): training continues at the
    next epoch. `on_epoch(metrics, state)` gets the epoch's metrics and a function that builds the full
    training state (only called by whoever saves it). A non-finite train loss ends the run after that
    epoch's callback, with metrics["diverged"] = True. Returns the bare model."""
    setup_start = time.perf_counter()
    set_cpu_threads(cfg, device, local_world_size or world_size)
    amp = engine.resolve_amp(device, cfg.train.amp)
    model = build_model(cfg, device)
    ddp_model = (DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
                 if world_size > 1 else model)
    loader = create_train_loader(splits.train, cfg.data, cfg.train.global_batch_size, rank, world_size, cfg.train.seed,
                                 device, amp, cfg.model.num_classes, log=log if rank == 0 else None)
    total_steps, epochs = training_length(cfg, len(loader))
    optimizer = create_optimizer(model, cfg.optim)
    scheduler = create_scheduler(optimizer, cfg.schedule, cfg.optim.lr, len(loader), total_steps)
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    progress = {"epoch": 0, "best": {"value": None, "epoch": None}, "history": []}
    if resume is not None:
        checkpoint.restore(resume, model, optimizer, scheduler, scaler)
        progress.update(epoch=resume["epoch"], best=resume["best"], history=list(resume["history"]))
    if log and rank == 0:
        log(f"[ray_cifar] {cfg.model.name}: {sum(p.numel() for p in model.parameters()):,} parameters, "
            f"{len(splits.train)} train / {len(splits.val)} val images, {len(loader)} steps/epoch of "
            f"{cfg.train.global_batch_size} images over {world_size} rank(s), {total_steps} steps in {epochs} epochs, "
            f"device {device}, amp {amp}"
            + (f"; resumed after epoch {progress['epoch']}" if resume is not None else ""))

    def state() -> dict:
        return checkpoint.training_state(model, optimizer, scheduler, scaler, epoch=progress["epoch"],
                                         step=scheduler.last_epoch, best=progress["best"],
                                         history=progress["history"], config=cfg.to_dict())

    epoch_times: list[float] = []
    setup_seconds = time.perf_counter() - setup_start  # model, DDP wrap, pipeline build: part of the start-up
    for epoch in range(progress["epoch"], epochs):
        torch.manual_seed(epoch_seed(cfg.train.seed, epoch, rank))
        lr = scheduler.get_last_lr()[0]  # the lr of this epoch's first step
        start = time.perf_counter()
        steps = min(len(loader), total_steps - epoch * len(loader))  # the last epoch may be cut short
        batches = itertools.islice(loader.epoch(epoch), steps)
        metrics = engine.train_epoch(ddp_model, batches, optimizer, scheduler, loss_fn, device, amp, scaler)
        seconds = time.perf_counter() - start  # train_epoch ends on a host read, so the GPU work is done
        eval_start = time.perf_counter()
        metrics.update(engine.evaluate(ddp_model, eval_batches(splits.val, cfg.train.eval_batch_size, rank, world_size),
                                       device, amp))
        eval_seconds = time.perf_counter() - eval_start
        epoch_times.append(seconds + eval_seconds)
        diverged = not math.isfinite(metrics["train_loss"])  # read at the epoch's one host sync: no extra sync
        metrics.update(epoch=epoch + 1, epochs=epochs, steps=epoch * len(loader) + steps, lr=lr,
                       epoch_seconds=seconds, eval_seconds=eval_seconds,
                       images_per_second=metrics["train_images"] / seconds, num_workers=world_size,
                       data_pipeline=loader.name, amp=amp, device=device.type, diverged=diverged)
        if len(epoch_times) == 1:  # this run's first epoch
            metrics["setup_seconds"] = setup_seconds
        _update_progress(progress, metrics, cfg.tune.metric, cfg.tune.mode)
        if log and rank == 0:
            eta = (epochs - epoch - 1) * sum(epoch_times) / len(epoch_times)
            log(f"[ray_cifar] epoch {epoch + 1}/{epochs}  train_loss {metrics['train_loss']:.4f}  "
                f"train_acc {metrics['train_acc']:.4f}  val_loss {metrics['val_loss']:.4f}  "
                f"val_acc {metrics['val_acc']:.4f}  lr {lr:.4g}  {metrics['images_per_second']:.0f} img/s  "
                f"ETA {_duration(eta)}" + ("  DIVERGED (non-finite train loss): stopping" if diverged else ""))
        if on_epoch is not None:
            on_epoch(metrics, state)
        if diverged:
            break
    return model


def _update_progress(progress: dict, metrics: dict, metric: str, mode: str) -> None:
    progress["epoch"] = metrics["epoch"]
    progress["history"].append({k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))})
    value, best = metrics.get(metric), progress["best"]
    if value is not None and math.isfinite(value) and (
            best["value"] is None or (value > best["value"] if mode == "max" else value < best["value"])):
        progress["best"] = {"value": value, "epoch": metrics["epoch"]}


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def evaluate_split(cfg: Config, model: nn.Module, split, device: torch.device, prefix: str) -> dict[str, float]:
    """One-process evaluation of a split (the test split, once, for a study's best trial)."""
    amp = engine.resolve_amp(device, cfg.train.amp)
    return engine.evaluate(model, eval_batches(split, cfg.train.eval_batch_size, 0, 1), device, amp, prefix=prefix)
