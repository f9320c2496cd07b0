"""The DALI training pipeline of one DDP rank. Imported only when data.pipeline resolves to dali.

The sampler is the torch path's (ray_cifar.data.sampler: one seeded permutation per epoch shared
by all ranks, each global batch cut into equal per-rank slices, the last partial global
batch dropped), so both paths cover exactly the same images. Each step,
`fn.external_source` gathers the rank's slice from the resident uint8 split (on the GPU
when the split is there, with no host round trip) and DALI runs the augmentation graph,
one builder per name of ray_cifar.data.augment.AUGMENTATIONS, with the same meaning:

    crop -> flip -> autoaugment -> color_jitter -> rotation -> erasing -> cutout -> normalize

The output is an HWC batch of the input dtype, copied by `feed_ndarray` into a preallocated
N x H x W x C torch tensor that is handed on as its NCHW view: channels_last, no extra copy.
With device_id=None (a CPU device) the same graph runs as a CPU pipeline, which the tests use.

Random erasing and cutout rectangles are drawn on the host with the torch path's own samplers
(per batch, seeded by epoch and step) and applied by DALI; every other random draw is DALI's
(seeded per rank), so a DALI stream is reproducible for a given seed and epoch sequence.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import warnings

import numpy as np
import torch
from nvidia.dali import fn, types
from nvidia.dali.auto_aug import auto_augment
from nvidia.dali.pipeline import Pipeline, pipeline_def
from nvidia.dali.plugin.pytorch import feed_ndarray

from ..config.schema import DataConfig
from .augment import (AUGMENTATIONS, AUTOAUG_FILL, AUTOAUG_MAX_TRANSLATE, GRAY, MEAN, STD,
                      active_augmentations, cutout_boxes, erasing_boxes)
from .loader import Batches, Split
from .sampler import GlobalBatchSampler

DALI_DTYPES = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16}
PREFETCH_DEPTH = 2  # batches DALI computes ahead of the one being trained on
GENERATED_PREFIX = "__autograph_generated_file"  # DALI's conditionals: the modules they convert the pipeline into
# DALI's own auto_aug calls two operators by aliases DALI has since deprecated (fn.experimental.filter, .equalize).
DALIS_OWN_DEPRECATIONS = re.compile(r"`nvidia\.dali\.fn\.experimental\.(filter|equalize)` is now deprecated")


def dali_cifar10_policy():
    """DALI's CIFAR-10 AutoAugment policy, with translations bounded as the torch path's."""
    return auto_augment.get_reduced_cifar10_policy(max_translate_abs=AUTOAUG_MAX_TRANSLATE)


@contextlib.contextmanager
def without_dalis_own_deprecations():
    """Drop the deprecation warnings of DALI's auto_aug about DALI's own aliases; show every other warning.

    DALI shows them whatever the caller's filters say (it sets "default" around its warn call): three lines in
    every rank's output at every build of a pipeline with AutoAugment, about DALI's code, nothing a user can act
    on. So they are caught with the rest and only the others shown again, under the filters that caught them."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
    finally:  # an exception inside still shows the warnings that came before it
        for w in caught:
            if not (issubclass(w.category, DeprecationWarning) and DALIS_OWN_DEPRECATIONS.search(str(w.message))):
                warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)


def policy_table(policy) -> list[list[tuple[str, float, int | None]]]:
    """A DALI Policy as ray_cifar.data.augment.CIFAR10_POLICY's (name, probability, bin) lists."""
    return [[(aug.name.split(".")[-1].removesuffix("_no_shape"), p, bin_) for aug, p, bin_ in sub_policy]
            for sub_policy in policy.sub_policies]


class DaliGraph:
    """Builds the augmentation graph; one method per augmentation name, same order as the torch path."""

    def __init__(self, cfg: DataConfig, device: str, height: int, width: int, box_sources: dict):
        self.cfg, self.device, self.height, self.width, self.box_sources = cfg, device, height, width, box_sources

    def _dev(self, node):
        return node.gpu() if self.device == "gpu" else node

    def crop(self, images):
        pad = self.cfg.crop_padding
        # The slice start must be INT32; out-of-bounds pixels read crop_fill, as zero padding would.
        start = fn.cast(fn.random.uniform(values=[float(v) for v in range(-pad, pad + 1)], shape=[2]),
                        dtype=types.INT32)
        return fn.slice(images, start=start, shape=[self.height, self.width], axis_names="HW",
                        out_of_bounds_policy="pad", fill_values=self.cfg.crop_fill)

    def flip(self, images):
        return fn.flip(images, horizontal=fn.random.coin_flip(probability=self.cfg.flip_p))

    def autoaugment(self, images):
        with without_dalis_own_deprecations():
            return auto_augment.apply_auto_augment(dali_cifar10_policy(), images, fill_value=AUTOAUG_FILL,
                                                   interp_type=types.INTERP_LINEAR)

    def color_jitter(self, images):
        c, x = self.cfg, images

        def factor(spread):  # uniform in [1 - spread, 1 + spread]; a zero spread is no op at all
            return fn.random.uniform(range=[1 - spread, 1 + spread])

        if c.jitter_brightness:
            x = fn.cast(fn.cast(x, dtype=types.FLOAT) * factor(c.jitter_brightness), dtype=types.UINT8)
        if c.jitter_contrast:
            pixels = fn.cast(x, dtype=types.FLOAT)
            gray = fn.reductions.sum(pixels * types.Constant(np.array(GRAY, np.float32), device=self.device),
                                     axis_names="C", keep_dims=True)
            center = fn.reductions.mean(gray, axis_names="HW", keep_dims=True)
            x = fn.cast(center + (pixels - center) * factor(c.jitter_contrast), dtype=types.UINT8)
        if c.jitter_saturation or c.jitter_hue:
            # fn.hsv is a YIQ-space matrix, as the torch path's: chroma scaled, then rotated.
            saturation = factor(c.jitter_saturation) if c.jitter_saturation else 1.0
            hue = fn.random.uniform(range=[-360 * c.jitter_hue, 360 * c.jitter_hue]) if c.jitter_hue else 0.0
            x = fn.hsv(x, saturation=saturation, hue=hue)
        return x

    def rotation(self, images):
        d = self.cfg.rotation_degrees
        return fn.rotate(images, angle=fn.random.uniform(range=[-d, d]), keep_size=True, fill_value=0,
                         interp_type=types.INTERP_LINEAR)

    def _fill_boxes(self, images, name: str, fill):
        top, left, height, width = (self._dev(node) for node in self.box_sources[name]())
        rows = types.Constant(np.arange(self.height, dtype=np.int32).reshape(-1, 1, 1), device=self.device)
        cols = types.Constant(np.arange(self.width, dtype=np.int32).reshape(1, -1, 1), device=self.device)
        inside = (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)
        inside = fn.cast(inside, dtype=types.UINT8)
        return fn.cast(images * (1 - inside) + fill * inside, dtype=types.UINT8)

    def erasing(self, images):
        fill = self.cfg.erasing_fill
        if fill == "random":
            values = fn.random.uniform(values=[float(v) for v in range(256)], shape=[self.height, self.width, 3],
                                       device=self.device)
            return self._fill_boxes(images, "erasing", fn.cast(values, dtype=types.UINT8))
        mean = [round(m * 255) for m in MEAN] if fill == "mean" else [0, 0, 0]
        return self._fill_boxes(images, "erasing", types.Constant(np.array(mean, np.uint8), device=self.device))

    def cutout(self, images):
        return self._fill_boxes(images, "cutout", types.Constant(np.uint8(0), device=self.device))


missing = set(AUGMENTATIONS) - {name for name in AUGMENTATIONS if hasattr(DaliGraph, name)}
assert not missing, f"augmentations without a DALI builder: {missing}"


def pipeline_threads(world_size: int) -> int:
    return max(1, min(4, (os.cpu_count() or 1) // world_size))


def remove_generated_sources(loaded_before: set[str]) -> None:
    """Delete the files of the modules DALI's conditionals wrote (to the temp folder) since `loaded_before`.

    DALI removes them only at a normal interpreter exit, which a Ray trial process never has: every pipeline a
    trial built left ~20 files in /tmp for good. Each has done its work once loaded (the pipeline function's traced
    the graph at the build; a source callback's is the function DALI calls), and DALI converts a function once a
    process: after the build and after the first batch, nothing is written again."""
    for name in set(sys.modules) - loaded_before:
        if name.startswith(GENERATED_PREFIX):
            with contextlib.suppress(OSError, TypeError):
                os.remove(sys.modules[name].__file__)


class DaliTrainLoader:
    """One rank's train batches from a DALI pipeline (GPU when `device` is CUDA, else CPU)."""

    def __init__(self, split: Split, cfg: DataConfig, global_batch_size: int, rank: int, world_size: int, seed: int,
                 device: torch.device, dtype: torch.dtype = torch.float32, num_threads: int | None = None):
        self.sampler = GlobalBatchSampler(len(split), global_batch_size, rank, world_size, seed, cfg.shuffle,
                                          split.images.device)
        self.num_images = len(split)
        self.split, self.cfg, self.seed, self.rank = split, cfg, seed, rank
        self.on_gpu = device.type == "cuda"
        self.name = "dali-gpu" if self.on_gpu else "dali-cpu"
        if self.on_gpu and not split.images.is_cuda:
            raise ValueError("a GPU DALI pipeline expects the train split on the GPU (make_splits(..., device))")
        # Ray sets CUDA_VISIBLE_DEVICES per worker: the rank's GPU is a visible ordinal, as torch's device index.
        self.device_id = (device.index if device.index is not None else torch.cuda.current_device()) if self.on_gpu else None
        self.local_batch_size = self.sampler.local_batch_size
        self._indices: torch.Tensor | None = None
        self._epoch = 0
        self._started = False
        h, w = split.images.shape[1:3]
        self._buffer = torch.empty((self.local_batch_size, h, w, 3), dtype=dtype, device=device)
        self.pipe = self._build(num_threads or pipeline_threads(world_size))

    def __len__(self) -> int:
        return len(self.sampler)

    # -- sources (called by DALI, possibly ahead of the step being trained on) --

    def _step_indices(self, iteration: int) -> torch.Tensor:
        if iteration >= len(self):
            raise StopIteration  # the end of the epoch; epoch() rewinds the pipeline for the next one
        return self._indices[iteration * self.local_batch_size:(iteration + 1) * self.local_batch_size]

    def _images(self, info):
        images = self.split.images[self._step_indices(info.iteration)]
        return images if self.on_gpu else images.numpy()

    def _boxes(self, name: str, salt: int):
        h, w = self.split.images.shape[1:3]

        def source(info):
            self._step_indices(info.iteration)  # same end of epoch as the images
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self._epoch * 1009 + info.iteration * 7
                                              + self.rank * 7_919_000 + salt)
            n, c = self.local_batch_size, self.cfg
            boxes = (erasing_boxes(n, h, w, c.erasing_p, c.erasing_scale, c.erasing_ratio, g, "cpu") if name == "erasing"
                     else cutout_boxes(n, h, w, c.cutout_size, c.cutout_p, g, "cpu"))
            return tuple(boxes[:, i].to(torch.int32).numpy() for i in range(4))

        return lambda: fn.external_source(source=source, num_outputs=4, batch=True, batch_info=True)

    def _build(self, num_threads: int) -> Pipeline:
        device = "gpu" if self.on_gpu else "cpu"
        h, w = self.split.images.shape[1:3]
        stream = {"cuda_stream": torch.cuda.current_stream(self.device_id).cuda_stream} if self.on_gpu else {}

        # Conditionals on: DALI's AutoAugment picks each sample's sub-policy with `if`s on DataNodes.
        @pipeline_def(enable_conditionals=True)
        def train_pipeline():
            images = fn.external_source(source=self._images, batch=True, batch_info=True, device=device,
                                        layout="HWC", dtype=types.UINT8, **stream)
            graph = DaliGraph(self.cfg, device, h, w, {"erasing": self._boxes("erasing", 1),
                                                       "cutout": self._boxes("cutout", 2)})
            for name in active_augmentations(self.cfg):
                images = getattr(graph, name)(images)
            return fn.crop_mirror_normalize(images, dtype=DALI_DTYPES[self._buffer.dtype], output_layout="HWC",
                                            mean=[m * 255 for m in MEAN], std=[s * 255 for s in STD])

        self._loaded_before_build = loaded = set(sys.modules)
        pipe = train_pipeline(batch_size=self.local_batch_size, num_threads=num_threads, device_id=self.device_id,
                              seed=(self.seed * 1_000_003 + self.rank * 7919 + 17) % 2**31,
                              prefetch_queue_depth=PREFETCH_DEPTH)
        pipe.build()
        remove_generated_sources(loaded)
        return pipe

    def _rewind(self) -> None:
        """Finish the previous epoch (whole or abandoned mid-way) and reset DALI for the next."""
        while True:
            try:
                self.pipe.run()
            except StopIteration:
                break
        self.pipe.reset()

    def epoch(self, epoch: int) -> Batches:
        """This rank's batches of `epoch`; the same seed and sequence of epochs gives the same batches."""
        # New indices first: whatever DALI prefetches after the rewind belongs to this epoch.
        self._indices, self._epoch = self.sampler.epoch_indices(epoch), epoch
        if self._started:
            self._rewind()
        self._started = True
        labels = self.split.labels[self._indices].view(len(self), self.local_batch_size)
        stream = torch.cuda.current_stream(self.device_id) if self.on_gpu else None
        for step in range(len(self)):
            # This step's DALI output, computed PREFETCH_DEPTH steps ahead. On a GPU it is handed over on torch's
            # stream (`run(stream)`): the stream waits for DALI's work, the host does not. Without a stream DALI's
            # outputs are host-synchronous, and copy_to_external, the copy below, then makes the host wait for the
            # copy, queued behind every step of training not yet run: a device sync every step.
            (out,) = self.pipe.run(stream) if stream is not None else self.pipe.run()
            if self._loaded_before_build is not None:
                # The source callbacks (sample indices, erasing and cutout boxes) are converted when DALI first
                # calls them, for the first batches it prefetches: done once the first output is out.
                remove_generated_sources(self._loaded_before_build)
                self._loaded_before_build = None
            # Into the preallocated HWC buffer on torch's stream (ordered after the previous step's use of it, and
            # asynchronous: the output is on the same stream); NOTE the next step overwrites it: clone a batch to
            # keep it.
            feed_ndarray(out.as_tensor(), self._buffer, cuda_stream=stream)
            yield self._buffer.permute(0, 3, 1, 2), labels[step]
