"""The one training loop: a config, a train loader, the validation split and a device in; per-epoch metrics out.

Imports neither Ray nor DALI: the caller builds the train loader (ray_cifar.pipelines picks
torch or DALI) and hands it in. The same function runs as a single process
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

from . import engine
from .config.schema import Config
from .data import Split, TrainBatches, eval_batches
from .models import create_model_from_config
from .optim import create_optimizer, create_scheduler

EpochCallback = Callable[[dict, nn.Module], None]


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


def run_training(
    cfg: Config,
    loader: TrainBatches,
    val_split: Split,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    on_epoch: EpochCallback | None = None,
    local_world_size: int | None = None,
    log: Callable[[str], None] | None = print,
) -> nn.Module:
    """Train for cfg.train.epochs, or train.max_steps optimizer steps; calls on_epoch after each epoch (on every rank).

    `loader` is this rank's train loader (pipelines.train_loader_for); `val_split` is evaluated
    after every epoch, each rank its strided share. Returns the bare model."""
    set_cpu_threads(cfg, device, local_world_size or world_size)
    amp = engine.resolve_amp(device, cfg.train.amp)
    model = build_model(cfg, device)
    ddp_model = (DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
                 if world_size > 1 else model)
    total_steps, epochs = training_length(cfg, len(loader))
    optimizer = create_optimizer(model, cfg.optim)
    scheduler = create_scheduler(optimizer, cfg.schedule, cfg.optim.lr, len(loader), total_steps)
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    if log and rank == 0:
        log(f"[ray_cifar] {cfg.model.name}: {sum(p.numel() for p in model.parameters()):,} parameters, "
            f"{loader.num_images} train / {len(val_split)} val images, {len(loader)} steps/epoch of "
            f"{cfg.train.global_batch_size} images over {world_size} rank(s), {total_steps} steps in {epochs} epochs, "
            f"device {device}, amp {amp}")

    for epoch in range(epochs):
        lr = scheduler.get_last_lr()[0]  # the lr of this epoch's first step
        start = time.perf_counter()
        steps = min(len(loader), total_steps - epoch * len(loader))  # the last epoch may be cut short
        batches = itertools.islice(loader.epoch(epoch), steps)
        metrics = engine.train_epoch(ddp_model, batches, optimizer, scheduler, loss_fn, device, amp, scaler)
        seconds = time.perf_counter() - start  # train_epoch ends on a host read, so the GPU work is done
        metrics.update(engine.evaluate(ddp_model, eval_batches(val_split, cfg.train.eval_batch_size, rank, world_size),
                                       device, amp))
        metrics.update(epoch=epoch + 1, epochs=epochs, steps=epoch * len(loader) + steps, lr=lr,
                       epoch_seconds=seconds,
                       images_per_second=metrics["train_images"] / seconds, num_workers=world_size,
                       data_pipeline=loader.name, amp=amp, device=device.type)
        if log and rank == 0:
            log(f"[ray_cifar] epoch {epoch + 1}/{epochs}  train_loss {metrics['train_loss']:.4f}  "
                f"train_acc {metrics['train_acc']:.4f}  val_loss {metrics['val_loss']:.4f}  "
                f"val_acc {metrics['val_acc']:.4f}  lr {lr:.4g}  {metrics['images_per_second']:.0f} img/s")
        if on_epoch is not None:
            on_epoch(metrics, model)
    return model


def evaluate_split(cfg: Config, model: nn.Module, split: Split, device: torch.device, prefix: str) -> dict[str, float]:
    """One-process evaluation of a split (the test split, once, for a study's best trial)."""
    amp = engine.resolve_amp(device, cfg.train.amp)
    return engine.evaluate(model, eval_batches(split, cfg.train.eval_batch_size, 0, 1), device, amp, prefix=prefix)
