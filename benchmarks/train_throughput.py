"""Images/second of the training step, ray_cifar's step against a plain PyTorch loop, in one run.

    python benchmarks/train_throughput.py --data ../shared/data/cifar10 --device cpu    # small ResNet, minutes
    python benchmarks/train_throughput.py --data DIR --device cuda --model resnet18     # + MFU against the peak

Variants, all on the same model, data, batch size and augmentation (crop pad 4 + flip p 0.5):
- plain-pytorch-fp32: the textbook loop: a torchvision DataLoader (per-sample PIL transforms, one
  worker per core), fp32 NCHW, `loss.item()` every step, PyTorch's default backend flags (no cuDNN
  autotuning, no TF32 matmuls). The baseline of every ratio.
- ray_cifar-fp32-nchw: ray_cifar's batch-tensor loader on the device and `engine.train_step`, fp32,
  contiguous NCHW model and input.
- ray_cifar-bf16-channels_last: the same with bf16 autocast and channels_last (ray_cifar's default on a GPU;
  train.amp auto is fp32 on CPU: this row says what bf16 would cost there).
- ray_cifar-bf16-channels_last-compile: the same after `engine.prepare_model(compile=True)`.

Each figure is images trained per second over --steps steps after --warmup steps; the variants are
measured round-robin --repeats times (so a burst of load from other jobs hits all of them) and the
median is kept. On cuda, MFU = images/s x FLOPs per image (forward + backward, counted by
torch.utils.flop_counter) / the device's bf16 peak: `mfu` against the data-sheet dense peak (table
below), `mfu_of_measured_peak` against the bf16 matmul rate measured on this device in the same run.
Writes results/train_throughput_<device>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from data_pipeline import device_name, endless, write_json  # noqa: E402
from ray_cifar import engine  # noqa: E402
from ray_cifar.data.augment import MEAN, STD  # noqa: E402
from ray_cifar.validation import load_config  # noqa: E402
from ray_cifar.data.loader import Split, TrainLoader  # noqa: E402
from ray_cifar.models import create_model_from_config  # noqa: E402

AUGMENT = ["data.crop_padding=4", "data.flip_p=0.5"]
MODELS = {  # --model presets (ray_cifar model config overrides)
    "small": ["model.name=resnet", "model.blocks=[1,1]", "model.widths=[8,16]", "model.stem_width=8"],  # the tests' tiny ResNet
    "resnet18": ["model.name=resnet18"],
}
# Dense (no sparsity) bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name: the first key
# found in the name wins, so a card's variants ("NVIDIA H100 NVL", "NVIDIA H100 PCIe") come before its SXM name.
PEAK_BF16_FLOPS = {"H200 NVL": 835e12, "H200": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
                   "A100": 312e12, "L4": 121e12, "A10G": 70e12, "RTX 4090": 165e12}


def peak_flops(name: str) -> float | None:
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def measured_matmul_flops(device: torch.device, size: int = 8192, iters: int = 20) -> float:
    """The device's bf16 matmul rate as measured here (FLOP/s): the best of three timed runs of `iters`
    square size x size products, after a warm-up; the "peak" MFU is measured against on this device."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    best = 0.0
    for attempt in range(4):  # the first is the warm-up (cuBLAS picks its kernel)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            c = a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        else:
            float(c[0, 0])
        if attempt:
            best = max(best, 2 * size**3 * iters / (time.perf_counter() - start))
    return best


def load_images(data: str | None, n: int) -> tuple[np.ndarray, np.ndarray, str]:
    if data:
        from ray_cifar.data.source import load_cifar10

        dataset = load_cifar10(data, None, log=lambda m: None)
        # Copies: the data cache is a read-only memory map, which torch warns of. The source without its folder:
        # results files name no machine path.
        return (np.array(dataset.train_images[:n]), np.array(dataset.train_labels[:n]),
                dataset.source.split(":")[0] + ":DIR")
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n), "random uint8"


def train_flops_per_image(model_overrides: list[str], batch: int = 32) -> float:
    """Forward + backward FLOPs of one image (matmul/conv FLOPs, as torch.utils.flop_counter counts them), counted
    on the meta device: the same count as on any device, with no kernel run (on a GPU, ResNet-18's on a new batch
    size would autotune cuDNN again, in the seconds left for measuring) and 0.16 s instead of 1.4 on a CPU."""
    from torch.utils.flop_counter import FlopCounterMode

    model = create_model_from_config(load_config(None, model_overrides).model).to("meta")
    x = torch.randn(batch, 3, 32, 32, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / batch


class PlainPyTorch:
    """The baseline: torchvision DataLoader into an fp32 loop that reads the loss every step."""

    def __init__(self, model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int,
                 device: torch.device, lr: float):
        import torchvision.transforms as T
        from PIL import Image

        transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                               T.Normalize(MEAN, STD)])

        class Cifar(torch.utils.data.Dataset):
            def __len__(self):
                return len(images)

            def __getitem__(self, i):
                return transform(Image.fromarray(images[i])), int(labels[i])

        workers = os.cpu_count() or 1
        loader = self.loader = torch.utils.data.DataLoader(Cifar(), batch_size=batch_size, shuffle=True,
                                                           drop_last=True, num_workers=workers,
                                                           persistent_workers=True, pin_memory=device.type == "cuda")
        self.batches = endless(lambda epoch: loader)  # not `self.loader`: no cycle through this runner (see close)
        self.model, self.device = model, device
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        self.loss_fn = nn.CrossEntropyLoss()
        self.losses = []

    def step(self) -> int:
        x, y = next(self.batches)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        loss = self.loss_fn(self.model(x), y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.losses.append(loss.item())  # what such loops log; it is also their per-step host sync
        return x.shape[0]

    def close(self) -> None:
        """End the DataLoader's workers now: the batch generator first (it holds the loader's iterator), then the
        last reference to the loader, whose shutdown tells each worker to stop. Left to the garbage collector (a
        runner and a generator that referred to each other), the workers' queues were closed before that shutdown
        could use them, and it waited out DataLoader's 5 s join timeout on each worker in turn (measured: 10 s with
        2 workers, 30 s with 6; so 80 s with the GPU machine's 16, most of train_step's estimate)."""
        if self.batches is not None:  # (closing twice is a no-op: a failed warm-up's runner is closed at once)
            self.batches.close()
        self.batches = self.loader = None

    def drain(self) -> None:
        """Take, untimed, what the workers made while the other variants stepped: up to prefetch_factor batches a
        worker (32 with 16 workers), most of a 50-step measurement, which would time the loader above its steady
        rate. After, every worker is busy and nothing is queued, as in a long loop that the loader bounds."""
        for _ in range(self.loader.num_workers * (self.loader.prefetch_factor or 0)):
            next(self.batches)


class RayCifarStep:
    """ray_cifar's loader (batch tensors on the device) and engine.train_step."""

    def __init__(self, model: nn.Module, split: Split, cfg, batch_size: int, device: torch.device, amp: str,
                 channels_last: bool, compile: bool, compile_backend: str | None = None):
        from ray_cifar.optim import create_optimizer, create_scheduler

        model_in = model.to(memory_format=torch.channels_last) if channels_last else model
        if compile and compile_backend:  # another torch.compile backend than Inductor (gpu_check's dry run)
            self.model = torch.compile(engine.prepare_model(model_in, device), backend=compile_backend)
        else:
            self.model = engine.prepare_model(model_in, device, compile)
        self.batches = endless(TrainLoader(split, cfg.data, batch_size, 0, 1, seed=0).epoch)
        self.optimizer = create_optimizer(model, cfg.optim)
        self.scheduler = create_scheduler(self.optimizer, cfg.schedule, cfg.optim.lr, 10**6, 10**7)
        self.loss_fn = nn.CrossEntropyLoss()
        self.device, self.amp, self.channels_last = device, amp, channels_last
        self.sums = torch.zeros(3, device=device, dtype=torch.float64)

    def step(self) -> int:
        x, y = next(self.batches)
        if not self.channels_last:
            x = x.contiguous()
        self.sums += engine.train_step(self.model, x, y, self.optimizer, self.scheduler, self.loss_fn, self.device,
                                       self.amp)
        return x.shape[0]


def sync(device: torch.device, runner) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif isinstance(runner, RayCifarStep):
        runner.sums.tolist()


def backend_flags(runner, device: torch.device) -> None:
    """The process-wide cuDNN and TF32 flags for the variant about to step: ray_cifar's for its variants
    (engine.set_fast_paths: cuDNN autotuning, TF32 matmuls), PyTorch's defaults for the plain loop. Building a
    ray_cifar variant sets them for the whole process, so the baseline would otherwise run with them too (and
    every "x plain PyTorch" ratio come out low). A compiled variant always steps under the flags it compiled
    with, so its guards hold and it never recompiles."""
    if device.type != "cuda":
        return
    if isinstance(runner, RayCifarStep):
        engine.set_fast_paths(device)
    else:
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True


def measure(runner, steps: int, device: torch.device) -> float:
    backend_flags(runner, device)
    if isinstance(runner, PlainPyTorch):
        runner.drain()
    sync(device, runner)
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        images += runner.step()
    sync(device, runner)
    return images / (time.perf_counter() - start)


def add_step_arguments(parser: argparse.ArgumentParser, batch_help: str) -> None:
    """The arguments of a training-step benchmark (this one and ddp_scaling.py), defaults by device."""
    parser.add_argument("--data", default=os.environ.get("RAY_CIFAR_DATA"),
                        help="CIFAR-10 folder (train/test.parquet); random uint8 images when absent")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", choices=sorted(MODELS), default=None, help="default: small on cpu, resnet18 on cuda")
    parser.add_argument("--batch-size", type=int, default=None, help=f"{batch_help} (default 64 cpu, 512 cuda)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 10 cpu, 100 cuda)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 cpu, 20 cuda)")
    parser.add_argument("--images", type=int, default=10000, help="train images used (the first N)")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))


def resolve_step_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Refuse cuda without a GPU; fill the device-dependent defaults of add_step_arguments."""
    on_gpu = args.device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    args.model = args.model or ("resnet18" if on_gpu else "small")
    args.batch_size = args.batch_size or (512 if on_gpu else 64)
    args.steps, args.warmup = args.steps or (100 if on_gpu else 10), args.warmup or (20 if on_gpu else 3)
    return args


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(parser, "images per step")
    parser.add_argument("--repeats", type=int, default=3, help="round-robin measurements per variant (median kept)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    return resolve_step_arguments(parser, parser.parse_args(argv))


def make_runners(args: argparse.Namespace, cfg, device: torch.device) -> tuple[dict, str, int]:
    """The variants, each on a freshly seeded copy of one model: (runners, data source, images)."""
    images_np, labels_np, source = load_images(args.data, args.images)
    split = Split(torch.from_numpy(images_np).to(device), torch.from_numpy(labels_np.astype(np.int64)).to(device))

    def new_model():
        torch.manual_seed(0)
        return create_model_from_config(cfg.model).to(device)

    bf16 = engine.resolve_amp(device, "bf16")
    runners = {"plain-pytorch-fp32": PlainPyTorch(new_model(), images_np, labels_np, args.batch_size, device,
                                                  cfg.optim.lr),
               "ray_cifar-fp32-nchw": RayCifarStep(new_model(), split, cfg, args.batch_size, device, "fp32", False,
                                                   False),
               "ray_cifar-bf16-channels_last": RayCifarStep(new_model(), split, cfg, args.batch_size, device, bf16,
                                                            True, False)}
    if not args.no_compile:
        runners["ray_cifar-bf16-channels_last-compile"] = RayCifarStep(
            new_model(), split, cfg, args.batch_size, device, bf16, True, True, getattr(args, "compile_backend", None))
    return runners, source, len(images_np)


class DeadlinePassed(BaseException):
    """Raised in the main thread when a warm-up's deadline passes. A BaseException, as KeyboardInterrupt is, so
    torch.compile passes it through instead of wrapping it as a compiler error."""


# A deadline that finds torch where an exception must not go through it (below) waits for a moment where it may, up
# to this long past the deadline (a compile's longest such stretch, measured on the CPU: 1.9 s), then is raised anyway.
UNSAFE_WAIT_S = 30.0
UNSAFE_RETRY_S = 0.02
# Raised where Python drops it (a callback of torch's C++ that it cannot see: "Exception ignored in ..."), the
# deadline comes again this much later; where it went through, the block's end turns the timer off first.
RAISE_AGAIN_S = 1.0


# Python that torch's C++ calls back into, for an operator (its dispatch rules, decompositions, Python kernels,
# fake and proxy tensors): an exception raised there goes through C++ that may not pass it on.
_CALLED_FROM_CPP = tuple(os.sep + os.path.join("torch", *p.split("/")) for p in (
    "_library/", "_ops.py", "_subclasses/", "utils/_python_dispatch.py", "_decomp/", "_refs/", "_prims/",
    "_prims_common/", "_higher_order_ops/", "fx/experimental/proxy_tensor.py", "_meta_registrations.py"))


def torch_would_break(frame) -> bool:
    """Whether an exception raised at `frame` could go through torch's C++ and break it: a Python dispatch mode
    active (FakeTensorMode, make_fx's proxy mode: all of AOTAutograd's trace), or a frame on the stack that torch's
    C++ calls back into (_CALLED_FROM_CPP; __torch_dispatch__, __torch_function__; a weakref callback, __del__).
    Raised there, a deadline was swallowed as "Exception ignored in ... WeakValueDictionary ... remove" and left a
    mode set twice or a FakeTensorMode on, or went through C++ that cannot pass it on: the process aborted
    ("terminate called after throwing an instance of 'c10::Error'" or "'pybind11::error_already_set'": 2 of 660
    aot_eager compiles cut at random moments, and 1 more failed on a FakeTensorMode left on), the GPU check's stage
    and every part after this one with it."""
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

        keys = torch._C._TorchDispatchModeKey
        if _get_current_dispatch_mode_stack() or any(torch._C._get_dispatch_mode(k) is not None
                                                     for k in (keys.FAKE, keys.PROXY, keys.FUNCTIONAL)):
            return True
    except (AttributeError, ImportError):  # a torch without these (private) calls: the stack alone says
        pass
    while frame is not None:
        code = frame.f_code
        if (code.co_name in ("__del__", "__torch_dispatch__", "__torch_function__")
                or code.co_filename.endswith("weakref.py") or any(p in code.co_filename for p in _CALLED_FROM_CPP)):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def interrupt_at(deadline: float | None):
    """Raise DeadlinePassed in the block once time.monotonic() reaches `deadline` (SIGALRM; main thread only,
    elsewhere no deadline); DeadlinePassed("its deadline had passed") before the block where it already has.
    torch.compile runs in the caller's thread and has no timeout of its own: this is what stops a compile that would
    take a part's whole cap. An outer timer (pytest-timeout's) keeps its own time."""
    if deadline is None:
        yield
        return
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlinePassed("its deadline had passed")
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outer_handler, outer_fired = signal.getsignal(signal.SIGALRM), False

    def on_alarm(signum, frame):
        nonlocal outer_fired
        now = time.monotonic()
        if now >= deadline - 0.01:  # (a timer may fire a hair before the clock reads it)
            if torch_would_break(frame) and now < deadline + UNSAFE_WAIT_S:
                signal.setitimer(signal.ITIMER_REAL, UNSAFE_RETRY_S)  # a moment later, where it may be raised
                return
            signal.setitimer(signal.ITIMER_REAL, RAISE_AGAIN_S)
            raise DeadlinePassed()
        outer_fired = True  # the outer timer's time came first: its handler, once, then ours again
        if callable(outer_handler):
            outer_handler(signum, frame)
        signal.setitimer(signal.ITIMER_REAL, max(deadline - time.monotonic(), 1e-3))

    outer_left, _ = signal.getitimer(signal.ITIMER_REAL)
    start = time.monotonic()
    try:  # (the handler and the timer inside it: an alarm due at once still ends in the restore below)
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, min(left, outer_left) if outer_left else left)
        yield
    finally:
        while True:  # an alarm that comes due as the block ends is raised here: the block is over, restore anyway
            try:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, outer_handler)
                if outer_left and not outer_fired:  # what was left of it, at least a moment
                    signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - start), 1e-3))
                break
            except DeadlinePassed:
                continue


def warm_up(runners: dict, steps: int, device: torch.device,
            deadline: float | None = None) -> tuple[dict, dict, dict]:
    """(seconds per variant, variants that failed, variants cut at `deadline`): workers start, cuDNN tunes,
    torch.compile compiles. A variant that fails or is cut is closed and leaves `runners`; the rest are measured.
    A warm-up still running at `deadline` (a time.monotonic()) is stopped, and none starts after it."""
    warmup_seconds, failed, cut = {}, {}, {}
    for name, runner in list(runners.items()):
        start = time.perf_counter()
        # The backward graph is compiled with the forward, in this thread. AOTAutograd's default compiles it at the
        # first backward, and on CUDA the backward runs in autograd's device thread while this one waits in C++,
        # where no signal handler runs: the deadline could not have stopped that half of the compile.
        try:
            # (The patch outside the deadline's block: an alarm inside its own set or reset could leave it on.)
            with torch._functorch.config.patch(force_non_lazy_backward_lowering=True), interrupt_at(deadline):
                measure(runner, steps, device)
        except DeadlinePassed as e:  # (with a message where the block never began)
            cut[name] = (f"not warmed up: {e}" if str(e)
                         else f"warm-up stopped at its deadline after {time.perf_counter() - start:.1f} s")
        except Exception as e:  # e.g. no C++ compiler for inductor: record it, measure the rest
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        else:
            warmup_seconds[name] = round(time.perf_counter() - start, 2)
            print(f"warm-up {name}: {warmup_seconds[name]} s", flush=True)
            continue
        print(f"warm-up {name}: {failed.get(name) or cut[name]}", flush=True)
        close_runners([runners.pop(name)])
    return warmup_seconds, failed, cut


def close_runners(runners: Iterable) -> None:
    """End what the runners hold that outlives them: the baseline's DataLoader workers (PlainPyTorch.close)."""
    for runner in runners:
        if isinstance(runner, PlainPyTorch):
            runner.close()


def measure_all(runners: dict, args: argparse.Namespace, device: torch.device, warmup_seconds: dict,
                measured_peak: float | None = None, deadline: float | None = None, on_run=None) -> list[dict]:
    """Round-robin repeats (so a noisy neighbour hits every variant alike); medians against plain PyTorch.
    With `measured_peak` (FLOP/s), MFU against it too. Once time.monotonic() passes `deadline` no new repeat
    starts (the first always runs); `on_run(rows)` gets the rows so far after every measurement."""
    runs = {name: [] for name in runners}
    flops = train_flops_per_image(MODELS[args.model])
    peak = peak_flops(device_name(device)) if device.type == "cuda" else None

    def rows() -> list[dict]:
        measured = {name: values for name, values in runs.items() if values}
        baseline = float(np.median(measured["plain-pytorch-fp32"])) if "plain-pytorch-fp32" in measured else None
        results = []
        for name, values in measured.items():
            ips = float(np.median(values))
            row = {"variant": name, "images_per_second": round(ips, 1), "runs": [round(v, 1) for v in values],
                   "vs_plain_pytorch": round(ips / baseline, 3) if baseline else None,
                   "warmup_seconds": warmup_seconds[name]}
            if peak:
                row["mfu"] = round(ips * flops / peak, 4)
            if measured_peak:
                row["mfu_of_measured_peak"] = round(ips * flops / measured_peak, 4)
            results.append(row)
        return results

    for repeat in range(args.repeats):
        if repeat and deadline is not None and time.monotonic() > deadline:
            break
        for name, runner in runners.items():
            runs[name].append(measure(runner, args.steps, device))
            print(f"repeat {repeat}: {name:40s} {runs[name][-1]:9.0f} img/s", flush=True)
            if on_run:
                on_run(rows())
    results = rows()
    for row in results:
        ratio = f"  {row['vs_plain_pytorch']:5.2f}x plain" if row["vs_plain_pytorch"] else ""
        print(f"{row['variant']:40s} {row['images_per_second']:9.0f} img/s{ratio}"
              + (f"  MFU {row['mfu']:.1%}" if "mfu" in row else "")
              + (f"  ({row['mfu_of_measured_peak']:.1%} of the measured peak)" if "mfu_of_measured_peak" in row else ""))
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    cfg = load_config(None, MODELS[args.model] + AUGMENT)
    runners, source, images = make_runners(args, cfg, device)
    warmup_seconds, failed, _ = warm_up(runners, args.warmup, device)  # no deadline: nothing is cut
    measured_peak = measured_matmul_flops(device) if device.type == "cuda" else None
    results = measure_all(runners, args, device, warmup_seconds, measured_peak)
    close_runners(runners.values())
    out = {"device": device_name(device), "device_type": device.type, "cpu_cores_visible": os.cpu_count(),
           # AVX2 or AVX512: whether bf16 runs on vector units made for it or is emulated (the bf16 rows' cost)
           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "torch_threads": torch.get_num_threads(), "load_average_at_end": os.getloadavg(),
           "model": args.model, "model_overrides": MODELS[args.model], "augmentation": AUGMENT,
           "batch_size": args.batch_size, "steps_per_measurement": args.steps, "warmup_steps": args.warmup,
           "repeats": args.repeats, "data": source, "images": images,
           "train_flops_per_image": train_flops_per_image(MODELS[args.model]),
           "peak_bf16_flops": peak_flops(device_name(device)) if device.type == "cuda" else None,
           "measured_bf16_matmul_flops": measured_peak,
           "torch": torch.__version__, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "results": results, "failed": failed}
    print(f"wrote {write_json(out, args.output, f'train_throughput_{device.type}.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
