"""The one training loop: a config, a train loader, the validation split and a device in; per-epoch metrics out.

Imports neither Ray nor DALI: the caller builds the train loader (ray_cifar.data.pipelines picks
torch or DALI) and hands it in. The same function runs as a single process
(`python -m ray_cifar.train`), as each DDP rank of a Ray Train worker group, and
as each rank of the torch.multiprocessing DDP test. The caller owns the process
group; `on_epoch(metrics, state)` is how results and checkpoints leave (Ray reports, Parquet rows).
"""

from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint, engine
from .config.schema import Config, improves
from .data.loader import Split, TrainBatches, eval_batches
from .models import count_parameters, create_model_from_config, describe
from .optim import create_optimizer, create_scheduler

EpochCallback = Callable[[dict, Callable[[], dict]], None]  # (metrics, build the full training state)


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


@dataclass
class _Run:
    """What one run trains with, built once: the model (bare and DDP-wrapped), optimizer, schedule, AMP."""

    model: nn.Module
    ddp_model: nn.Module  # what trains: DDP-wrapped where world_size > 1, then compiled where train.compile
    # What evaluates: the same, never compiled. A compiled model evaluated in eval mode under no_grad compiles a
    # second graph, and a third for a last, smaller batch: tens of seconds on a GPU, once per trial, more than the
    # eager evaluations of a short trial cost (ASHA stops most trials after an epoch or two).
    eval_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    loss_fn: nn.Module
    amp: str
    total_steps: int
    epochs: int


def _build_run(cfg: Config, loader: TrainBatches, device: torch.device, world_size: int) -> _Run:
    amp = engine.resolve_amp(device, cfg.train.amp)
    model = build_model(cfg, device)
    ddp_model = (DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
                 if world_size > 1 else model)
    eval_model = ddp_model
    # cudnn.benchmark / TF32 on CUDA; torch.compile wraps the DDP module, checkpoints keep the bare one.
    ddp_model = engine.prepare_model(ddp_model, device, compile=cfg.train.compile)
    total_steps, epochs = training_length(cfg, len(loader))
    optimizer = create_optimizer(model, cfg.optim)
    scheduler = create_scheduler(optimizer, cfg.schedule, cfg.optim.lr, len(loader), total_steps)
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    return _Run(model, ddp_model, eval_model, optimizer, scheduler, scaler,
                nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing), amp, total_steps, epochs)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The global torch RNG seed of one rank's epoch (dropout, torch ops without a generator).

    A function of (seed, epoch, rank) rather than a stream that runs on, so a run resumed
    at epoch k draws exactly what the uninterrupted run drew."""
    return (seed * 1_000_003 + epoch * 1009 + rank * 7919) % (2**63)


def _train_and_evaluate(cfg: Config, run: _Run, loader: TrainBatches, val_split: Split, device: torch.device,
                        epoch: int, rank: int, world_size: int) -> dict:
    """One epoch (the last may be cut short by train.max_steps), then validation; the epoch's metrics."""
    torch.manual_seed(epoch_seed(cfg.train.seed, epoch, rank))
    lr = run.scheduler.get_last_lr()[0]  # the lr of this epoch's first step
    start = time.perf_counter()
    steps = min(len(loader), run.total_steps - epoch * len(loader))
    batches = itertools.islice(loader.epoch(epoch), steps)
    metrics = engine.train_epoch(run.ddp_model, batches, run.optimizer, run.scheduler, run.loss_fn, device, run.amp,
                                 run.scaler)
    seconds = time.perf_counter() - start  # train_epoch ends on a host read, so the GPU work is done
    eval_start = time.perf_counter()
    eval_batch_size = engine.resolve_eval_batch_size(device, cfg.train.eval_batch_size)
    metrics.update(engine.evaluate(run.eval_model, eval_batches(val_split, eval_batch_size, rank, world_size),
                                   device, run.amp))
    metrics.update(epoch=epoch + 1, epochs=run.epochs, steps=epoch * len(loader) + steps, lr=lr,
                   epoch_seconds=seconds, eval_seconds=time.perf_counter() - eval_start,
                   images_per_second=metrics["train_images"] / seconds, num_workers=world_size,
                   data_pipeline=loader.name, amp=run.amp, device=device.type,
                   # Read at the epoch's one host sync: no extra sync per step.
                   diverged=not math.isfinite(metrics["train_loss"]))
    return metrics


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
    resume: dict | None = None,
) -> nn.Module:
    """Train for cfg.train.epochs, or train.max_steps optimizer steps; calls on_epoch after each epoch (on every rank).

    `loader` is this rank's train loader (pipelines.train_loader_for); `val_split` is evaluated after
    every epoch, each rank its strided share. `resume` is a state from `checkpoint.training_state` (a
    finished epoch): training continues at the next epoch. `on_epoch(metrics, state)` gets the epoch's
    metrics and a function that builds the full training state (called only by whoever saves it).
    A non-finite train loss ends the run after that epoch's callback, with metrics["diverged"] True.
    Returns the bare model."""
    setup_start = time.perf_counter()
    set_cpu_threads(cfg, device, local_world_size or world_size)
    run = _build_run(cfg, loader, device, world_size)
    progress = {"epoch": 0, "best": {"value": None, "epoch": None}, "history": []}
    if resume is not None:
        checkpoint.restore(resume, run.model, run.optimizer, run.scheduler, run.scaler)
        progress.update(epoch=resume["epoch"], best=resume["best"], history=list(resume["history"]))
    if log and rank == 0:
        log(f"[ray_cifar] {describe(cfg.model)}: {count_parameters(run.model):,} parameters, "
            f"{loader.num_images} train / {len(val_split)} val images, {len(loader)} steps/epoch of "
            f"{cfg.train.global_batch_size} images over {world_size} rank(s), {run.total_steps} steps in "
            f"{run.epochs} epochs, device {device}, amp {run.amp}"
            + (f"; resumed after epoch {progress['epoch']}" if resume is not None else ""))

    def state() -> dict:
        # What the caller added to the epoch's metrics before it saves (the rank's nodes, its start-up timing, PBT's
        # lineage) goes into the epoch's history entry too: a row recovered from the checkpoint is the row reported.
        if reported and progress["history"] and progress["history"][-1]["epoch"] == reported[-1]["epoch"]:
            progress["history"][-1].update(_scalars(reported[-1]))
        return checkpoint.training_state(run.model, run.optimizer, run.scheduler, run.scaler,
                                         epoch=progress["epoch"], step=run.scheduler.last_epoch,
                                         best=progress["best"], history=progress["history"], config=cfg.to_dict())

    seconds: list[float] = []
    reported: list[dict] = []  # the metrics of this run's epoch that on_epoch has now (its state() may be called)
    setup_seconds = time.perf_counter() - setup_start  # model, DDP wrap, resume: part of the start-up
    resumed_from = progress["epoch"]
    for epoch in range(progress["epoch"], run.epochs):
        metrics = _train_and_evaluate(cfg, run, loader, val_split, device, epoch, rank, world_size)
        # In the history too: an epoch reported again after a restart says where its own run began.
        metrics["resumed_from_epoch"] = resumed_from
        if not seconds:  # this run's first epoch
            metrics["setup_seconds"] = setup_seconds
        seconds.append(metrics["epoch_seconds"] + metrics["eval_seconds"])
        _update_progress(progress, metrics, cfg.tune.metric, cfg.tune.mode)
        if log and rank == 0:
            log(_epoch_line(metrics, eta=(run.epochs - epoch - 1) * sum(seconds) / len(seconds)))
        if on_epoch is not None:
            reported[:] = [metrics]
            on_epoch(metrics, state)
        if metrics["diverged"]:
            break
    if not seconds and progress["history"] and on_epoch is not None:
        # Resumed at its end (a driver died after the last checkpoint; a PBT member copied a donor that had just
        # finished): nothing to train, but whoever waits for this run's result gets its last epoch again (Tune
        # requires the metric; the recorder drops a row it already holds).
        on_epoch(dict(progress["history"][-1]), state)  # its history entry keeps the columns of its first report
    return run.model


def _update_progress(progress: dict, metrics: dict, metric: str, mode: str) -> None:
    progress["epoch"] = metrics["epoch"]
    progress["history"].append(_scalars(metrics))
    value, best = metrics.get(metric), progress["best"]
    if not metrics.get("diverged") and improves(value, best["value"], mode):  # (results.scored: never a best)
        progress["best"] = {"value": value, "epoch": metrics["epoch"]}


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}


def _epoch_line(m: dict, eta: float) -> str:
    eta_s = int(round(eta))
    eta_text = f"{eta_s // 3600}h{eta_s // 60 % 60:02d}m" if eta_s >= 3600 else f"{eta_s // 60}m{eta_s % 60:02d}s"
    return (f"[ray_cifar] epoch {m['epoch']}/{m['epochs']}  train_loss {m['train_loss']:.4f}  "
            f"train_acc {m['train_acc']:.4f}  val_loss {m['val_loss']:.4f}  val_acc {m['val_acc']:.4f}  "
            f"lr {m['lr']:.4g}  {m['images_per_second']:.0f} img/s  ETA {eta_text}"
            + ("  DIVERGED (non-finite train loss): stopping" if m["diverged"] else ""))


def evaluate_split(cfg: Config, model: nn.Module, split: Split, device: torch.device, prefix: str) -> dict[str, float]:
    """One-process evaluation of a split (the test split, once, for a study's best trial)."""
    amp = engine.resolve_amp(device, cfg.train.amp)
    batch_size = engine.resolve_eval_batch_size(device, cfg.train.eval_batch_size)
    return engine.evaluate(model, eval_batches(split, batch_size, 0, 1), device, amp, prefix=prefix)
