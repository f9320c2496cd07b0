"""From decoded CIFAR-10 arrays to the batches a rank trains on.

The whole uint8 dataset is put on the rank's device once (150 MB for all of
CIFAR-10); an epoch is a seeded permutation, cut into global batches, each cut
into one equal slice per DDP rank. The last partial global batch is dropped, so
every rank takes the same number of steps and every image is seen at most once
per epoch (exactly once when the batch divides the train split).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .augment import augment_batch
from .config import DataConfig
from .data_source import Cifar10, stratified_split, subset_indices

# Per-channel statistics of the CIFAR-10 train split (RGB, 0..1).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


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


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> normalized float NCHW in channels_last memory (the NHWC buffer viewed as NCHW)."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1) * 255
    return (images.permute(0, 3, 1, 2).float() - mean) / std


class TrainLoader:
    """One rank's share of every epoch: `global_batch_size // world_size` images per step."""

    def __init__(self, split: Split, cfg: DataConfig, global_batch_size: int, rank: int, world_size: int, seed: int):
        if global_batch_size > len(split):
            raise ValueError(f"train.global_batch_size={global_batch_size} is larger than the "
                             f"{len(split)} train images: not one step per epoch")
        self.split, self.cfg = split, cfg
        self.global_batch_size, self.rank, self.world_size, self.seed = global_batch_size, rank, world_size, seed
        self.local_batch_size = global_batch_size // world_size

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
            images = augment_batch(self.split.images[idx], self.cfg.crop_padding, self.cfg.flip_p, g)
            yield to_model_input(images), self.split.labels[idx]


def eval_batches(split: Split, batch_size: int, rank: int, world_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's strided share of an evaluation split (every image on exactly one rank)."""
    idx = torch.arange(rank, len(split), world_size, device=split.images.device)
    for start in range(0, idx.shape[0], batch_size):
        chunk = idx[start:start + batch_size]
        yield to_model_input(split.images[chunk]), split.labels[chunk]
