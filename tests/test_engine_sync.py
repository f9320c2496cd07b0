"""The step's fast paths: same numbers as a plain PyTorch step on CPU, and no host sync per step on CUDA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import TINY_MODEL, synthetic_cifar
from ray_cifar import checkpoint, engine
from ray_cifar.data.augment import BatchMixer, create_augment
from ray_cifar.data.loader import to_model_input
from ray_cifar.loop import build_model
from ray_cifar.optim import create_optimizer, create_scheduler
from ray_cifar.validation import load_config

# Every augmentation of the torch path, and mixup/cutmix on top.
AUGMENTED = ["data.crop_padding=4", "data.flip_p=0.5", "data.autoaugment=cifar10", "data.erasing_p=0.5",
             "data.cutout_size=8", "data.cutout_p=0.5", "data.mixup_p=0.3", "data.cutmix_p=0.3"]


def mixer_branches(cfg, steps: int, seed: int = 0) -> list[str]:
    """Which branch BatchMixer(seed) takes at each of its first `steps` batches: its draws, replayed on the CPU."""
    mixer, branches = BatchMixer(cfg.data, cfg.model.num_classes, seed=seed), []
    for _ in range(steps):
        state = mixer.rng.bit_generator.state
        u = mixer.rng.random()
        mixer.rng.bit_generator.state = state
        branches.append("mixup" if u < cfg.data.mixup_p else
                        "cutmix" if u < cfg.data.mixup_p + cfg.data.cutmix_p else "neither")
        mixer(torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))
    return branches


def test_the_sync_tests_checked_steps_mix_up_cut_mix_and_neither():
    # The GPU test below checks steps 1-7 for host syncs: each of the mixer's three branches must be among them.
    # (With mixup_p = cutmix_p = 0.5 'neither' never came: only mixed batches were checked.)
    cfg = load_config(None, TINY_MODEL + AUGMENTED)
    assert set(mixer_branches(cfg, 8)[1:]) == {"mixup", "cutmix", "neither"}


def setup(device: torch.device, amp: str, overrides=()):
    cfg = load_config(None, TINY_MODEL + [f"train.amp={amp}", "optim.lr=0.05", *overrides])
    model = build_model(cfg, device)
    optimizer = create_optimizer(model, cfg.optim)
    scheduler = create_scheduler(optimizer, cfg.schedule, cfg.optim.lr, 4, 8)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    return cfg, model, optimizer, scheduler, loss_fn


def fixed_batches(device, steps=3, n=32):
    data = synthetic_cifar(steps * n, 10)
    images = torch.from_numpy(data.train_images).to(device)
    labels = torch.from_numpy(data.train_labels).long().to(device)
    return [(to_model_input(images[i * n:(i + 1) * n]), labels[i * n:(i + 1) * n]) for i in range(steps)]


def steps_without_host_syncs(step, steps: int) -> torch.Tensor:
    """step(0) .. step(steps - 1) on CUDA, summed: the first unchecked (a compile, cuDNN's tuning, constants
    cached: one host copy each), the rest under sync-debug 'error', where any host sync raises."""
    sums = torch.zeros(3, device="cuda", dtype=torch.float64)
    sums += step(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(1, steps):
            sums += step(i)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sums


@pytest.mark.parametrize("amp", ["bf16", "fp32"])
def test_train_epoch_matches_a_plain_pytorch_loop(amp):
    device = torch.device("cpu")
    batches = fixed_batches(device)
    _, model, optimizer, scheduler, loss_fn = setup(device, amp)
    metrics = engine.train_epoch(model, batches, optimizer, scheduler, loss_fn, device, amp)

    _, ref_model, ref_opt, ref_sched, ref_loss_fn = setup(device, amp)
    losses, correct = [], 0
    for images, labels in batches:  # the textbook step, read on the host every step
        with engine.autocast(device, amp):
            logits = ref_model(images)
            loss = ref_loss_fn(logits, labels)
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
        ref_sched.step()
        losses.append(loss.item() * len(labels))
        correct += (logits.argmax(1) == labels).sum().item()
    count = sum(len(labels) for _, labels in batches)
    assert metrics["train_images"] == count
    assert metrics["train_loss"] == pytest.approx(sum(losses) / count, rel=1e-6)
    assert metrics["train_acc"] == correct / count
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


def test_prepare_model_compiles_only_when_asked():
    model = nn.Linear(4, 2)
    assert engine.prepare_model(model, torch.device("cpu"), compile=False) is model
    compiled = engine.prepare_model(model, torch.device("cpu"), compile=True)
    assert compiled is not model and compiled._orig_mod is model


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_augmented_training_steps_do_not_sync_with_the_host():
    device = torch.device("cuda")
    cfg, model, optimizer, scheduler, loss_fn = setup(device, "bf16", AUGMENTED)
    model = engine.prepare_model(model, device)
    data = synthetic_cifar(256, 10)
    images = torch.from_numpy(data.train_images).to(device)
    labels = torch.from_numpy(data.train_labels).long().to(device)
    augment, mixer = create_augment(cfg.data), BatchMixer(cfg.data, cfg.model.num_classes, seed=0)
    generator = torch.Generator(device=device)
    generator.manual_seed(0)

    def step(i):
        batch = slice(32 * i, 32 * (i + 1))
        x, y = mixer(to_model_input(augment(images[batch], generator)), labels[batch])
        return engine.train_step(model, x, y, optimizer, scheduler, loss_fn, device, "bf16")

    sums = steps_without_host_syncs(step, 8)  # steps 1-7: mixup, cutmix and neither all among them (test above)
    assert sums[2].item() == 8 * 32
    assert torch.isfinite(sums).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_asgd_on_cuda_resumes_a_cpu_state_and_steps_without_host_syncs():
    """optim.name=asgd: not capturable, torch read each parameter's step count back to the host every step; and
    a state saved where the optimizer was not capturable (a CPU run) keeps its step counts on the CPU, which the
    capturable one on CUDA must still resume from."""
    cpu, device = torch.device("cpu"), torch.device("cuda")
    _, cpu_model, cpu_opt, cpu_sched, cpu_loss = setup(cpu, "fp32", ["optim.name=asgd"])
    for images, labels in fixed_batches(cpu, steps=2):
        engine.train_step(cpu_model, images, labels, cpu_opt, cpu_sched, cpu_loss, cpu, "fp32")
    state = {"epoch": 1, "model": cpu_model.state_dict(), "optimizer": cpu_opt.state_dict(),
             "scheduler": cpu_sched.state_dict()}

    _, model, optimizer, scheduler, loss_fn = setup(device, "bf16", ["optim.name=asgd"])
    assert all(group["capturable"] for group in optimizer.param_groups)
    checkpoint.restore(state, model, optimizer, scheduler, None)
    assert all(s["step"].device.type == "cuda" and s["step"].item() == 2 for s in optimizer.state.values())
    batches = fixed_batches(device, steps=4)
    sums = steps_without_host_syncs(
        lambda i: engine.train_step(model, *batches[i], optimizer, scheduler, loss_fn, device, "bf16"), 4)
    assert sums[2].item() == 4 * 32 and torch.isfinite(sums).all()
    assert all(s["step"].item() == 6 for s in optimizer.state.values())


# Last in the file, and the file last in the GPU check's cuda_tests: its cold Inductor compile takes longest.
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_compiled_model_trains_on_cuda_like_the_eager_one():
    """train.compile on CUDA: Inductor's kernels give the eager model's logits (bf16 tolerance), and its
    steps stay free of host syncs after the compile."""
    device = torch.device("cuda")
    _, model, optimizer, scheduler, loss_fn = setup(device, "bf16")
    _, eager, _, _, _ = setup(device, "bf16")  # the same seeded initial weights
    compiled = engine.prepare_model(model, device, compile=True)
    batches = fixed_batches(device, steps=6)
    with engine.autocast(device, "bf16"):
        assert torch.allclose(compiled(batches[0][0]).float(), eager(batches[0][0]).float(), atol=0.05, rtol=0.05)
    sums = steps_without_host_syncs(  # (the first step compiles)
        lambda i: engine.train_step(compiled, *batches[i], optimizer, scheduler, loss_fn, device, "bf16"), 6)
    assert sums[2].item() == 6 * 32 and torch.isfinite(sums).all()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), eager.parameters()))  # it trained
