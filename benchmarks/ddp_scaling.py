"""Images/second of DDP training with 1, 2, ... ranks, and the scaling efficiency, in one run.

    python benchmarks/ddp_scaling.py --data ../shared/data/cifar10 --device cpu --ranks 1 2    # gloo, small ResNet
    python benchmarks/ddp_scaling.py --data DIR --device cuda --ranks 1 2 4 8 --model resnet18   # nccl, one GPU a rank

Each rank count runs as its own torch.multiprocessing group (gloo on cpu, nccl on cuda) with the same
per-rank batch (weak scaling: the global batch grows with the ranks), ray_cifar's batch-tensor loader
and `engine.train_step` under DistributedDataParallel. On cpu the ranks split the visible cores
(threads = cores // ranks, as the training loop does), so the comparison is at equal hardware.
images/s = global images of the timed steps / the slowest rank's time; efficiency(N) =
images/s(N) / (N x images/s(1)). Counts above the GPU count are skipped on cuda.
Writes results/ddp_scaling_<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from data_pipeline import device_name, endless, write_json  # noqa: E402
from train_throughput import AUGMENT, MODELS, add_step_arguments, load_images, resolve_step_arguments  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, world_size: int, port: int, args, images: np.ndarray, labels: np.ndarray, queue) -> None:
    from ray_cifar import engine
    from ray_cifar.validation import load_config
    from ray_cifar.data.loader import Split, TrainLoader
    from ray_cifar.models import create_model_from_config
    from ray_cifar.optim import create_optimizer, create_scheduler

    on_gpu = args.device == "cuda"
    device = torch.device("cuda", rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if on_gpu else "gloo", rank=rank, world_size=world_size)
    cfg = load_config(None, MODELS[args.model] + AUGMENT)
    torch.manual_seed(0)
    model = create_model_from_config(cfg.model).to(device).to(memory_format=torch.channels_last)
    model = DistributedDataParallel(engine.prepare_model(model, device), device_ids=[rank] if on_gpu else None)
    split = Split(torch.from_numpy(images).to(device), torch.from_numpy(labels.astype(np.int64)).to(device))
    batches = endless(TrainLoader(split, cfg.data, args.batch_size * world_size, rank, world_size, seed=0).epoch)
    optimizer = create_optimizer(model.module, cfg.optim)
    scheduler = create_scheduler(optimizer, cfg.schedule, cfg.optim.lr, 10**6, 10**7)
    amp, loss_fn = engine.resolve_amp(device, "bf16"), nn.CrossEntropyLoss()
    sums = torch.zeros(3, device=device, dtype=torch.float64)

    def run(steps: int) -> float:
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            x, y = next(batches)
            sums.add_(engine.train_step(model, x, y, optimizer, scheduler, loss_fn, device, amp))
        sums.tolist()  # wait for the device
        elapsed = torch.tensor([time.perf_counter() - start], device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the group is as fast as its slowest rank
        return float(elapsed)

    run(args.warmup)
    seconds = [run(args.steps) for _ in range(args.repeats)]
    if rank == 0:
        queue.put(seconds)
    dist.destroy_process_group()


def measure(world_size: int, args, images, labels) -> list[float]:
    """Images/s (global) of each repeat with `world_size` ranks."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    try:
        mp.start_processes(rank_main, args=(world_size, free_port(), args, images, labels, queue),
                           nprocs=world_size, start_method="spawn", join=True)
    except mp.ProcessExitedException as e:
        if queue.empty():
            raise
        # Seen once on the shared CPU machine: a rank aborted in gloo's teardown after the timings were sent.
        print(f"warning: a rank died after reporting ({e}); keeping the reported timings", flush=True)
    return [args.steps * args.batch_size * world_size / s for s in queue.get()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(parser, "images per step PER RANK")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="rank counts to compare")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per rank count (median kept)")
    args = resolve_step_arguments(parser, parser.parse_args(argv))
    on_gpu = args.device == "cuda"
    ranks = [n for n in args.ranks if not on_gpu or n <= torch.cuda.device_count()]
    images, labels, source = load_images(args.data, args.images)

    results = []
    for world_size in ranks:
        runs = measure(world_size, args, images, labels)
        results.append({"ranks": world_size, "global_batch_size": args.batch_size * world_size,
                        "images_per_second": round(float(np.median(runs)), 1), "runs": [round(r, 1) for r in runs]})
        print(f"{world_size} rank(s): {results[-1]['images_per_second']:9.0f} img/s (runs {results[-1]['runs']})",
              flush=True)
    base = results[0]["images_per_second"] / results[0]["ranks"]
    for row in results:
        row["scaling_efficiency"] = round(row["images_per_second"] / (row["ranks"] * base), 3)
        print(f"{row['ranks']} rank(s): efficiency {row['scaling_efficiency']:.2f}")

    device = torch.device("cuda" if on_gpu else "cpu")
    out = {"device": device_name(device), "device_type": device.type, "cpu_cores_visible": os.cpu_count(),
           "gpus": torch.cuda.device_count() if on_gpu else 0, "backend": "nccl" if on_gpu else "gloo",
           "load_average_at_end": os.getloadavg(), "model": args.model, "model_overrides": MODELS[args.model],
           "augmentation": AUGMENT, "batch_size_per_rank": args.batch_size, "steps_per_measurement": args.steps,
           "warmup_steps": args.warmup, "repeats": args.repeats, "data": source, "images": len(images),
           "torch": torch.__version__, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "results": results}
    print(f"wrote {write_json(out, args.output, f'ddp_scaling_{device.type}.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
