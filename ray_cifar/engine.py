"""The training engine: one train epoch and one evaluation. Imports neither Ray nor DALI.

Metrics are accumulated in device tensors and read once per epoch (after an
all-reduce across DDP ranks when a process group exists), so a step never waits
for the host.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def autocast(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_amp(device: torch.device, amp: str) -> str:
    """The autocast dtype a run uses. auto: bf16 on a GPU, fp32 on CPU, where autocast costs more than it saves (a
    CPU without bf16 units emulates it: training steps 5.9x slower on an AVX2 EPYC; one with AVX-512 was no faster,
    0.94x; benchmarks/README). bf16 on a GPU that has it in hardware (compute capability 8.0 on: A100, L4, H100),
    else fp16: a V100 or T4 only emulates bf16. fp16 is a CUDA-only choice (the grad scaler needs CUDA): bf16 on
    CPU."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "fp32"
    # (torch's default, including_emulation=True, says yes on a V100 or T4 too: it only tries a bf16 tensor there)
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return "fp16"
    if amp == "fp16" and device.type != "cuda":
        return "bf16"
    return amp


# Images per evaluation step where train.eval_batch_size is null. On a GPU a large batch keeps the device busy; on CPU a
# smaller one evaluates faster, its activations staying in cache (10,000 test images on 2 cores, 256 against 1024:
# the tests' tiny ResNet 2.5x, the --smoke-test ResNet 1.9x, ResNet-18 1.1x).
EVAL_BATCH_SIZE = {"cuda": 1024, "cpu": 256}


def resolve_eval_batch_size(device: torch.device, size: int | None) -> int:
    """train.eval_batch_size, or where it is null the device's own (EVAL_BATCH_SIZE)."""
    return size or EVAL_BATCH_SIZE.get(device.type, EVAL_BATCH_SIZE["cuda"])


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def set_fast_paths(device: torch.device) -> None:
    """cuDNN autotuning and TF32 matmuls/convolutions on CUDA (no effect elsewhere).

    CIFAR batches keep one shape, so cudnn.benchmark's one-off search per shape pays back from
    the second step; TF32 only touches fp32 math (bf16/fp16 autocast regions are unaffected): the model's
    fp32 layers, and the few fp32 matmuls of the torch augmentations (colour jitter's colour matrix, the
    rotation/shear grid), which then differ from the CPU's by a grey level or a few hundredths of a pixel.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def cap_gpu_memory(device: torch.device, fraction: float) -> str | None:
    """On a CUDA device, with `fraction` < 1 (train.gpus_per_worker): cap this process's PyTorch allocations
    on it to that fraction of its memory; returns what was done, in words (None: nothing to do).

    Call it once, before the process allocates on the device. Trials packed on one GPU then cannot take
    each other's memory: one that outgrows its share gets an out-of-memory error of its own. The cap is
    PyTorch's caching allocator's only: the CUDA context (some hundreds of MiB a process) and DALI's
    buffers come on top of it."""
    if device.type != "cuda" or fraction >= 1:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(float(fraction), index)
    total = torch.cuda.get_device_properties(index).total_memory
    return f"{fraction:g} of GPU {index}, memory capped to {fraction * total / 2**30:.1f} of {total / 2**30:.1f} GiB"


def prepare_model(model: nn.Module, device: torch.device, compile: bool = False) -> nn.Module:
    """Turn on the device's fast paths; with `compile`, return torch.compile(model) (shares its parameters).

    Save/load state from the returned module's `_orig_mod` (or keep the bare model around): a
    compiled module's state_dict keys carry an `_orig_mod.` prefix.
    """
    set_fast_paths(device)
    return torch.compile(model) if compile else model


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    device: torch.device,
    amp: str = "bf16",
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """One optimizer step; returns (loss * n, correct, n) as a float64 device tensor, never read here.

    No host sync under bf16/fp32 (the fp16 GradScaler reads its inf check on the host by design).
    """
    with autocast(device, amp):
        logits = model(images)
        loss = loss_fn(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    scheduler.step()
    n = labels.shape[0]
    # Mixup/cutmix give probability targets: accuracy against the dominant class.
    hard = labels.argmax(1) if labels.is_floating_point() else labels
    correct = (logits.argmax(1) == hard).sum().double()
    # The count enters as a Python scalar (a kernel argument), not torch.tensor(n, device=...): a host copy.
    return torch.stack([loss.detach().double() * n, correct, torch.zeros_like(correct) + n])


def train_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    device: torch.device,
    amp: str = "bf16",
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """One pass over `batches`; returns train_loss, train_acc and images over all ranks.

    Targets are class indices (int64 N) or probabilities (float N x classes, from mixup/cutmix).
    """
    model.train()
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss * n, correct, n
    for images, labels in batches:
        sums += train_step(model, images, labels, optimizer, scheduler, loss_fn, device, amp, scaler)
    loss_sum, correct, count = _all_reduce_sum(sums).tolist()
    return {"train_loss": loss_sum / max(count, 1), "train_acc": correct / max(count, 1), "train_images": int(count)}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
             amp: str = "bf16", prefix: str = "val") -> dict[str, float]:
    """Mean cross-entropy and accuracy over `batches`, summed over all ranks."""
    model.eval()
    sums = torch.zeros(3, device=device, dtype=torch.float64)
    for images, labels in batches:
        with autocast(device, amp):
            logits = model(images)
        loss = nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        correct = (logits.argmax(1) == labels).sum().double()
        sums += torch.stack([loss.double(), correct, torch.zeros_like(correct) + labels.shape[0]])
    loss_sum, correct, count = _all_reduce_sum(sums).tolist()
    return {f"{prefix}_loss": loss_sum / max(count, 1), f"{prefix}_acc": correct / max(count, 1)}
