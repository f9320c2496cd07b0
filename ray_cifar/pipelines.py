"""Which pipeline feeds a run's training (data.pipeline), and the factory that builds its train loader.

Above both pipelines: the torch path (ray_cifar.data) and DALI (ray_cifar.dali_pipeline,
imported only when chosen). `data.pipeline=auto` follows the committed benchmark of this
device type (ray_cifar/measurements/, written by benchmarks/data_pipeline.py). The loop is
handed the loader this module builds; it never picks a pipeline itself.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Callable

import torch

from .augment import BatchMixer, active_augmentations
from .config.schema import Config, DataConfig
from .data import MixedLoader, Split, TrainBatches, TrainLoader, input_dtype
from .engine import resolve_amp

# What `data.pipeline=auto` reads: benchmarks/data_pipeline.py's figures for this device type,
# committed inside the package (package data), so an installed copy finds them too.
# Without them: DALI where it is installed (the product's premise).
BENCHMARK_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "measurements")


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def measured_pipeline(cfg: DataConfig, device_type: str) -> tuple[str, str] | None:
    """(dali | torch, why) from the benchmark of the matching augmentation set; None without a measurement."""
    path = os.path.join(BENCHMARK_RESULTS, f"data_pipeline_{device_type}.json")
    try:
        with open(path) as f:
            measured = json.load(f)
    except (OSError, ValueError):
        return None
    set_name = "crop+flip" if set(active_augmentations(cfg)) <= {"crop", "flip"} else "full"
    by_path = {r["path"]: r["images_per_second"] for r in measured.get("results", []) if r.get("set") == set_name}
    dali = by_path.get(f"dali-{'gpu' if device_type == 'cuda' else 'cpu'}")
    torch_batch = by_path.get("torch-batch")
    if not dali or not torch_batch:
        return None
    choice = "dali" if dali >= torch_batch else "torch"
    return choice, (f"the {set_name} set measured {dali:.0f} img/s with DALI vs {torch_batch:.0f} with the torch "
                    f"path on {measured.get('device', device_type)} (ray_cifar/measurements/{os.path.basename(path)})")


def resolve_pipeline(cfg: DataConfig, device: torch.device, log: Callable[[str], None] | None = None) -> str:
    """cfg.pipeline (auto | dali | torch) -> dali | torch; logs an automatic choice and why."""
    if cfg.pipeline != "auto":
        if cfg.pipeline == "dali" and not dali_available():
            raise RuntimeError("data.pipeline=dali but nvidia.dali is not importable "
                               "(pip install nvidia-dali-cuda130, or use data.pipeline=torch)")
        return cfg.pipeline
    if not dali_available():
        choice, why = "torch", "nvidia.dali is not installed"
    else:
        choice, why = measured_pipeline(cfg, device.type) or (
            "dali", f"no benchmark for {device.type} yet (run benchmarks/data_pipeline.py --device {device.type}); "
                    "DALI by default")
    if log:
        log(f"[ray_cifar] data.pipeline=auto -> {choice} on {device.type}: {why}")
    return choice


def create_train_loader(split: Split, cfg: DataConfig, global_batch_size: int, rank: int, world_size: int,
                        seed: int, device: torch.device, amp: str = "fp32", num_classes: int = 10,
                        log: Callable[[str], None] | None = None) -> TrainBatches:
    """The rank's train loader for cfg.pipeline (torch, or DALI imported only here), plus mixup/cutmix if on.

    global_batch_size is images per step over all ranks; each rank gets global_batch_size // world_size.
    """
    pipeline = resolve_pipeline(cfg, device, log)
    if pipeline == "dali":
        from .dali_pipeline import DaliTrainLoader

        loader = DaliTrainLoader(split, cfg, global_batch_size, rank, world_size, seed, device, input_dtype(amp))
    else:
        loader = TrainLoader(split, cfg, global_batch_size, rank, world_size, seed, input_dtype(amp))
    if log:
        log(f"[ray_cifar] train pipeline {loader.name}: {', '.join(active_augmentations(cfg)) or 'no augmentation'}"
            + (f", mixup p={cfg.mixup_p}, cutmix p={cfg.cutmix_p}" if BatchMixer.is_active(cfg) else ""))
    if BatchMixer.is_active(cfg):
        # Per-rank stream: each rank mixes its own slice.
        loader = MixedLoader(loader, BatchMixer(cfg, num_classes, seed=[seed, rank, 0x6D6978]))
    return loader


def train_loader_for(cfg: Config, split: Split, device: torch.device, rank: int = 0, world_size: int = 1,
                     log: Callable[[str], None] | None = None) -> TrainBatches:
    """The train loader of a run's rank: cfg.train's global batch and seed, inputs in the dtype of its AMP mode."""
    return create_train_loader(split, cfg.data, cfg.train.global_batch_size, rank, world_size, cfg.train.seed, device,
                               resolve_amp(device, cfg.train.amp), cfg.model.num_classes,
                               log=log if rank == 0 else None)
