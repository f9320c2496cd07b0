"""Augmentations as batch tensor operations on uint8 NHWC images, on whatever device holds them.

No per-sample Python and no host sync: every random draw is one tensor op with an
explicit generator, so the same seed gives the same batches on any rank layout.

AUGMENTATIONS is the registry, in the order they are applied (the DALI pipeline in
ray_cifar.data.dali has one graph builder per name, with the same meaning):

    crop -> flip -> autoaugment -> color_jitter -> rotation -> erasing -> cutout

Each entry names the DataConfig fields it reads; `create_augment(cfg)` returns the
batch function of the active ones. Mixup and cutmix act on whole (normalized) batches
after either pipeline: `BatchMixer`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..config.schema import DataConfig

# Per-channel statistics of the CIFAR-10 train split (RGB, 0..1).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
# Luma weights (ITU-R 601, the Y of YIQ, PIL's grayscale): contrast centre and saturation axis.
GRAY = (0.299, 0.587, 0.114)

Batch = torch.Tensor  # uint8, N x H x W x C
# RGB -> YIQ (the Y row is GRAY); saturation and hue act on its I, Q chroma plane.
RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
YIQ_TO_RGB = tuple(map(tuple, np.linalg.inv(np.array(RGB_TO_YIQ)).tolist()))


@functools.lru_cache(maxsize=None)
def device_constant(values: tuple, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`values` as a tensor on `device`, built once per (values, device, dtype).

    Why cached: torch.tensor(..., device="cuda") copies from pageable host memory, and that copy
    makes the host wait for the GPU; done inside a step it is a host sync per step. Treat the
    result as read-only (it is shared).
    """
    return torch.tensor(values, dtype=dtype).to(device)


# ---------------------------------------------------------------------------
# Crop and flip


def random_crop(images: Batch, padding: int, generator: torch.Generator, fill: int = 0) -> Batch:
    """Pad by `padding` pixels of `fill`, then crop back to the original size at a uniform offset per image."""
    if padding == 0:
        return images
    n, h, w, _ = images.shape
    padded = torch.nn.functional.pad(images, (0, 0, padding, padding, padding, padding), value=fill)
    # Offsets are uniform over {0, ..., 2*padding}; one gather crops the whole batch.
    dy = torch.randint(0, 2 * padding + 1, (n,), device=images.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=images.device, generator=generator)
    rows = dy[:, None] + torch.arange(h, device=images.device)
    cols = dx[:, None] + torch.arange(w, device=images.device)
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]


def random_flip(images: Batch, p: float, generator: torch.Generator) -> Batch:
    """Mirror each image left-right with probability p."""
    if p == 0:
        return images
    flip = torch.rand(images.shape[0], device=images.device, generator=generator) < p
    return torch.where(flip[:, None, None, None], images.flip(2), images)


# ---------------------------------------------------------------------------
# Pixel helpers shared by jitter and AutoAugment (float math, rounded back to uint8)


def _to_uint8(x: torch.Tensor) -> Batch:
    return x.round().clamp(0, 255).to(torch.uint8)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """N x H x W x 1 luma of a float NHWC batch."""
    return (x * device_constant(GRAY, x.device, x.dtype)).sum(-1, keepdim=True)


def _blend(x: torch.Tensor, center: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """center + (x - center) * factor, with one factor per image."""
    return center + (x - center) * factor.view(-1, 1, 1, 1)


def _yiq_matrix(saturation: torch.Tensor, hue_turns: torch.Tensor) -> torch.Tensor:
    """Per-image 3x3 RGB->RGB matrices: scale the YIQ chroma by `saturation`, rotate it by `hue_turns`."""
    rgb_to_yiq = device_constant(RGB_TO_YIQ, saturation.device)
    yiq_to_rgb = device_constant(YIQ_TO_RGB, saturation.device)
    angle = hue_turns * 2 * math.pi
    cos, sin = torch.cos(angle) * saturation, torch.sin(angle) * saturation
    ones, zeros = torch.ones_like(cos), torch.zeros_like(cos)
    chroma = torch.stack([torch.stack([ones, zeros, zeros], -1), torch.stack([zeros, cos, -sin], -1),
                          torch.stack([zeros, sin, cos], -1)], -2)
    return yiq_to_rgb @ chroma @ rgb_to_yiq


def _affine(images: Batch, inverse: torch.Tensor, fill: float, mode: str = "bilinear") -> Batch:
    """Warp each image by a 2x3 pixel-space matrix mapping OUTPUT coordinates to input coordinates.

    Coordinates are (x, y) of pixel centres at i + 0.5; outside the image reads `fill`.
    """
    n, h, w, _ = images.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=images.device) + 0.5,
                            torch.arange(w, device=images.device) + 0.5, indexing="ij")
    points = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, h * w, 3)
    source = points @ inverse.transpose(1, 2)  # N x HW x 2, pixel coordinates
    grid = (source * device_constant((2.0 / w, 2.0 / h), images.device) - 1).view(n, h, w, 2)
    x = images.permute(0, 3, 1, 2).float() - fill  # zero padding of (x - fill) is padding with fill
    out = torch.nn.functional.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False) + fill
    return _to_uint8(out.permute(0, 2, 3, 1))


def _rotation_inverse(degrees: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Output->input matrices of a rotation by `degrees` (counter-clockwise on screen) about the centre."""
    angle = degrees * math.pi / 180
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx, cy = w / 2, h / 2
    # Inverse rotation: input = R(-angle) (output - centre) + centre, with y pointing down.
    row0 = torch.stack([cos, -sin, cx - cos * cx + sin * cy], -1)
    row1 = torch.stack([sin, cos, cy - sin * cx - cos * cy], -1)
    return torch.stack([row0, row1], 1)


# ---------------------------------------------------------------------------
# Color jitter and rotation


def color_jitter(images: Batch, brightness: float, contrast: float, saturation: float, hue: float,
                 generator: torch.Generator) -> Batch:
    """Brightness, then contrast (around the image's mean gray), then saturation and hue (YIQ), per image."""
    n, device = images.shape[0], images.device

    def factor(spread: float) -> torch.Tensor:
        return 1 + spread * (2 * torch.rand(n, device=device, generator=generator) - 1)

    x = images.float()
    b, c, s = factor(brightness), factor(contrast), factor(saturation)
    h = hue * (2 * torch.rand(n, device=device, generator=generator) - 1)
    x = _to_uint8(x * b.view(-1, 1, 1, 1)).float()
    x = _to_uint8(_blend(x, _gray(x).mean((1, 2), keepdim=True), c)).float()
    if saturation or hue:
        x = _to_uint8(torch.einsum("nij,nhwj->nhwi", _yiq_matrix(s, h), x)).float()
    return x.to(torch.uint8)


def random_rotation(images: Batch, degrees: float, generator: torch.Generator) -> Batch:
    """Rotate each image by a uniform angle in [-degrees, degrees] about its centre (bilinear, fill 0)."""
    n, h, w, _ = images.shape
    angle = degrees * (2 * torch.rand(n, device=images.device, generator=generator) - 1)
    return _affine(images, _rotation_inverse(angle, h, w), fill=0.0)


# ---------------------------------------------------------------------------
# Random erasing and cutout: rectangles sampled as tensors, applied with one mask


def erasing_boxes(n: int, h: int, w: int, p: float, scale: tuple[float, float], ratio: tuple[float, float],
                  generator: torch.Generator, device: torch.device | str, attempts: int = 10) -> torch.Tensor:
    """Random-erasing rectangles as an int64 N x 4 tensor (top, left, height, width); height 0 = not erased.

    torchvision's rule: with probability p, up to `attempts` draws of (area, log-ratio); the first
    that fits the image is used. All attempts are drawn at once and the first fitting one picked.
    """
    area = h * w * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, attempts, device=device, generator=generator))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, attempts, device=device, generator=generator))
    eh = torch.sqrt(area * aspect).round().long()
    ew = torch.sqrt(area / aspect).round().long()
    fits = (eh < h) & (ew < w) & (eh > 0) & (ew > 0)
    first = torch.argmax(fits.int(), 1)  # the first fitting attempt (0 when none fits; masked below)
    eh, ew = eh.gather(1, first[:, None])[:, 0], ew.gather(1, first[:, None])[:, 0]
    erase = fits.any(1) & (torch.rand(n, device=device, generator=generator) < p)
    top = (torch.rand(n, device=device, generator=generator) * (h - eh + 1)).long()
    left = (torch.rand(n, device=device, generator=generator) * (w - ew + 1)).long()
    return torch.stack([top, left, eh * erase, ew * erase], 1)


def cutout_boxes(n: int, h: int, w: int, size: int, p: float, generator: torch.Generator,
                 device: torch.device | str) -> torch.Tensor:
    """Cutout squares (DeVries & Taylor 2017) as N x 4 (top, left, height, width): centre uniform over the
    image, clipped at the border, so squares near an edge are smaller; height 0 = no cutout."""
    cy = torch.randint(0, h, (n,), device=device, generator=generator)
    cx = torch.randint(0, w, (n,), device=device, generator=generator)
    apply = torch.rand(n, device=device, generator=generator) < p
    top, left = (cy - size // 2).clamp(min=0), (cx - size // 2).clamp(min=0)
    bottom, right = (cy - size // 2 + size).clamp(max=h), (cx - size // 2 + size).clamp(max=w)
    return torch.stack([top, left, (bottom - top) * apply, (right - left) * apply], 1)


def box_mask(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """N x H x W x 1 bool, True inside each image's box."""
    rows = torch.arange(h, device=boxes.device).view(1, h, 1)
    cols = torch.arange(w, device=boxes.device).view(1, 1, w)
    top, left, bh, bw = (boxes[:, i].view(-1, 1, 1) for i in range(4))
    return ((rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw))[..., None]


def fill_values(fill: str, shape: torch.Size, generator: torch.Generator, device) -> torch.Tensor:
    """What erased pixels become: 0, the dataset mean per channel, or uniform random bytes."""
    if fill == "random":
        return torch.randint(0, 256, tuple(shape), device=device, generator=generator, dtype=torch.uint8)
    mean = tuple(round(m * 255) for m in MEAN) if fill == "mean" else (0, 0, 0)
    return device_constant(mean, torch.device(device), torch.uint8)


def random_erasing(images: Batch, cfg: DataConfig, generator: torch.Generator) -> Batch:
    n, h, w, _ = images.shape
    boxes = erasing_boxes(n, h, w, cfg.erasing_p, cfg.erasing_scale, cfg.erasing_ratio, generator, images.device)
    fill = fill_values(cfg.erasing_fill, images.shape, generator, images.device)
    return torch.where(box_mask(boxes, h, w), fill, images)


def cutout(images: Batch, size: int, p: float, generator: torch.Generator) -> Batch:
    n, h, w, _ = images.shape
    boxes = cutout_boxes(n, h, w, size, p, generator, images.device)
    return torch.where(box_mask(boxes, h, w), torch.zeros((), dtype=images.dtype, device=images.device), images)


# ---------------------------------------------------------------------------
# AutoAugment, CIFAR-10 policy (Cubuk et al. 2019), with DALI's parameterisation
# (nvidia.dali.auto_aug: 11 magnitude bins, PIL-style enhance factors 0.1..1.9) so that
# both paths mean the same thing. (op, probability, magnitude bin); None = no magnitude.

CIFAR10_POLICY = [
    [("invert", 0.1, None), ("contrast", 0.2, 6)],
    [("rotate", 0.7, 2), ("translate_x", 0.3, 9)],
    [("sharpness", 0.8, 1), ("sharpness", 0.9, 3)],
    [("shear_y", 0.5, 8), ("translate_y", 0.7, 9)],
    [("auto_contrast", 0.5, None), ("equalize", 0.9, None)],
    [("shear_y", 0.2, 7), ("posterize", 0.3, 7)],
    [("color", 0.4, 3), ("brightness", 0.6, 7)],
    [("sharpness", 0.3, 9), ("brightness", 0.7, 9)],
    [("equalize", 0.6, None), ("equalize", 0.5, None)],
    [("contrast", 0.6, 7), ("sharpness", 0.6, 5)],
    [("color", 0.7, 7), ("translate_x", 0.5, 8)],
    [("equalize", 0.3, None), ("auto_contrast", 0.4, None)],
    [("translate_y", 0.4, 3), ("sharpness", 0.2, 6)],
    [("brightness", 0.9, 6), ("color", 0.2, 8)],
    [("solarize", 0.5, 2)],
    [("equalize", 0.2, None), ("auto_contrast", 0.6, None)],
    [("equalize", 0.2, None), ("equalize", 0.6, None)],
    [("color", 0.9, 9), ("equalize", 0.6, None)],
    [("auto_contrast", 0.8, None), ("solarize", 0.2, 8)],
    [("brightness", 0.1, 3), ("color", 0.7, 0)],
    [("solarize", 0.4, 5), ("auto_contrast", 0.9, None)],
    [("translate_y", 0.9, 9), ("translate_y", 0.7, 9)],
    [("auto_contrast", 0.9, None), ("solarize", 0.8, 3)],
    [("equalize", 0.8, None), ("invert", 0.1, None)],
    [("translate_y", 0.7, 9), ("auto_contrast", 0.9, None)],
]
AUTOAUG_POLICIES = {"cifar10": CIFAR10_POLICY}
AUTOAUG_BINS = 11
AUTOAUG_FILL = 128  # geometric ops fill with mid-gray, as DALI's and PIL's AutoAugment
AUTOAUG_MAX_TRANSLATE = 10  # pixels at the top magnitude bin (of a 32-pixel image)
# Magnitude range per op (linspace over the bins) and whether its sign is random.
AUTOAUG_RANGES = {
    "shear_x": ((0.0, 0.3), True), "shear_y": ((0.0, 0.3), True),
    "translate_x": ((0.0, AUTOAUG_MAX_TRANSLATE), True), "translate_y": ((0.0, AUTOAUG_MAX_TRANSLATE), True),
    "rotate": ((0.0, 30.0), True), "brightness": ((0.1, 1.9), False), "color": ((0.1, 1.9), False),
    "contrast": ((0.1, 1.9), False), "sharpness": ((0.1, 1.9), False), "posterize": ((0.0, 4.0), False),
    # Threshold rises with the bin (bin 0 inverts every pixel, bin 10 none), as DALI's CIFAR-10 policy and the
    # AutoAugment paper's code (TF `solarize(image, threshold=int(level / 10 * 256))`).
    "solarize": ((0.0, 256.0), False),
}
GEOMETRIC_OPS = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")


SHARPNESS_SMOOTHING = tuple(tuple(v / 13 for v in row) for row in ((1, 1, 1), (1, 5, 1), (1, 1, 1)))


def _sharpen(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance.Sharpness: blend with the 3x3 smoothing filter [[1,1,1],[1,5,1],[1,1,1]]/13."""
    kernel = device_constant(SHARPNESS_SMOOTHING, x.device).expand(3, 1, 3, 3)
    nchw = x.permute(0, 3, 1, 2)
    blurred = torch.nn.functional.conv2d(torch.nn.functional.pad(nchw, (1, 1, 1, 1), mode="replicate"), kernel,
                                         groups=3).permute(0, 2, 3, 1)
    return _blend(x, blurred, factor)


def _equalize(images: Batch) -> Batch:
    """Per-image, per-channel histogram equalization (OpenCV's rule, as DALI's fn.experimental.equalize)."""
    n, h, w, c = images.shape
    flat = images.permute(0, 3, 1, 2).reshape(n * c, h * w).long()
    hist = torch.zeros(n * c, 256, device=images.device).scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float))
    cdf = hist.cumsum(1)
    cdf_min = torch.where(hist > 0, cdf, torch.full_like(cdf, float(h * w))).min(1, keepdim=True).values
    denom = (h * w - cdf_min).clamp(min=1)
    lut = ((cdf - cdf_min) * 255 / denom).round().clamp(0, 255)
    lut = torch.where(cdf_min == h * w, torch.arange(256, device=images.device).float(), lut)  # one-value channel
    out = lut.gather(1, flat).view(n, c, h, w).permute(0, 2, 3, 1)
    return out.to(torch.uint8)


def _auto_contrast(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.amin((1, 2), keepdim=True), x.amax((1, 2), keepdim=True)
    scale = torch.where(hi > lo, 255 / (hi - lo).clamp(min=1), torch.ones_like(hi))
    return torch.where(hi > lo, (x - lo) * scale, x)


def _geometric_inverse(op: torch.Tensor, magnitude: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Output->input matrices for each image's geometric op (identity where op is not geometric).

    Shears and translations act about the top-left corner (as DALI's and PIL's), rotation about the centre.
    """
    n = op.shape[0]
    codes = {name: i for i, name in enumerate(AUTOAUG_OPS)}
    # Each image has one op, so its forward matrix is the identity plus one off-diagonal entry m,
    # and the inverse is the identity with -m there (no torch.linalg.inv: it syncs to check for singularity).
    inverse = torch.eye(3, device=op.device)[:2].expand(n, 2, 3).clone()
    inverse[:, 0, 1] = torch.where(op == codes["shear_x"], -magnitude, 0.0)
    inverse[:, 1, 0] = torch.where(op == codes["shear_y"], -magnitude, 0.0)
    inverse[:, 0, 2] = torch.where(op == codes["translate_x"], -magnitude, 0.0)
    inverse[:, 1, 2] = torch.where(op == codes["translate_y"], -magnitude, 0.0)
    rotation = _rotation_inverse(torch.where(op == codes["rotate"], magnitude, 0.0), h, w)
    return torch.where((op == codes["rotate"]).view(-1, 1, 1), rotation, inverse)


AUTOAUG_OPS = ("identity", *GEOMETRIC_OPS, "brightness", "color", "contrast", "sharpness", "posterize", "solarize",
               "invert", "equalize", "auto_contrast")


def _posterize(images: Batch, magnitude: torch.Tensor) -> Batch:
    bits = magnitude.round().clamp(1, 8).long()  # keep this many high bits
    return images & (255 - (2 ** (8 - bits) - 1)).to(torch.uint8).view(-1, 1, 1, 1)


def _geometric(images: Batch, magnitude: torch.Tensor, op: torch.Tensor) -> Batch:
    h, w = images.shape[1:3]
    return _affine(images, _geometric_inverse(op, magnitude, h, w), fill=float(AUTOAUG_FILL))


# Each takes (uint8 images, per-image magnitudes, per-image op codes) of the images that drew it.
AUTOAUG_FUNCTIONS = {
    GEOMETRIC_OPS: _geometric,  # one warp for all five, each image with its own matrix
    ("brightness",): lambda im, m, op: _to_uint8(im.float() * m.view(-1, 1, 1, 1)),
    ("color",): lambda im, m, op: _to_uint8(_blend(im.float(), _gray(im.float()), m)),
    ("contrast",): lambda im, m, op: _to_uint8(_blend(im.float(), _gray(im.float()).mean((1, 2), keepdim=True), m)),
    ("sharpness",): lambda im, m, op: _to_uint8(_sharpen(im.float(), m)),
    ("posterize",): lambda im, m, op: _posterize(im, m),
    ("solarize",): lambda im, m, op: torch.where(im.float() >= m.view(-1, 1, 1, 1), 255 - im, im),
    ("invert",): lambda im, m, op: 255 - im,
    ("equalize",): lambda im, m, op: _equalize(im),
    ("auto_contrast",): lambda im, m, op: _to_uint8(_auto_contrast(im.float())),
}


def _apply_autoaug_op(images: Batch, op: torch.Tensor, magnitude: torch.Tensor, sync_free: bool | None = None) -> Batch:
    """Apply, to each image, its own op (code into AUTOAUG_OPS) with its own magnitude.

    sync_free (default: on CUDA) runs every op on the whole batch and selects per image; otherwise
    each op runs on the images that drew it (same result).
    """
    codes = {name: i for i, name in enumerate(AUTOAUG_OPS)}
    sync_free = images.is_cuda if sync_free is None else sync_free
    out = images if sync_free else images.clone()
    for names, function in AUTOAUG_FUNCTIONS.items():
        chosen = functools.reduce(torch.logical_or, [op == codes[name] for name in names])
        if sync_free:
            # No host sync on a GPU: the op runs on the whole batch and each image keeps its own result.
            out = torch.where(chosen.view(-1, 1, 1, 1), function(images, magnitude, op), out)
        else:
            # On a CPU reading the selection is free, and running each op on its images only is ~5x less work.
            idx = chosen.nonzero()[:, 0]
            if idx.numel():
                out[idx] = function(images[idx], magnitude[idx], op[idx])
    return out


def autoaug_magnitude(name: str, bin_: int | None) -> float:
    """The unsigned parameter of op `name` at magnitude bin `bin_` (0 for ops without a magnitude):
    linspace over AUTOAUG_RANGES[name] in AUTOAUG_BINS bins, as DALI's `augmentation(mag_range=...)`."""
    (lo, hi), _ = AUTOAUG_RANGES.get(name, ((0.0, 0.0), False))
    return lo + (hi - lo) * (bin_ or 0) / (AUTOAUG_BINS - 1)


def _policy_tables(policy_name: str, device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """(op code, probability, magnitude, random sign?) as S x 2 tensors; a missing second op is identity.

    Built once per policy and device (see device_constant)."""
    codes = {name: i for i, name in enumerate(AUTOAUG_OPS)}
    policy = AUTOAUG_POLICIES[policy_name]
    op, prob, mag, signed = (np.zeros((len(policy), 2)) for _ in range(4))
    for s, sub_policy in enumerate(policy):
        for k, (name, p, bin_) in enumerate(sub_policy):
            op[s, k], prob[s, k], mag[s, k] = codes[name], p, autoaug_magnitude(name, bin_)
            signed[s, k] = AUTOAUG_RANGES.get(name, (None, False))[1]
    device = torch.device(device)
    as_constant = lambda a, dtype: device_constant(tuple(map(tuple, a.tolist())), device, dtype)  # noqa: E731
    return (as_constant(op, torch.long), as_constant(prob, torch.float), as_constant(mag, torch.float),
            as_constant(signed, torch.bool))


def autoaugment(images: Batch, policy_name: str, generator: torch.Generator,
                return_sub_policy: bool = False) -> Batch | tuple[Batch, torch.Tensor]:
    """Each image draws one sub-policy uniformly; each of its ops runs with its probability."""
    n, device = images.shape[0], images.device
    op, prob, mag, signed = _policy_tables(policy_name, device)
    sub_policy = torch.randint(0, op.shape[0], (n,), device=device, generator=generator)
    for k in range(op.shape[1]):
        runs = torch.rand(n, device=device, generator=generator) < prob[sub_policy, k]
        sign = torch.where(signed[sub_policy, k] & (torch.rand(n, device=device, generator=generator) < 0.5), -1.0, 1.0)
        images = _apply_autoaug_op(images, torch.where(runs, op[sub_policy, k], 0), mag[sub_policy, k] * sign)
    return (images, sub_policy) if return_sub_policy else images


# ---------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class Augmentation:
    name: str
    fields: tuple[str, ...]  # the DataConfig fields it reads
    is_active: Callable[[DataConfig], bool]
    apply: Callable[[Batch, DataConfig, torch.Generator], Batch]


AUGMENTATIONS: dict[str, Augmentation] = {}


def register(name: str, fields: tuple[str, ...], is_active: Callable[[DataConfig], bool]):
    def wrap(apply):
        AUGMENTATIONS[name] = Augmentation(name, fields, is_active, apply)
        return apply
    return wrap


register("crop", ("crop_padding", "crop_fill"), lambda c: c.crop_padding > 0)(
    lambda x, c, g: random_crop(x, c.crop_padding, g, c.crop_fill))
register("flip", ("flip_p",), lambda c: c.flip_p > 0)(lambda x, c, g: random_flip(x, c.flip_p, g))
register("autoaugment", ("autoaugment",), lambda c: c.autoaugment is not None)(
    lambda x, c, g: autoaugment(x, c.autoaugment, g))
register("color_jitter", ("jitter_brightness", "jitter_contrast", "jitter_saturation", "jitter_hue"),
         lambda c: any((c.jitter_brightness, c.jitter_contrast, c.jitter_saturation, c.jitter_hue)))(
    lambda x, c, g: color_jitter(x, c.jitter_brightness, c.jitter_contrast, c.jitter_saturation, c.jitter_hue, g))
register("rotation", ("rotation_degrees",), lambda c: c.rotation_degrees > 0)(
    lambda x, c, g: random_rotation(x, c.rotation_degrees, g))
register("erasing", ("erasing_p", "erasing_scale", "erasing_ratio", "erasing_fill"), lambda c: c.erasing_p > 0)(
    random_erasing)
register("cutout", ("cutout_size", "cutout_p"), lambda c: c.cutout_size > 0 and c.cutout_p > 0)(
    lambda x, c, g: cutout(x, c.cutout_size, c.cutout_p, g))


def active_augmentations(cfg: DataConfig) -> list[str]:
    return [name for name, aug in AUGMENTATIONS.items() if aug.is_active(cfg)]


def create_augment(cfg: DataConfig) -> Callable[[Batch, torch.Generator], Batch]:
    """The batch function of the active augmentations, in registry order."""
    steps = [AUGMENTATIONS[name] for name in active_augmentations(cfg)]

    def augment(images: Batch, generator: torch.Generator) -> Batch:
        for step in steps:
            images = step.apply(images, cfg, generator)
        return images

    return augment


def augment_batch(images: Batch, crop_padding: int, flip_p: float, generator: torch.Generator) -> Batch:
    return random_flip(random_crop(images, crop_padding, generator), flip_p, generator)


# ---------------------------------------------------------------------------
# Mixup and cutmix: whole-batch, on the model input, after either pipeline


class BatchMixer:
    """Mixes each batch with its reverse (timm's pairing) and returns soft targets (N x classes, float32).

    Per batch, one uniform draw picks mixup (mixup_p), cutmix (the next cutmix_p) or neither; lambda
    and the cutmix box come from a host numpy generator, so nothing waits for the device.
    """

    def __init__(self, cfg: DataConfig, num_classes: int, seed: int):
        self.cfg, self.num_classes = cfg, num_classes
        self.rng = np.random.default_rng(seed)

    @staticmethod
    def is_active(cfg: DataConfig) -> bool:
        return cfg.mixup_p > 0 or cfg.cutmix_p > 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images: N x C x H x W (any float dtype/memory format); labels: int64 N."""
        targets = torch.nn.functional.one_hot(labels, self.num_classes).float()
        u = self.rng.random()
        if u < self.cfg.mixup_p:
            lam = float(self.rng.beta(self.cfg.mixup_alpha, self.cfg.mixup_alpha))
            images = images * lam + images.flip(0) * (1 - lam)
        elif u < self.cfg.mixup_p + self.cfg.cutmix_p:
            h, w = images.shape[-2:]
            cut = math.sqrt(1 - float(self.rng.beta(self.cfg.cutmix_alpha, self.cfg.cutmix_alpha)))
            ch, cw = int(h * cut), int(w * cut)
            cy, cx = int(self.rng.integers(h)), int(self.rng.integers(w))
            top, bottom = max(cy - ch // 2, 0), min(cy + ch - ch // 2, h)
            left, right = max(cx - cw // 2, 0), min(cx + cw - cw // 2, w)
            images = images.clone()
            images[..., top:bottom, left:right] = images.flip(0)[..., top:bottom, left:right]
            lam = 1 - (bottom - top) * (right - left) / (h * w)  # the area actually kept
        else:
            return images, targets
        return images, targets * lam + targets.flip(0) * (1 - lam)
