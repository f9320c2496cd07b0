"""One trial: a Ray Train TorchTrainer of `train.num_workers` DDP ranks, checkpointed every epoch.

Ray 2.60 runs Train V2, where `Tuner(TorchTrainer(...))` is gone: a study is a Tune
*function* trainable (`tune_trial`) that builds a TorchTrainer and calls fit();
TuneReportCallback forwards rank 0's per-epoch metrics (and the checkpoint path) to Tune.

Fault tolerance, from the inside out:
- every epoch rank 0 reports a full training state (ray_cifar.checkpoint); Ray keeps the
  latest and the best by tune.metric (CheckpointConfig with a score attribute);
- a dead rank: Train restarts the worker group (train.max_failures) and every rank starts
  from `ray.train.get_checkpoint()`, the latest state, at the next epoch;
- a failed trial: Tune runs `tune_trial` again (tune.max_failures); its TorchTrainer, named
  after the trial id under the study's storage, finds its own run and its latest checkpoint;
- a dead driver: `Tuner.restore` (ray_cifar.study) runs unfinished trials' `tune_trial` again,
  which resumes the same way.
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from . import checkpoint, engine
from .config import Config
from .data import make_splits
from .data_source import load_cifar10
from .loop import build_model, evaluate_split, run_training
from .pipelines import train_loader_for
from .validation import config_from_dict, trial_config


def _latest_state() -> dict | None:
    found = ray.train.get_checkpoint()
    if found is None:
        return None
    with found.as_directory() as directory:
        return checkpoint.load_state(directory)


def _rank_nodes(world_size: int) -> str:
    """The Ray node of every rank, in rank order (short ids), so a row shows where its ranks ran."""
    node = ray.get_runtime_context().get_node_id()[:12]
    if world_size == 1:
        return node
    nodes: list[Any] = [None] * world_size
    dist.all_gather_object(nodes, node)  # once per run, before the first step
    return ",".join(nodes)


def _quiet_report_logs() -> None:
    """Ray Train 2.60 logs every report (its whole metrics dict) at INFO from every rank; rank 0 already
    prints one line an epoch, so keep the rest for warnings."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray version: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


class PhaseClock:
    """Wall-clock laps of a trial's start-up on one rank, reported once as `timing_<phase>_seconds` columns.

    Laps count from the Tune trial function's start (`started`, time.time() in the trial's driver
    process), so the first lap also holds the Train controller and worker-group start."""

    def __init__(self, started: float | None):
        self.started = started
        self.last = started
        self.laps: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.time()
        if self.last is not None:
            self.laps[phase] = now - self.last
        self.last = now

    def columns(self, startup_seconds: float, loop_setup: float | None) -> dict[str, float]:
        """The laps, the loop's own setup (model, DDP, pipeline build), and the rest of the start-up:
        the first step (warm-up, DDP's first all-reduce)."""
        laps = dict(self.laps)
        if loop_setup is not None:
            laps["loop_setup"] = loop_setup
        laps["first_step"] = startup_seconds - sum(laps.values())
        return {"timing_trial_started_at": self.started,
                **{f"timing_{phase}_seconds": seconds for phase, seconds in laps.items()}}


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """What each DDP rank runs. Ray Train has already set up the process group."""
    _quiet_report_logs()
    started = loop_config.get("started")
    clock = PhaseClock(started)
    clock.lap("worker_group")  # Tune trial start -> this rank runs: Train controller, workers, process group
    cfg = config_from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()  # the rank's own (visible) GPU, or cpu
    log = print if rank == 0 else (lambda msg: None)
    capped = engine.cap_gpu_memory(device, cfg.train.gpus_per_worker)  # before the data goes to the GPU
    if capped:
        log(f"[ray_cifar] packed: {capped}")
    resume = _latest_state()
    clock.lap("resume_read")
    dataset = load_cifar10(cfg.data.path, cfg.data.cache_dir, log=log)  # decoded once, cached per node
    clock.lap("data_load")
    splits = make_splits(dataset, cfg.data, device)
    clock.lap("splits")
    extra = {"nodes": _rank_nodes(world_size), "resumed_from_epoch": resume["epoch"] if resume else 0}
    clock.lap("rank_nodes")
    first = {"report": True}

    def report(metrics: dict, state) -> None:
        metrics.update(extra)
        if first.pop("report", False):
            # Startup: from the trial's start (Tune trial function) to the end of the first epoch
            # minus that epoch's own work, i.e. to the first trained step.
            if started is not None:
                metrics["startup_seconds"] = time.time() - started - metrics["epoch_seconds"] - metrics["eval_seconds"]
                metrics.update(clock.columns(metrics["startup_seconds"], metrics.get("setup_seconds")))
            if resume is not None:
                # Epochs the checkpoint has seen: lets the driver recover rows it never received.
                metrics["history"] = resume["history"]
        metrics.pop("setup_seconds", None)
        with tempfile.TemporaryDirectory() as tmp:
            saved = None
            if rank == 0:
                save_start = time.perf_counter()
                checkpoint.save_state(state(), tmp)
                metrics["timing_checkpoint_save_seconds"] = time.perf_counter() - save_start
                saved = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=saved)  # a barrier: every rank calls it each epoch

    loader = train_loader_for(cfg, splits.train, device, rank, world_size, log=log)
    clock.lap("pipeline_build")
    run_training(cfg, loader, splits.val, device, rank, world_size, on_epoch=report,
                 local_world_size=ctx.get_local_world_size(), log=log, resume=resume)


def make_trainer(cfg: Config, storage_path: str, name: str, callbacks: list | None = None,
                 started: float | None = None) -> TorchTrainer:
    use_gpu = bool(cfg.train.use_gpu)
    # A share of a GPU (train.gpus_per_worker < 1) lets Ray place several 1-rank trials on one GPU.
    gpus = {"GPU": cfg.train.gpus_per_worker} if use_gpu else {}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "started": started},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker, **gpus},
                                     placement_strategy=cfg.train.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=name, storage_path=storage_path, callbacks=callbacks or [],
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            # Keeps the best by the study's metric and, beside it, always the latest (to resume from).
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=cfg.tune.metric,
                                               checkpoint_score_order=cfg.tune.mode)),
    )


def trainer_name(trial_id: str) -> str:
    """A trial's TorchTrainer run name: stable across Tune retries and `--resume` (trial ids are kept)."""
    return f"trial-{trial_id}"


def tune_trial(sampled: dict[str, Any], base_config: dict[str, Any], storage_path: str) -> None:
    """The Tune function trainable: this trial's config -> one TorchTrainer run (resumed if it ran before)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    started = time.time()
    cfg = trial_config(base_config, sampled)
    trial_id = tune.get_context().get_trial_id()
    make_trainer(cfg, storage_path, name=trainer_name(trial_id), callbacks=[TuneReportCallback()],
                 started=started).fit()


@ray.remote
def _evaluate_checkpoint_task(checkpoint_path: str, split_name: str) -> dict[str, float]:
    found = ray.train.Checkpoint(checkpoint_path)
    with found.as_directory() as directory:
        state = checkpoint.load_state(directory)
    cfg = config_from_dict(state["config"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg, device)
    model.load_state_dict(state["model"])
    splits = make_splits(load_cifar10(cfg.data.path, cfg.data.cache_dir, log=lambda m: None), cfg.data, device)
    return evaluate_split(cfg, model, getattr(splits, split_name), device, prefix=split_name)


def evaluate_checkpoint(checkpoint_path: str, split_name: str, use_gpu: bool) -> dict[str, float]:
    """Evaluate a trial checkpoint on a split, as a Ray task where a GPU is (when the study used GPUs)."""
    task = _evaluate_checkpoint_task.options(num_gpus=1 if use_gpu else 0, num_cpus=1)
    return ray.get(task.remote(checkpoint_path, split_name))
