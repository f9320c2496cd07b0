"""Which images each DDP rank trains on, step after step: the sampler below both data pipelines.

An epoch is one seeded permutation of the train split (the same on every rank), cut into
global batches of `global_batch_size` images, each cut into `world_size` equal slices, one per
rank. The last partial global batch is dropped, so every rank takes the same number of steps
and every image is seen at most once per epoch (exactly once when the batch divides the split).
"""

from __future__ import annotations

import torch


class GlobalBatchSampler:
    """One rank's image indices for every epoch: `global_batch_size // world_size` per step.

    global_batch_size is images per optimizer step over ALL ranks (train.global_batch_size).
    """

    def __init__(self, num_images: int, global_batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle: bool = True, device: torch.device | str = "cpu"):
        if global_batch_size > num_images:
            raise ValueError(f"train.global_batch_size={global_batch_size} is larger than the "
                             f"{num_images} train images: not one step per epoch")
        self.num_images, self.global_batch_size, self.rank, self.world_size = num_images, global_batch_size, rank, world_size
        self.seed, self.shuffle, self.device = seed, shuffle, device
        self.local_batch_size = global_batch_size // world_size

    def __len__(self) -> int:
        """Steps per epoch."""
        return self.num_images // self.global_batch_size

    def generator(self, epoch: int, stream: int) -> torch.Generator:
        """A generator seeded by (seed, epoch, stream): stream 0 orders the epoch, others are free for augmentation."""
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed * 1_000_003 + epoch * 1009 + stream)
        return g

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's image indices for `epoch`, step after step (len(self) * local batch)."""
        n = self.num_images
        # Same generator on every rank, so all ranks agree on the permutation.
        order = (torch.randperm(n, device=self.device, generator=self.generator(epoch, 0)) if self.shuffle
                 else torch.arange(n, device=self.device))
        steps = order[: len(self) * self.global_batch_size].view(len(self), self.world_size, self.local_batch_size)
        return steps[:, self.rank].reshape(-1)
