"""Images/second of the three ways to feed augmented CIFAR-10 batches, on one device.

    python benchmarks/data_pipeline.py --data ../shared/data/cifar10 --device cpu
    python benchmarks/data_pipeline.py --data ../shared/data/cifar10 --device cuda   # adds ResNet-18 training

Paths: (a) torchvision per-sample PIL transforms in a DataLoader with every CPU core as a worker,
(b) ray_cifar's torch batch-tensor path on the device, (c) ray_cifar's DALI pipeline (a CPU pipeline
on --device cpu, a GPU pipeline on --device cuda). Augmentation sets: crop+flip (pad 4, p 0.5) and
full (crop, flip, random erasing p 0.5, AutoAugment CIFAR-10). Each figure is images delivered
(ready for the model, normalized, on the device) per second over --seconds after one warm-up batch.

On cuda it also times ResNet-18 (bf16 autocast, channels_last, SGD) training fed by each path and
fed one batch that already sits on the GPU: the ratio says how far each loader keeps the GPU busy.
Writes ray_cifar/measurements/data_pipeline_<device>.json (with the device's name): package data,
which data.pipeline=auto reads (also from an installed copy); only a run at the default sizes over all 50,000 train
images writes there by default, any other needs --output DIR.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ray_cifar.data.augment import MEAN, STD  # noqa: E402
from ray_cifar.data.loader import Split, TrainLoader, input_dtype  # noqa: E402
from ray_cifar.data.source import load_cifar10  # noqa: E402
from ray_cifar.data.pipelines import BENCHMARK_RESULTS as RESULTS_DIR  # noqa: E402
from ray_cifar.data.pipelines import dali_available  # noqa: E402
from ray_cifar.validation import load_config  # noqa: E402

SETS = {
    "crop+flip": ["data.crop_padding=4", "data.flip_p=0.5"],
    "full": ["data.crop_padding=4", "data.flip_p=0.5", "data.erasing_p=0.5", "data.autoaugment=cifar10"],
}


def torchvision_loader(images, labels, set_name: str, batch_size: int, workers: int, pin_memory: bool):
    import torchvision.transforms as T
    from PIL import Image

    steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
    if set_name == "full":
        steps.append(T.AutoAugment(T.AutoAugmentPolicy.CIFAR10))
    steps += [T.ToTensor(), T.Normalize(MEAN, STD)]
    if set_name == "full":
        steps.append(T.RandomErasing(p=0.5))
    transform = T.Compose(steps)

    class Cifar(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return transform(Image.fromarray(images[i])), int(labels[i])

    return torch.utils.data.DataLoader(Cifar(), batch_size=batch_size, shuffle=True, num_workers=workers,
                                       drop_last=True, persistent_workers=workers > 0, pin_memory=pin_memory)


def endless(make_epoch):
    epoch = 0
    while True:
        batches = 0
        for batch in make_epoch(epoch):
            batches += 1
            yield batch
        if not batches:  # fewer images than a batch (every loader drops the last part batch): it would spin for ever
            raise ValueError("an epoch of no batches: fewer images than a batch")
        epoch += 1


def time_batches(batches, seconds: float, device: torch.device, step=None, images: int | None = None) -> float:
    """Images per second delivered (and, with `step`, trained on) after one warm-up batch, over `seconds`
    or, with `images`, until that many were delivered (e.g. one epoch)."""
    it = iter(batches)
    x, y = next(it)
    if step:
        step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
    if device.type == "cuda":
        torch.cuda.synchronize()
    count, start = 0, time.perf_counter()
    while count < images if images else time.perf_counter() - start < seconds:
        x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if step:
            step(x, y)
        count += x.shape[0]
        if device.type == "cuda" and count % (x.shape[0] * 20) == 0:
            torch.cuda.synchronize()
    if device.type == "cuda":
        torch.cuda.synchronize()
    else:
        float(x.float().sum())  # the last batch is really there
    return count / (time.perf_counter() - start)


def training_step(device: torch.device, amp: str = "bf16", model_overrides=("model.name=resnet18",)):
    """One SGD step of a model (ResNet-18 unless `model_overrides` say otherwise), bf16/fp16 autocast, channels_last,
    under the device's fast paths (cuDNN autotuning, TF32) as a trial trains: a slower model would hide what a
    loader costs, and flatter every 'fed / from GPU memory' ratio."""
    from ray_cifar import engine
    from ray_cifar.models import create_model_from_config

    model = create_model_from_config(load_config(None, list(model_overrides)).model).to(device)
    model = engine.prepare_model(model.to(memory_format=torch.channels_last), device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    return f"{model} ({os.cpu_count()} cores visible)"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("RAY_CIFAR_DATA"), help="CIFAR-10 folder (train/test.parquet)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch-size", type=int, default=512, help="images per batch (one rank)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per figure (the median is reported)")
    parser.add_argument("--images", type=int, default=50000, help="train images used (the first N)")
    parser.add_argument("--output", help="folder of data_pipeline_<device>.json (default: the package's measurement, "
                                          "ray_cifar/measurements, which data.pipeline=auto reads: from a run at "
                                          "the default sizes over all 50,000 train images only)")
    args = parser.parse_args(argv)
    if args.images < args.batch_size:
        parser.error(f"--images {args.images} is fewer than --batch-size {args.batch_size}: "
                     "an epoch would have no batch")
    return args


class Recorder:
    """Median of `repeats` measurements per figure (the machine may be shared: the spread is kept too), and the
    loaders that failed instead (errors: set, path, the exception in one line)."""

    def __init__(self, repeats: int):
        self.repeats, self.results, self.errors = repeats, [], []

    def failed(self, set_name: str, path: str, error: str) -> None:
        self.errors.append({"set": set_name, "path": path, "error": error})
        print(f"{set_name:10s} {path:34s} FAILED: {error}", flush=True)
        gc.collect()  # what the failed loader left (a half-built DALI pipeline's threads) goes before the next forks

    def figures(self) -> dict:
        """The results, and the errors where a loader failed (a run without failures writes what it always did)."""
        return {"results": self.results, **({"errors": self.errors} if self.errors else {})}

    def __call__(self, set_name: str, path: str, measure, **extra) -> float:
        runs = sorted(measure() for _ in range(self.repeats))
        ips = runs[len(runs) // 2]
        self.results.append({"set": set_name, "path": path, "images_per_second": round(ips, 1),
                             "runs": [round(r, 1) for r in runs], **extra})
        print(f"{set_name:10s} {path:34s} {ips:10.0f} img/s  (runs {', '.join(f'{r:.0f}' for r in runs)})", flush=True)
        return ips

    def loader(self, set_name: str, path: str, make, measure, **extra) -> float | None:
        """The figure of a fresh loader from make(), measure(batches) timing it; the loader freed after. None where
        it failed: recorded with its error line, once the exception (and the loader in its traceback) is let go."""
        try:
            batches = make()
            try:
                return self(set_name, path, lambda: measure(batches), **extra)
            finally:
                release(batches)
        except Exception as e:  # noqa: BLE001 - one loader that fails must not cost the others
            error = error_line(e)
        self.failed(set_name, path, error)
        return None


def error_line(e: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def feeds(set_name: str, args: argparse.Namespace, split: Split, images_np, labels_np, device: torch.device,
          dali: bool = True):
    """(path name, a maker of endless batches) for each loader of one augmentation set; DALI's only with
    `dali` and where it is installed (never looked up without `dali`)."""
    cfg = load_config(None, SETS[set_name]).data
    dtype = input_dtype("bf16")
    workers = os.cpu_count() or 1

    def torchvision_batches():
        loader = torchvision_loader(images_np, labels_np, set_name, args.batch_size, workers, device.type == "cuda")
        return endless(lambda epoch: loader)  # workers persist across epochs

    yield "torchvision-dataloader", torchvision_batches
    yield "torch-batch", lambda: endless(TrainLoader(split, cfg, args.batch_size, 0, 1, seed=0, dtype=dtype).epoch)
    if dali and dali_available():
        def dali_batches():
            from ray_cifar.data.dali import DaliTrainLoader  # the first build imports DALI (timed with it)

            return endless(DaliTrainLoader(split, cfg, args.batch_size, 0, 1, 0, device, dtype).epoch)

        yield f"dali-{'gpu' if device.type == 'cuda' else 'cpu'}", dali_batches


def timed_builds(feeds_of_set, device: torch.device):
    """(path, maker, build_seconds, error) per loader: seconds to import (the first time), build, and deliver the
    first batch of a fresh loader, which `data.pipeline=auto` weighs against the images a run will draw; or, in
    its place, the line of the exception its build raised (build_seconds None): the next loader is built all the
    same."""
    for path, make in feeds_of_set:
        start, error = time.perf_counter(), None
        try:
            next(make())
            if device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - one loader that fails (DALI's GPU build) must not cost the others
            error = error_line(e)  # (a line: the exception's traceback, and the loader in it, are let go here)
        yield path, make, None if error else time.perf_counter() - start, error


def release(batches) -> None:
    """Free a loader now (its DALI pipeline's threads, its DataLoader workers): a DataLoader that forks its
    workers while a DALI pipeline still runs threads in this process gets workers that die or hang."""
    batches.close()
    del batches
    gc.collect()


def measure_loaders(record: Recorder, make_feeds, args: argparse.Namespace, device: torch.device,
                    deadline: float | None = None, on_figure=None) -> None:
    """Every loader of every set: images/s delivered (median of the repeats) and its build seconds.
    Stops between figures once time.monotonic() passes `deadline`; calls `on_figure()` after each."""
    for set_name in SETS:
        for path, make, build_seconds, error in timed_builds(make_feeds(set_name), device):
            if deadline is not None and time.monotonic() > deadline:
                return
            if error is None:
                record.loader(set_name, path, make, lambda batches: time_batches(batches, args.seconds, device),
                              build_seconds=round(build_seconds, 3))
            else:
                record.failed(set_name, path, error)
            if on_figure:
                on_figure()


def measure_training(record: Recorder, make_feeds, args: argparse.Namespace, device: torch.device,
                     step=None, images: int | None = None, deadline: float | None = None, on_figure=None) -> dict:
    """On a GPU: model steps (ResNet-18 unless `step` is given) fed from GPU memory, then by each loader,
    for --seconds or, with `images`, one pass over that many (an epoch); returns the fed / resident ratios."""
    ratios = {}
    step = step or training_step(device)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    resident = record("training", "resnet18-from-gpu-memory",
                      lambda: time_batches(iter(lambda: (x, y), None), args.seconds, device, step, images))
    for set_name in SETS:
        for path, make in make_feeds(set_name):
            if deadline is not None and time.monotonic() > deadline:
                return ratios
            ips = record.loader(set_name, f"resnet18-fed-by-{path}", make,
                                lambda batches: time_batches(batches, args.seconds, device, step, images))
            if ips is not None:
                record.results[-1]["fraction_of_resident"] = round(ips / resident, 3)
                ratios[f"{set_name}: resnet18 fed by {path} / from gpu memory"] = round(ips / resident, 3)
            if on_figure:
                on_figure()
    return ratios


def loader_ratios(results: list[dict], device: torch.device) -> dict:
    """DALI / DataLoader, DALI / torch path and torch path / DataLoader per set, of the figures measured."""
    by = {(r["set"], r["path"]): r["images_per_second"] for r in results}
    dali_name = f"dali-{'gpu' if device.type == 'cuda' else 'cpu'}"
    pairs = [(dali_name, "torchvision-dataloader"), (dali_name, "torch-batch"), ("torch-batch", "torchvision-dataloader")]
    return {f"{set_name}: {a} / {b}": round(by[(set_name, a)] / by[(set_name, b)], 2)
            for set_name in SETS for a, b in pairs if (set_name, a) in by and (set_name, b) in by}


def results_document(args: argparse.Namespace, device: torch.device, source: str, images: int, record: Recorder,
                     ratios: dict) -> dict:
    """What data_pipeline_<device>.json holds (the file data.pipeline=auto reads): RECORD's results and the
    loaders that failed (its errors), which auto reads too."""
    out = {"device": device_name(device), "device_type": device.type, "batch_size": args.batch_size,
           "seconds_per_measurement": args.seconds, "dataloader_workers": os.cpu_count() or 1,
           # No machine path in a committed file: the source kind and DIR.
           "images": images, "data": source.split(":")[0] + ":DIR", "torch": torch.__version__,
           "time": datetime.datetime.now().isoformat(), **record.figures(), "ratios": ratios}
    if dali_available():
        import nvidia.dali

        out["dali"] = nvidia.dali.__version__
    return out


def first_train_images(data: str | None, n: int, device: torch.device):
    """(dataset, images, labels, split): the first N train images, as arrays and as a Split on DEVICE. Copied out
    of the data cache's memory map, which is read-only: torch warns of a tensor made from it, and on the CPU the
    split would be that map."""
    dataset = load_cifar10(data, None, log=lambda m: None)
    images_np, labels_np = np.array(dataset.train_images[:n]), np.array(dataset.train_labels[:n])
    return dataset, images_np, labels_np, Split(torch.from_numpy(images_np).to(device),
                                                torch.from_numpy(labels_np).to(device))


def default_output_refusal(args: argparse.Namespace, images: int) -> str | None:
    """Why this run may not write the package's measurement without --output (None: it may): only a run at the
    default sizes (parse_args's) over all of CIFAR-10's train images does. A shorter or smaller run (a quick look, a
    CI machine's seconds) written over the committed measurement by default changed what every study of that device
    type picks, unsaid."""
    if args.output is not None:
        return None
    default = parse_args([])
    smaller = [f"--{k.replace('_', '-')} {v:g}" for k, v in
               {"images": images, "seconds": args.seconds, "repeats": args.repeats, "batch_size": args.batch_size}.items()
               if v != getattr(default, k) and not (k == "images" and v >= default.images)]
    if not smaller:
        return None
    return (f"{', '.join(smaller)}: not the sizes of the measurement data.pipeline=auto reads "
            f"({os.path.relpath(RESULTS_DIR)}); give --output DIR for this run's figures")


def write_results(args: argparse.Namespace, out: dict, device: torch.device) -> str:
    return write_json(out, args.output or RESULTS_DIR, f"data_pipeline_{device.type}.json")


def write_json(out: dict, folder: str, filename: str) -> str:
    """A benchmark's results file (every benchmark here writes its one JSON this way); returns its path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, filename)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dataset, images_np, labels_np, split = first_train_images(args.data, args.images, device)
    refusal = default_output_refusal(args, len(images_np))
    if refusal:
        print(f"data_pipeline.py: error: {refusal}", file=sys.stderr)
        return 2
    record = Recorder(args.repeats)

    def make_feeds(set_name):
        return feeds(set_name, args, split, images_np, labels_np, device)

    measure_loaders(record, make_feeds, args, device)
    ratios = measure_training(record, make_feeds, args, device) if device.type == "cuda" else {}
    ratios.update(loader_ratios(record.results, device))
    for k, v in ratios.items():
        print(f"{k}: {v}x")

    out = results_document(args, device, dataset.source, len(images_np), record, ratios)
    print(f"wrote {write_results(args, out, device)}")
    return 1 if record.errors else 0


if __name__ == "__main__":
    sys.exit(main())
