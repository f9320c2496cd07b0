"""From decoded CIFAR-10 arrays to the batches a rank trains on.

The whole uint8 dataset is put on the rank's device once (150 MB for all of
CIFAR-10); an epoch is a seeded permutation, cut into global batches, each cut
into one equal slice per DDP rank. The last partial global batch is dropped, so
every rank takes the same number of steps and every image is seen at most once
per epoch (exactly once when the batch divides the train split).

`create_train_loader` picks the pipeline that augments those slices (data.pipeline):
the torch batch-tensor path here (ray_cifar.augment), or DALI (ray_cifar.dali_pipeline,
imported only then) on the same sampler; mixup/cutmix follow either.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import numpy as np
import torch

from .augment import MEAN, STD, BatchMixer, active_augmentations, create_augment, device_constant
from .config import DataConfig
from .data_source import Cifar10, stratified_split, subset_indices

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Split:
    images: torch.Tensor  # uint8, N x 32 x 32 x 3, on the rank's device
    labels: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split


def val_count(cfg: DataConfig, num_train_images: int) -> int:
    """Validation images: data.val_size, or data.val_fraction of the train images (rounded)."""
    return cfg.val_size if cfg.val_fraction is None else round(cfg.val_fraction * num_train_images)


def make_splits(dataset: Cifar10, cfg: DataConfig, device: torch.device | str) -> Splits:
    val_size = val_count(cfg, len(dataset.train_labels))
    train_idx, val_idx = stratified_split(dataset.train_labels, val_size, cfg.split_seed)
    train_idx = subset_indices(dataset.train_labels, train_idx, cfg.train_subset, cfg.split_seed)

    def to_split(images: np.ndarray, labels: np.ndarray) -> Split:
        return Split(torch.from_numpy(np.ascontiguousarray(images)).to(device),
                     torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device))

    return Splits(train=to_split(dataset.train_images[train_idx], dataset.train_labels[train_idx]),
                  val=to_split(dataset.train_images[val_idx], dataset.train_labels[val_idx]),
                  test=to_split(dataset.test_images, dataset.test_labels))


def input_dtype(amp: str) -> torch.dtype:
    """The dtype batches are handed to the model in: fp16 under fp16 AMP, else fp32.

    DALI has no bfloat16 output, and autocast casts fp32 inputs to bf16 at the first conv
    anyway, so both pipelines use fp32 for bf16 (and fp32) runs.
    """
    return torch.float16 if amp == "fp16" else torch.float32


def to_model_input(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 NHWC -> normalized NCHW in channels_last memory (the NHWC buffer viewed as NCHW)."""
    # Cached per device: torch.tensor(..., device="cuda") per step would be a host sync per step.
    mean = device_constant(tuple((np.float32(MEAN) * np.float32(255)).tolist()), images.device).view(1, 3, 1, 1)
    std = device_constant(tuple((np.float32(STD) * np.float32(255)).tolist()), images.device).view(1, 3, 1, 1)
    return ((images.permute(0, 3, 1, 2).float() - mean) / std).to(dtype)


class TrainBatches(Protocol):
    """What the training loop needs of a train loader, whichever pipeline is behind it."""

    name: str  # the pipeline that feeds it: torch | dali-cpu | dali-gpu (recorded in every epoch's metrics)

    def __len__(self) -> int: ...  # steps per epoch

    def epoch(self, epoch: int) -> Batches: ...  # (images N x 3 x 32 x 32 channels_last, targets) per step


class TrainLoader:
    """One rank's share of every epoch: `global_batch_size // world_size` images per step.

    This is also the sampler of the DALI path (`epoch_indices`), so both paths cover the same images.
    """

    name = "torch"

    def __init__(self, split: Split, cfg: DataConfig, global_batch_size: int, rank: int, world_size: int, seed: int,
                 dtype: torch.dtype = torch.float32):
        if global_batch_size > len(split):
            raise ValueError(f"train.global_batch_size={global_batch_size} is larger than the "
                             f"{len(split)} train images: not one step per epoch")
        self.split, self.cfg, self.dtype = split, cfg, dtype
        self.global_batch_size, self.rank, self.world_size, self.seed = global_batch_size, rank, world_size, seed
        self.local_batch_size = global_batch_size // world_size
        self.augment = create_augment(cfg)

    def __len__(self) -> int:
        return len(self.split) // self.global_batch_size

    def _generator(self, epoch: int, stream: int) -> torch.Generator:
        g = torch.Generator(device=self.split.images.device)
        g.manual_seed(self.seed * 1_000_003 + epoch * 1009 + stream)
        return g

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's image indices for `epoch`, step after step (len(self) * local batch)."""
        n, device = len(self.split), self.split.images.device
        # Same generator on every rank, so all ranks agree on the permutation.
        order = (torch.randperm(n, device=device, generator=self._generator(epoch, 0)) if self.cfg.shuffle
                 else torch.arange(n, device=device))
        steps = order[: len(self) * self.global_batch_size].view(len(self), self.world_size, self.local_batch_size)
        return steps[:, self.rank].reshape(-1)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self.epoch_indices(epoch)
        # Augmentation randomness differs per rank (each rank sees other images).
        g = self._generator(epoch, 1 + self.rank)
        for step in range(len(self)):
            idx = indices[step * self.local_batch_size: (step + 1) * self.local_batch_size]
            yield to_model_input(self.augment(self.split.images[idx], g), self.dtype), self.split.labels[idx]


class MixedLoader:
    """A train loader whose batches go through mixup/cutmix: targets become N x classes probabilities."""

    def __init__(self, loader: TrainBatches, mixer: BatchMixer):
        self.loader, self.mixer, self.name = loader, mixer, loader.name

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int) -> Batches:
        for images, labels in self.loader.epoch(epoch):
            yield self.mixer(images, labels)


# What `data.pipeline=auto` reads: benchmarks/data_pipeline.py's figures for this device type,
# committed beside the code. Without them: DALI where it is installed (the product's premise).
BENCHMARK_RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")


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
                    f"path on {measured.get('device', device_type)} (benchmarks/results/{os.path.basename(path)})")


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


def eval_batches(split: Split, batch_size: int, rank: int, world_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's strided share of an evaluation split (every image on exactly one rank)."""
    idx = torch.arange(rank, len(split), world_size, device=split.images.device)
    for start in range(0, idx.shape[0], batch_size):
        chunk = idx[start:start + batch_size]
        yield to_model_input(split.images[chunk]), split.labels[chunk]
