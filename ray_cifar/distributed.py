"""The Ray layer: a trial is a Ray Train TorchTrainer of `train.num_workers` DDP ranks.

Ray 2.60 runs Train V2, where `Tuner(TorchTrainer(...))` is gone: a study is a Tune
*function* trainable (`tune_trial`) that builds a TorchTrainer and calls fit();
TuneReportCallback forwards rank 0's per-epoch metrics (and the checkpoint path)
to Tune, where ASHA reads them. Nothing here is needed to train in one process.
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
from typing import Any

import ray
import ray.train
import torch
from ray.train import CheckpointConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from .config import Config
from .data import make_splits
from .data_source import load_cifar10
from .loop import run_training
from .pipelines import train_loader_for
from .validation import config_from_dict, trial_config

CHECKPOINT_FILE = "model.pt"


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """What each DDP rank runs. Ray Train has already set up the process group."""
    cfg = config_from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()  # the rank's own (visible) GPU, or cpu
    log = print if rank == 0 else (lambda msg: None)
    dataset = load_cifar10(cfg.data.path, cfg.data.cache_dir, log=log)  # decoded once, cached per node
    splits = make_splits(dataset, cfg.data, device)
    metric, sign = cfg.tune.metric, (1 if cfg.tune.mode == "max" else -1)
    best = {"score": -math.inf}

    def report(metrics: dict, model: torch.nn.Module) -> None:
        # Only rank 0 writes a checkpoint, and only when the metric improved, so the
        # one kept checkpoint (num_to_keep=1) is the trial's best.
        improved = sign * metrics[metric] > best["score"]
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0 and improved:
                best["score"] = sign * metrics[metric]
                torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "metrics": metrics},
                           os.path.join(tmp, CHECKPOINT_FILE))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)  # a barrier: every rank calls it each epoch

    loader = train_loader_for(cfg, splits.train, device, rank, world_size, log=log)
    run_training(cfg, loader, splits.val, device, rank, world_size, on_epoch=report,
                 local_world_size=ctx.get_local_world_size(), log=log)


def make_trainer(cfg: Config, storage_path: str, name: str, callbacks: list | None = None) -> TorchTrainer:
    use_gpu = bool(cfg.train.use_gpu)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict()},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker,
                                                           **({"GPU": 1} if use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage_path, callbacks=callbacks or [],
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )


def tune_trial(sampled: dict[str, Any], base_config: dict[str, Any], storage_path: str) -> None:
    """The Tune function trainable: this trial's config -> one TorchTrainer run."""
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = trial_config(base_config, sampled)
    trial_name = ray.tune.get_context().get_trial_name()
    make_trainer(cfg, storage_path, name=f"train-{trial_name}", callbacks=[TuneReportCallback()]).fit()


def trial_cpus(cfg: Config, num_workers: int | None = None) -> float:
    return cfg.tune.trial_driver_cpus + (num_workers or cfg.train.num_workers) * cfg.train.cpus_per_worker


def max_workers(cfg: Config) -> int:
    """The most DDP ranks any trial of the study asks for."""
    spec = cfg.tune.search_space.get("train.num_workers", {})
    return max([cfg.train.num_workers] + list(spec.get("grid", spec.get("choice", []))))


def init_ray(cfg: Config) -> None:
    """Connect to a cluster (tune.address / $RAY_ADDRESS) or start a local Ray sized for one trial at least."""
    # Ray Train 2.60 routes workers' print() through its logger *and* the stream
    # (every line twice); our workers print one line an epoch, so keep plain print.
    env_vars = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    address = cfg.tune.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": env_vars})
        return
    # On a small machine declare enough logical CPUs for one trial's driver plus all its
    # ranks, or the trial would wait forever; torch threads are set per rank anyway.
    need = math.ceil(trial_cpus(cfg, max_workers(cfg)))
    # Ray Train's placement-group cleaner finds the cluster through the state API; with
    # two local Ray instances on one machine its auto-detection fails ("multiple active
    # Ray instances") and a finished trial's resources are never released. Name the
    # dashboard (state API server) explicitly so concurrent local studies keep working.
    dashboard_port = _free_port()
    env_vars["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    ray.init(num_cpus=cfg.tune.num_cpus or max(os.cpu_count() or 1, need), dashboard_port=dashboard_port,
             runtime_env={"env_vars": env_vars})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_use_gpu(cfg: Config) -> bool:
    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.train.use_gpu is None:
        return gpus > 0
    if cfg.train.use_gpu and gpus == 0:
        raise RuntimeError("train.use_gpu=true but the Ray cluster has no GPUs")
    return cfg.train.use_gpu


def concurrent_trials(cfg: Config) -> int:
    """How many trials the cluster fits at once (each needs all its ranks at the same time)."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    resources = ray.cluster_resources()
    fits = [resources.get("CPU", 0) / trial_cpus(cfg, max_workers(cfg))]
    if cfg.train.use_gpu:
        fits.append(resources.get("GPU", 0) / max_workers(cfg))
    return max(1, math.floor(min(fits) + 1e-9))


@ray.remote
def _evaluate_checkpoint_task(checkpoint_path: str, split_name: str) -> dict[str, float]:
    from .loop import build_model, evaluate_split

    checkpoint = ray.train.Checkpoint(checkpoint_path)
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=False)
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
