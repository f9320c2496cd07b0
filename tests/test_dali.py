"""The DALI path on CPU pipelines (device_id=None): sharding, statistics, agreement with torch, determinism.

Skipped as a whole when nvidia.dali is not importable. The GPU pipeline is the same graph with
device="gpu"; where a GPU exists, test_dali_gpu_pipeline_matches_cpu_sharding runs it without augmentation and
test_dali_gpu_pipeline_with_every_augmentation_agrees_with_torch_in_distribution with all of them.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

dali = pytest.importorskip("nvidia.dali", reason="nvidia.dali is not installed: the DALI path cannot be tested")

from ray_cifar.data import augment as A  # noqa: E402
from ray_cifar.validation import load_config  # noqa: E402
from ray_cifar.data.dali import (DaliTrainLoader, dali_cifar10_policy, policy_table,  # noqa: E402
                                without_dalis_own_deprecations)
from ray_cifar.data.loader import Split, TrainLoader  # noqa: E402
from ray_cifar.data.pipelines import create_train_loader  # noqa: E402
from test_augment import (FULL, IDENTITY_ON_LOW_CONTRAST, assert_rate, coordinate_images, crop_offsets,  # noqa: E402
                          erased_boxes, expected_unchanged_rate, low_contrast_images)

CPU = torch.device("cpu")


def data_cfg(*sets: str):
    return load_config(None, ["data.crop_padding=0", "data.flip_p=0", *[f"data.{s}" for s in sets]]).data


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Undo the normalization: NCHW float -> NHWC uint8 (exact for fp32 outputs)."""
    mean = torch.tensor(A.MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(A.STD).view(1, 3, 1, 1) * 255
    return (x.float() * std + mean).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def dali_epoch(images, cfg, global_batch=None, rank=0, world_size=1, seed=0, epoch=0, loader=None, device=CPU):
    """All of one epoch's DALI batches as uint8 NHWC on the CPU (copied: the loader reuses its buffer); a GPU
    DEVICE runs the GPU pipeline on images resident there."""
    split = Split(images.to(device), (torch.arange(images.shape[0]) % 10).to(device))
    loader = loader or DaliTrainLoader(split, cfg, global_batch or images.shape[0], rank, world_size, seed, device,
                                       num_threads=1)
    return torch.cat([to_uint8(x.to(CPU, torch.float32, copy=True)) for x, _ in loader.epoch(epoch)])


def test_without_augmentation_two_ranks_get_exactly_their_slices_and_cover_the_epoch_once():
    n, batch = 400, 100
    images = low_contrast_images(n)
    split = Split(images, torch.arange(n) % 10)
    cfg = data_cfg()
    for epoch in (0, 1):  # the second epoch also checks the rewind between epochs
        seen = []
        for rank in (0, 1):
            loader = DaliTrainLoader(split, cfg, batch, rank, 2, seed=3, device=CPU, num_threads=1)
            indices = TrainLoader(split, cfg, batch, rank, 2, seed=3).epoch_indices(epoch)
            for e in range(epoch + 1):
                batches = [(x.clone(), y) for x, y in loader.epoch(e)]
            assert len(batches) == len(loader) == n // batch
            got = torch.cat([to_uint8(x) for x, _ in batches])
            assert torch.equal(got, images[indices]), f"rank {rank} epoch {epoch}: not its slice of the permutation"
            assert torch.equal(torch.cat([y for _, y in batches]), split.labels[indices])
            assert batches[0][0].is_contiguous(memory_format=torch.channels_last)
            seen.append(indices)
        assert sorted(torch.cat(seen).tolist()) == list(range(n))


def test_last_partial_global_batch_is_dropped_like_the_torch_path():
    split = Split(low_contrast_images(130), torch.arange(130) % 10)
    loader = DaliTrainLoader(split, data_cfg(), 40, 1, 2, seed=0, device=CPU, num_threads=1)
    batches = list(loader.epoch(0))
    assert len(batches) == 3 and all(x.shape[0] == 20 for x, _ in batches)


def test_an_abandoned_epoch_does_not_leak_into_the_next():
    images = low_contrast_images(300)
    split = Split(images, torch.arange(300) % 10)
    cfg = data_cfg()
    loader = DaliTrainLoader(split, cfg, 100, 0, 1, seed=1, device=CPU, num_threads=1)
    next(iter(loader.epoch(0)))  # stop after one step
    got = dali_epoch(images, cfg, loader=loader, epoch=1)
    assert torch.equal(got, images[TrainLoader(split, cfg, 100, 0, 1, seed=1).epoch_indices(1)])


def test_flip_rate_and_crop_offsets_uniform_with_fill():
    n, pad = 4000, 4
    images = coordinate_images(n)
    # shuffle off: output i comes from input i, so each output is its input or its mirror.
    cfg_no_shuffle = data_cfg("flip_p=0.3", "shuffle=false")
    flipped = dali_epoch(images, cfg_no_shuffle, global_batch=1000)
    is_flip = (flipped == images.flip(2)).flatten(1).all(1)
    assert ((flipped == images).flatten(1).all(1) | is_flip).all()
    assert_rate(is_flip.float().mean().item(), 0.3, n)

    cropped = dali_epoch(images, data_cfg(f"crop_padding={pad}", "crop_fill=255", "shuffle=false"), global_batch=1000)
    dy, dx = crop_offsets(cropped, pad)
    for offsets in (dy, dx):
        counts = torch.bincount(offsets, minlength=2 * pad + 1)
        assert counts.numel() == 2 * pad + 1
        assert_rate(counts.min().item() / n, 1 / (2 * pad + 1), n)
        assert_rate(counts.max().item() / n, 1 / (2 * pad + 1), n)
    assert (cropped[dy == 0, :pad] == 255).all() and (cropped[dy >= pad][:, :pad, 16] != 255).all()
    # Crop moves pixels, never changes them: the centre pixel is the input's pixel (dy-4, dx-4) away.
    assert torch.equal(cropped[:, 16, 16, 2], images[:, 0, 0, 2])


@pytest.mark.parametrize("where", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_erasing_and_cutout_statistics(where):
    # On the GPU too: its graph draws the random fill on the device (fn.random.uniform), and the GPU test of
    # every augmentation at once uses the zero fill only.
    device = CPU if where == "cpu" else torch.device("cuda", torch.cuda.current_device())
    n = 3000
    white = torch.full((n, 32, 32, 3), 255, dtype=torch.uint8)
    cfg = data_cfg("erasing_p=0.6", "erasing_scale=[0.05,0.2]", "erasing_ratio=[0.5,2.0]", "erasing_fill=mean")
    out = dali_epoch(white, cfg, global_batch=1000, device=device)
    mean = torch.tensor([round(m * 255) for m in A.MEAN], dtype=torch.uint8)
    count, h, w = erased_boxes(out, out == mean)
    erased = count > 0
    assert_rate(erased.float().mean().item(), 0.6, n)
    area = count[erased].float() / 1024
    assert area.min() >= 0.04 and area.max() <= 0.24 and area.mean().item() == pytest.approx(0.125, abs=0.01)

    out = dali_epoch(white, data_cfg("cutout_size=8", "cutout_p=0.7"), global_batch=1000, device=device)
    count, h, w = erased_boxes(out, out == 0)
    assert_rate((count > 0).float().mean().item(), 0.7, n)
    assert h.max() == 8 and w.max() == 8
    assert_rate(((h == 8) & (w == 8)).float().mean().item(), 0.7 * (25 / 32) ** 2, n)

    random_fill = dali_epoch(white[:500], data_cfg("erasing_p=1", "erasing_scale=[0.3,0.3]", "erasing_fill=random"),
                             global_batch=500, device=device).float()
    values = random_fill[random_fill != 255]
    assert values.mean().item() == pytest.approx(127, abs=2) and values.std().item() == pytest.approx(73.6, abs=2)


def test_dali_autoaugment_is_the_cifar10_policy_at_its_rate():
    assert policy_table(dali_cifar10_policy()) == A.CIFAR10_POLICY
    n = 2000
    images = low_contrast_images(n, seed=2)
    out = dali_epoch(images, data_cfg("autoaugment=cifar10", "shuffle=false"), global_batch=1000)
    unchanged = (out == images).flatten(1).all(1).float().mean().item()
    assert_rate(unchanged, expected_unchanged_rate(A.CIFAR10_POLICY, IDENTITY_ON_LOW_CONTRAST), n)


def test_autoaugment_shows_no_deprecation_of_dalis_own_aliases():
    """DALI's auto_aug calls fn.experimental.filter/equalize, which DALI deprecates and warns about whatever the
    filters say; a rank built a pipeline with AutoAugment and printed those lines, about DALI's code."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dali_epoch(low_contrast_images(8, seed=0), data_cfg("autoaugment=cifar10"))
    assert not [str(w.message) for w in caught if "fn.experimental" in str(w.message)]


def test_only_dalis_own_deprecations_are_dropped():
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with without_dalis_own_deprecations():
            warnings.warn("WARNING: `nvidia.dali.fn.experimental.equalize` is now deprecated. Use `nvidia.dali.fn."
                          "equalize` instead.", DeprecationWarning)
            warnings.warn("WARNING: `nvidia.dali.fn.experimental.filter` is now deprecated.", DeprecationWarning)
            warnings.warn("WARNING: `nvidia.dali.fn.experimental.equalize` is now deprecated.", UserWarning)
            warnings.warn("WARNING: `nvidia.dali.fn.old_op` is now deprecated.", DeprecationWarning)
            warnings.warn("something else", RuntimeWarning)
    assert [(w.category, str(w.message)) for w in shown] == [
        (UserWarning, "WARNING: `nvidia.dali.fn.experimental.equalize` is now deprecated."),
        (DeprecationWarning, "WARNING: `nvidia.dali.fn.old_op` is now deprecated."),
        (RuntimeWarning, "something else")]
    with warnings.catch_warnings(record=True) as shown, pytest.raises(ValueError):
        warnings.simplefilter("always")
        with without_dalis_own_deprecations():
            warnings.warn("before the error", RuntimeWarning)
            raise ValueError
    assert [str(w.message) for w in shown] == ["before the error"]


def quantiles(x: torch.Tensor) -> torch.Tensor:
    return torch.quantile(x.float(), torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9]))


@pytest.mark.parametrize("sets", [
    ["jitter_brightness=0.4"],
    ["jitter_contrast=0.5"],
    ["jitter_saturation=0.5", "jitter_hue=0.2"],
    ["rotation_degrees=30"],
    ["autoaugment=cifar10"],
    FULL,
], ids=["brightness", "contrast", "saturation+hue", "rotation", "autoaugment", "full"])
def test_dali_and_torch_agree_in_distribution(sets):
    """Per-image statistics (mean, spread, change from the input) have the same quantiles on both paths."""
    agree_in_distribution(sets, CPU)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dali_gpu_pipeline_with_every_augmentation_agrees_with_torch_in_distribution():
    """The GPU graph of every augmentation (crop's slice, AutoAugment's conditionals, the erasing and cutout boxes
    moved to the GPU), against the CPU torch path: what data.pipeline=auto feeds a GPU trial by default."""
    agree_in_distribution(FULL, torch.device("cuda", torch.cuda.current_device()))


def agree_in_distribution(sets: list[str], device: torch.device) -> None:
    n = 1500
    images = low_contrast_images(n, seed=4)
    # Smooth images, so that geometric ops change pixels in proportion to how far they move them.
    images = torch.nn.functional.avg_pool2d(images.permute(0, 3, 1, 2).float(), 5, 1, 2).round().to(torch.uint8)
    images = (images.float() * 3 - 250).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    cfg = data_cfg(*sets, "shuffle=false")
    dali_out = dali_epoch(images, cfg, global_batch=500, device=device)
    assert dali_out.shape == images.shape
    split = Split(images, torch.arange(n) % 10)
    torch_out = torch.cat([to_uint8(x) for x, _ in TrainLoader(split, cfg, 500, 0, 1, seed=0).epoch(0)])
    for stat in (lambda x: x.float().mean((1, 2, 3)), lambda x: x.float().std((1, 2, 3)),
                 lambda x: (x.float() - images.float()).abs().mean((1, 2, 3)),
                 lambda x: A._gray(x.float()).std((1, 2, 3)) / (x.float().std(-1).mean((1, 2)) + 1)):
        qd, qt = quantiles(stat(dali_out)), quantiles(stat(torch_out))
        scale = quantiles(stat(images)).abs().max() + (qt[-1] - qt[0]).abs() + 1
        assert ((qd - qt).abs() / scale).max() < 0.08, f"quantiles differ: dali {qd.tolist()} torch {qt.tolist()}"


def test_same_seed_same_batches_other_seed_other_batches():
    images = low_contrast_images(400)
    cfg = data_cfg(*FULL)
    split = Split(images, torch.arange(400) % 10)

    def two_epochs(seed):
        loader = DaliTrainLoader(split, cfg, 200, 1, 2, seed, CPU, num_threads=1)
        return [dali_epoch(images, cfg, loader=loader, epoch=e) for e in (0, 1)]

    first, again, other = two_epochs(7), two_epochs(7), two_epochs(8)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0]) and not torch.equal(first[0], first[1])


def test_factory_builds_dali_with_the_amp_dtype_and_records_the_pipeline_name():
    split = Split(low_contrast_images(200), torch.arange(200) % 10)
    cfg = data_cfg("pipeline=dali", "mixup_p=0.5")
    loader = create_train_loader(split, cfg, 100, 0, 1, 0, CPU, amp="fp16")
    assert loader.name == "dali-cpu"
    images, targets = next(iter(loader.epoch(0)))
    assert images.dtype == torch.float16 and images.shape == (100, 3, 32, 32)
    assert targets.shape == (100, 10) and targets.is_floating_point()
    assert create_train_loader(split, data_cfg("pipeline=torch"), 100, 0, 1, 0, CPU).name == "torch"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dali_gpu_pipeline_matches_cpu_sharding():
    device = torch.device("cuda", torch.cuda.current_device())
    images = low_contrast_images(400)
    split = Split(images.to(device), (torch.arange(400) % 10).to(device))
    cfg = data_cfg()
    loader = DaliTrainLoader(split, cfg, 100, 1, 2, seed=3, device=device, dtype=torch.float16)
    assert loader.name == "dali-gpu"
    got = torch.cat([to_uint8(x.float().cpu()) for x, _ in loader.epoch(1)])
    indices = TrainLoader(split, cfg, 100, 1, 2, seed=3).epoch_indices(1).cpu()
    # fp16 output: within one grey level of the input after undoing the normalization.
    assert (got.int() - images[indices].int()).abs().max() <= 1
    assert not math.isnan(float(got.float().mean()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_taking_a_dali_gpu_batch_does_not_wait_for_the_gpu():
    """A GPU batch is handed over on torch's stream: with GPU work still queued there, the next batch comes before
    that work is done, and is right once the stream gets to it. (pipe.run() without the stream made DALI's outputs
    host-synchronous, and the copy of each into the loader's buffer then waited on the host for all the work queued
    on torch's stream: a device sync every training step.) Not a timing: the order of the host and the GPU."""
    device = torch.device("cuda", torch.cuda.current_device())
    images = low_contrast_images(400)
    split = Split(images.to(device), (torch.arange(400) % 10).to(device))
    cfg = data_cfg()  # no augmentation: each batch is its images, exactly (fp32)
    loader = DaliTrainLoader(split, cfg, 100, 0, 1, seed=3, device=device)
    batches = loader.epoch(0)
    next(batches)  # the pipeline has run once; the next batches are prefetched
    stream = torch.cuda.current_stream(device)
    torch.cuda.synchronize(device)
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU clock cycles on torch's stream
    x, y = next(batches)
    busy = not stream.query()
    torch.cuda.synchronize(device)
    assert busy, "taking a DALI batch waited for the work queued on torch's stream"
    indices = TrainLoader(split, cfg, 100, 0, 1, seed=3).epoch_indices(0).cpu()[100:200]
    assert torch.equal(to_uint8(x.cpu()), images[indices])
    assert torch.equal(y.cpu(), indices % 10)


def test_building_a_pipeline_leaves_no_generated_sources_in_the_temp_folder(tmp_path):
    """DALI's conditionals (AutoAugment) write the modules they make to the temp folder, once a process, and delete
    them only at a normal exit, which a Ray trial process never has; the loader deletes them once its pipeline is
    built and its source callbacks (erasing, cutout, indices) have run. A fresh process (DALI converts a function
    once a process), its temp folder TMPDIR."""
    import os
    import subprocess
    import sys

    code = """
import os, sys, tempfile, torch
from ray_cifar.data.dali import DaliTrainLoader
from ray_cifar.data.loader import Split
from ray_cifar.validation import load_config
cfg = load_config(None, ["data.autoaugment=cifar10", "data.erasing_p=0.5", "data.cutout_size=8"]).data
images = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8)
loader = DaliTrainLoader(Split(images, torch.arange(40) % 10), cfg, 20, 0, 1, 0, torch.device("cpu"), num_threads=1)
assert len(list(loader.epoch(0))) == 2
converted = [m for m in sys.modules if m.startswith("__autograph_generated_file")]
print(len(converted), sorted(os.listdir(tempfile.gettempdir())))
os._exit(0)  # as a Ray worker ends: no atexit hooks
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    converted, listed = proc.stdout.strip().split(" ", 1)
    assert int(converted) > 0, "DALI converted nothing: the test does not see what it checks"
    assert listed == "[]" and list(tmp_path.iterdir()) == []
