"""benchmarks/train_throughput.py (the GPU check's train_step part): the plain PyTorch baseline steps under
PyTorch's default backend flags, each ray_cifar variant under ray_cifar's. The flags are CUDA's, but setting
them needs no GPU: nothing runs on the device here."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import train_throughput  # noqa: E402

FLAGS = [(torch.backends.cudnn, "benchmark"), (torch.backends.cuda.matmul, "allow_tf32"),
         (torch.backends.cudnn, "allow_tf32")]


@pytest.fixture
def flags_restored():
    saved = [getattr(owner, name) for owner, name in FLAGS]
    yield
    for (owner, name), value in zip(FLAGS, saved):
        setattr(owner, name, value)


def flags() -> tuple[bool, bool, bool]:
    return tuple(bool(getattr(owner, name)) for owner, name in FLAGS)


def test_each_variant_steps_under_its_own_backend_flags(flags_restored):
    cuda = torch.device("cuda")
    ray_cifar_step = train_throughput.RayCifarStep.__new__(train_throughput.RayCifarStep)  # its flags, not its model
    plain = train_throughput.PlainPyTorch.__new__(train_throughput.PlainPyTorch)
    for _ in range(2):  # round-robin, as measure_all runs them
        train_throughput.backend_flags(ray_cifar_step, cuda)
        assert flags() == (True, True, True)  # engine.set_fast_paths: cuDNN autotuning, TF32
        train_throughput.backend_flags(plain, cuda)
        assert flags() == (False, False, True)  # PyTorch's defaults


def test_the_cpu_has_no_flags_to_set(flags_restored):
    before = flags()
    train_throughput.backend_flags(train_throughput.RayCifarStep.__new__(train_throughput.RayCifarStep),
                                   torch.device("cpu"))
    assert flags() == before


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                          ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835),
                                          ("NVIDIA GeForce GTX 1080", None)])
def test_the_datasheet_peak_is_the_cards_own(name, tflops):
    # An NVL or PCIe card named like the SXM one must not get the SXM's peak (its data-sheet MFU would read low).
    peak = train_throughput.peak_flops(name)
    assert (peak and round(peak / 1e12)) == tflops
