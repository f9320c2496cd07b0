"""The engine alone (no Ray, no DALI): learning, AMP + channels_last, metrics, the GPU path when there is one."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_MODEL, synthetic_cifar
from ray_cifar import engine
from ray_cifar.validation import load_config
from ray_cifar.data.loader import TrainLoader, make_splits, to_model_input
from ray_cifar.models import count_parameters, create_model
from ray_cifar.loop import build_model, run_training
from ray_cifar.data.pipelines import train_loader_for


def test_resnet18_has_the_published_parameter_count():
    assert count_parameters(create_model("resnet18")) == 11_173_962


def test_model_input_is_channels_last_and_normalized():
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    x = to_model_input(images)
    assert x.shape == (4, 3, 32, 32)
    assert x.is_contiguous(memory_format=torch.channels_last)  # the NHWC buffer viewed as NCHW, no copy
    assert torch.allclose(x[1, 2, 5, 7], (images[1, 5, 7, 2].float() / 255 - 0.4465) / 0.2616, atol=1e-5)


def learn_synthetic_classes(device: torch.device, amp: str | None) -> tuple[list[dict], object]:
    """Three epochs of the tiny ResNet on synthetic classes: (each epoch's metrics, the splits). The CPU test runs
    the recipe the GPU test runs, so the bar below is proven where the GPU test cannot run: over 20 sampler seeds on
    CPU (fp32 and bf16 alike) the last epoch's val_acc was 0.6-0.8; two epochs ended at 0.4-0.5, at the bar."""
    cfg = load_config(None, TINY_MODEL + ["train.epochs=3", "train.global_batch_size=100", "data.val_size=100",
                                          "optim.lr=0.05"] + ([f"train.amp={amp}"] if amp else []))
    splits = make_splits(synthetic_cifar(1000, 100), cfg.data, device)
    history = []
    run_training(cfg, train_loader_for(cfg, splits.train, device), splits.val, device,
                 on_epoch=lambda m, model: history.append(m), log=None)
    assert [m["epoch"] for m in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_acc"] > 0.5
    assert history[0]["train_images"] == len(splits.train) // 100 * 100  # last partial batch dropped
    return history, splits


@pytest.mark.parametrize("amp", ["bf16", None])  # None: the default, auto (fp32 on CPU, asserted below)
def test_a_few_epochs_learn_the_synthetic_classes(amp):
    history, _ = learn_synthetic_classes(torch.device("cpu"), amp)
    assert history[0]["amp"] == (amp or "fp32")  # auto is fp32 on CPU; an explicit bf16 is kept


def test_auto_amp_is_bf16_on_a_gpu_and_fp32_on_cpu():
    assert load_config(None, []).train.amp == "auto"
    assert engine.resolve_amp(torch.device("cpu"), "auto") == "fp32"
    assert engine.resolve_amp(torch.device("cpu"), "bf16") == "bf16"  # asked for: kept (CPU autocast works)
    assert engine.resolve_amp(torch.device("cpu"), "fp16") == "bf16"  # the grad scaler needs CUDA
    if torch.cuda.is_available():
        bf16 = torch.cuda.get_device_capability()[0] >= 8
        assert engine.resolve_amp(torch.device("cuda"), "auto") == ("bf16" if bf16 else "fp16")


def test_the_eval_batch_is_the_devices_unless_set():
    # null by default: 1024 images a step on a GPU, 256 on CPU, where a smaller batch evaluates faster
    assert load_config(None, []).train.eval_batch_size is None
    assert engine.resolve_eval_batch_size(torch.device("cpu"), None) == 256
    assert engine.resolve_eval_batch_size(torch.device("cuda"), None) == 1024
    assert engine.resolve_eval_batch_size(torch.device("cpu"), 1000) == 1000  # set: kept on either
    assert engine.resolve_eval_batch_size(torch.device("cuda"), 100) == 100


@pytest.mark.parametrize("gpu, native_bf16", [("V100 or T4 (bf16 emulated)", False), ("A100 or H100", True)])
def test_bf16_only_where_the_gpu_has_it_in_hardware(monkeypatch, gpu, native_bf16):
    # torch's answers on such a GPU: is_bf16_supported() is True on both (by default it counts emulation, a V100
    # or T4 makes a bf16 tensor), with including_emulation=False only where bf16 is native (capability 8.0 on).
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or native_bf16)
    expected = "bf16" if native_bf16 else "fp16"
    assert engine.resolve_amp(torch.device("cuda"), "auto") == expected, gpu
    assert engine.resolve_amp(torch.device("cuda"), "bf16") == expected, gpu
    assert engine.resolve_amp(torch.device("cuda"), "fp16") == "fp16"


def test_evaluate_counts_every_image_once():
    cfg = load_config(None, TINY_MODEL)
    model = build_model(cfg, torch.device("cpu"))
    splits = make_splits(synthetic_cifar(200, 37), cfg.data.__class__(val_size=0), "cpu")
    from ray_cifar.data.loader import eval_batches

    m = engine.evaluate(model, eval_batches(splits.test, 10, 0, 1), torch.device("cpu"))
    # Accuracy is a count over 37 images: a multiple of 1/37.
    assert abs(m["val_acc"] * 37 - round(m["val_acc"] * 37)) < 1e-9


def test_loader_steps_and_shapes():
    cfg = load_config(None, TINY_MODEL)
    splits = make_splits(synthetic_cifar(300, 10), cfg.data.__class__(val_size=0), "cpu")
    loader = TrainLoader(splits.train, cfg.data, global_batch_size=64, rank=1, world_size=2, seed=0)
    batches = list(loader.epoch(0))
    assert len(batches) == len(loader) == 300 // 64
    assert all(x.shape == (32, 3, 32, 32) and y.shape == (32,) for x, y in batches)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_gpu_amp_channels_last_training(amp):
    history, splits = learn_synthetic_classes(torch.device("cuda"), amp)
    assert splits.train.images.is_cuda  # the whole uint8 dataset lives on the GPU
    assert history[-1]["amp"] == amp and history[-1]["device"] == "cuda"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_rank_with_half_a_gpu_cannot_allocate_more_than_half():
    device = torch.device("cuda", 0)
    total = torch.cuda.get_device_properties(0).total_memory
    try:
        message = engine.cap_gpu_memory(device, 0.5)
        assert message.startswith("0.5 of GPU 0, memory capped to ")
        assert torch.cuda.get_per_process_memory_fraction(device) == pytest.approx(0.5)
        with pytest.raises(torch.cuda.OutOfMemoryError):  # refused by the allocator's cap, never allocated
            torch.empty(int(0.6 * total), dtype=torch.uint8, device=device)
        torch.empty(2**30, dtype=torch.uint8, device=device)  # well within the share
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)  # the rest of the session gets the whole GPU


def test_train_compile_compiles_the_training_step_once_and_evaluates_eagerly(monkeypatch):
    # A compiled model evaluated in eval mode under no_grad compiles a second graph (Dynamo guards on both), and a
    # third for a last, smaller batch: tens of seconds on a GPU, once per trial, more than the eager evaluations of
    # a short trial (ASHA stops most after an epoch or two) cost. Counted with an eager backend: no Inductor here.
    from torch._dynamo.testing import CompileCounter

    counter, real_compile = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=counter))
    torch._dynamo.reset()
    cfg = load_config(None, TINY_MODEL + ["train.epochs=2", "train.global_batch_size=100", "data.val_size=150",
                                          "train.eval_batch_size=100", "train.compile=true"])
    splits = make_splits(synthetic_cifar(400, 100), cfg.data, torch.device("cpu"))
    history = []
    try:
        run_training(cfg, train_loader_for(cfg, splits.train, torch.device("cpu")), splits.val, torch.device("cpu"),
                     on_epoch=lambda m, model: history.append(m), log=None)
    finally:
        torch._dynamo.reset()
    assert [m["epoch"] for m in history] == [1, 2] and all(0 <= m["val_acc"] <= 1 for m in history)
    assert counter.frame_count == 1, f"{counter.frame_count} graphs compiled"  # the training step's, in train mode
