"""From decoded CIFAR-10 arrays to the batches a rank trains on: the torch path.

The whole uint8 dataset is put on the rank's device once (~185 MB for all of
CIFAR-10's 60,000 images); which images a rank takes each step is ray_cifar.data.sampler's job, shared
with the DALI path (ray_cifar.data.dali). Here: the splits, the torch batch-tensor
train loader (augmentations from ray_cifar.data.augment), mixup/cutmix over any loader, and
evaluation batches. Which pipeline a run uses is ray_cifar.data.pipelines' choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch

from ..config.schema import DataConfig
from .augment import MEAN, STD, BatchMixer, create_augment, device_constant
from .sampler import GlobalBatchSampler
from .source import Cifar10, stratified_split, subset_indices

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


def make_splits(dataset: Cifar10, cfg: DataConfig, device: torch.device | str) -> Splits:
    val_size = cfg.val_count(len(dataset.train_labels))
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
    num_images: int  # train images the epochs are drawn from

    def __len__(self) -> int: ...  # steps per epoch

    def epoch(self, epoch: int) -> Batches: ...  # (images N x 3 x 32 x 32 channels_last, targets) per step


class TrainLoader:
    """One rank's share of every epoch: `global_batch_size // world_size` images per step, augmented by torch ops."""

    name = "torch"

    def __init__(self, split: Split, cfg: DataConfig, global_batch_size: int, rank: int, world_size: int, seed: int,
                 dtype: torch.dtype = torch.float32):
        self.sampler = GlobalBatchSampler(len(split), global_batch_size, rank, world_size, seed, cfg.shuffle,
                                          split.images.device)
        self.split, self.cfg, self.dtype, self.rank = split, cfg, dtype, rank
        self.num_images, self.local_batch_size = len(split), self.sampler.local_batch_size
        self.augment = create_augment(cfg)

    def __len__(self) -> int:
        return len(self.sampler)

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's image indices for `epoch`, step after step (the sampler's)."""
        return self.sampler.epoch_indices(epoch)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self.epoch_indices(epoch)
        # Augmentation randomness differs per rank (each rank sees other images).
        g = self.sampler.generator(epoch, 1 + self.rank)
        for step in range(len(self)):
            idx = indices[step * self.local_batch_size: (step + 1) * self.local_batch_size]
            yield to_model_input(self.augment(self.split.images[idx], g), self.dtype), self.split.labels[idx]


class MixedLoader:
    """A train loader whose batches go through mixup/cutmix: targets become N x classes probabilities."""

    def __init__(self, loader: TrainBatches, mixer: BatchMixer):
        self.loader, self.mixer, self.name, self.num_images = loader, mixer, loader.name, loader.num_images

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int) -> Batches:
        for images, labels in self.loader.epoch(epoch):
            yield self.mixer(images, labels)


def eval_batches(split: Split, batch_size: int, rank: int, world_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's strided share of an evaluation split (every image on exactly one rank)."""
    idx = torch.arange(rank, len(split), world_size, device=split.images.device)
    for start in range(0, idx.shape[0], batch_size):
        chunk = idx[start:start + batch_size]
        yield to_model_input(split.images[chunk]), split.labels[chunk]
