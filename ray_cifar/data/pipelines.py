"""Which pipeline feeds a run's training (data.pipeline), and the factory that builds its train loader.

Above both pipelines: the torch path (ray_cifar.data.loader) and DALI (ray_cifar.data.dali,
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

from ..config.schema import Config, DataConfig
from ..engine import resolve_amp
from .augment import BatchMixer, active_augmentations
from .loader import MixedLoader, Split, TrainBatches, TrainLoader, input_dtype

# What `data.pipeline=auto` reads: benchmarks/data_pipeline.py's figures for this device type,
# committed inside the package (package data), so an installed copy finds them too.
# Without them: DALI where it is installed (the product's premise).
# ray_cifar/measurements/ (package data beside the package root, where the benchmarks write)
BENCHMARK_RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "measurements")


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def measured_pipeline(cfg: DataConfig, device_type: str, images: int | None = None) -> tuple[str, str] | None:
    """(dali | torch, why) from the benchmark of the matching augmentation set; None without a measurement.

    With `images` (what the rank will draw over the whole run) and measured build times, the pipeline
    that finishes them first wins, its build included: a short trial does not pay for DALI's start-up.
    Where DALI failed in the benchmark (its errors), the torch path, which was measured, and the error why."""
    path = os.path.join(BENCHMARK_RESULTS, f"data_pipeline_{device_type}.json")
    try:
        with open(path) as f:
            measured = json.load(f)
    except (OSError, ValueError):
        return None
    set_name = "crop+flip" if set(active_augmentations(cfg)) <= {"crop", "flip"} else "full"
    rows = measured.get("results", [])
    by_path = {r["path"]: r["images_per_second"] for r in rows if r.get("set") == set_name}
    # A fresh process's build: the slowest of a path's builds (its first one also imported the pipeline).
    builds: dict[str, float] = {}
    for r in rows:
        if r.get("build_seconds") is not None:
            builds[r["path"]] = max(builds.get(r["path"], 0.0), r["build_seconds"])
    dali_path = f"dali-{'gpu' if device_type == 'cuda' else 'cpu'}"
    dali, torch_batch = by_path.get(dali_path), by_path.get("torch-batch")
    source = f"on {measured.get('device', device_type)} (ray_cifar/measurements/{os.path.basename(path)})"
    failed = next((e["error"] for e in measured.get("errors", []) if e.get("set") == set_name
                   and e.get("path") == dali_path), None)
    if failed and torch_batch and not dali:
        return "torch", f"DALI failed on the {set_name} set when measured {source}: {failed}"
    if not dali or not torch_batch:
        return None
    if images and dali_path in builds and "torch-batch" in builds:
        dali_s, torch_s = builds[dali_path] + images / dali, builds["torch-batch"] + images / torch_batch
        return ("dali" if dali_s <= torch_s else "torch",
                f"{images} images of the {set_name} set: {dali_s:.1f} s with DALI ({dali:.0f} img/s + "
                f"{builds[dali_path]:.1f} s build) vs {torch_s:.1f} s with the torch path ({torch_batch:.0f} img/s "
                f"+ {builds['torch-batch']:.1f} s) {source}")
    choice = "dali" if dali >= torch_batch else "torch"
    return choice, f"the {set_name} set measured {dali:.0f} img/s with DALI vs {torch_batch:.0f} with the torch path {source}"


def resolve_pipeline(cfg: DataConfig, device: torch.device, log: Callable[[str], None] | None = None,
                     images: int | None = None) -> str:
    """cfg.pipeline (auto | dali | torch) -> dali | torch; logs an automatic choice and why.
    `images`: how many the rank will draw over the run, when known (see measured_pipeline)."""
    if cfg.pipeline != "auto":
        if cfg.pipeline == "dali" and not dali_available():
            raise RuntimeError("data.pipeline=dali but nvidia.dali is not importable "
                               "(pip install nvidia-dali-cuda130, or use data.pipeline=torch)")
        return cfg.pipeline
    if not dali_available():
        choice, why = "torch", "nvidia.dali is not installed"
    else:
        choice, why = measured_pipeline(cfg, device.type, images) or (
            "dali", f"no benchmark for {device.type} yet (run benchmarks/data_pipeline.py --device {device.type}); "
                    "DALI by default")
    if log:
        log(f"[ray_cifar] data.pipeline=auto -> {choice} on {device.type}: {why}")
    return choice


def create_train_loader(split: Split, cfg: DataConfig, global_batch_size: int, rank: int, world_size: int,
                        seed: int, device: torch.device, amp: str = "fp32", num_classes: int = 10,
                        log: Callable[[str], None] | None = None, images: int | None = None) -> TrainBatches:
    """The rank's train loader for cfg.pipeline (torch, or DALI imported only here), plus mixup/cutmix if on.

    global_batch_size is images per step over all ranks; each rank gets global_batch_size // world_size;
    `images` is what the rank will draw over the run (for data.pipeline=auto), when known.
    """
    pipeline = resolve_pipeline(cfg, device, log, images)
    if pipeline == "dali":
        from .dali import DaliTrainLoader

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
                               log=log if rank == 0 else None, images=run_images(cfg, len(split), world_size))


def run_images(cfg: Config, train_images: int, world_size: int) -> int:
    """Images one rank draws over the whole run as planned (a scheduler may stop it sooner)."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps * cfg.train.global_batch_size // world_size
    return cfg.train.epochs * train_images // world_size
