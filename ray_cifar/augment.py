"""Augmentations as batch tensor operations on uint8 NHWC images, on whatever device holds them.

No per-sample Python and no host sync: every random draw is one tensor op with an
explicit generator, so the same seed gives the same batches on any rank layout.
"""

from __future__ import annotations

import torch


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by `padding` pixels, then crop back to the original size at a uniform offset per image."""
    if padding == 0:
        return images
    n, h, w, _ = images.shape
    padded = torch.nn.functional.pad(images, (0, 0, padding, padding, padding, padding))
    # Offsets are uniform over {0, ..., 2*padding}; one gather crops the whole batch.
    dy = torch.randint(0, 2 * padding + 1, (n,), device=images.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=images.device, generator=generator)
    rows = dy[:, None] + torch.arange(h, device=images.device)
    cols = dx[:, None] + torch.arange(w, device=images.device)
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]


def random_flip(images: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability p."""
    if p == 0:
        return images
    flip = torch.rand(images.shape[0], device=images.device, generator=generator) < p
    return torch.where(flip[:, None, None, None], images.flip(2), images)


def augment_batch(images: torch.Tensor, crop_padding: int, flip_p: float, generator: torch.Generator) -> torch.Tensor:
    return random_flip(random_crop(images, crop_padding, generator), flip_p, generator)
