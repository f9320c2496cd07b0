"""DDP correctness with real processes: 2 gloo ranks vs one process on the same global batches.

The model uses GroupNorm (per-image statistics) and augmentation is off, so a DDP step
and a one-process step on the same global batch compute the same gradient up to float
reduction order: weights must match within 1e-4 (absolute, fp32; weights are O(0.1-1)) after 10 SGD steps,
and the two ranks must hold bit-identical weights (DDP all-reduces, every rank steps alike).
"""

from __future__ import annotations

import contextlib
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import EXACT_METRICS, TINY_MODEL, synthetic_cifar
from ray_cifar.validation import load_config
from ray_cifar.data.loader import make_splits
from ray_cifar.loop import run_training
from ray_cifar.data.pipelines import train_loader_for

pytestmark = pytest.mark.integration

SETS = TINY_MODEL + ["model.norm=group", "train.amp=fp32", "train.epochs=2", "train.global_batch_size=64",
                     "data.val_size=100", "data.crop_padding=0", "data.flip_p=0", "optim.weight_decay=5e-4",
                     "train.torch_threads=1"]
TOLERANCE = 1e-4


def _config(num_workers: int):
    return load_config(None, SETS + [f"train.num_workers={num_workers}"])


@contextlib.contextmanager
def _gloo_group(rank: int, world_size: int, port: int):
    """This spawned process as `rank` of a gloo process group on loopback, for the block."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _rank_main(rank: int, world_size: int, port: int, out_dir: str) -> None:
    with _gloo_group(rank, world_size, port):
        cfg = _config(world_size)
        splits = make_splits(synthetic_cifar(400, 50), cfg.data, "cpu")
        cpu = torch.device("cpu")
        model = run_training(cfg, train_loader_for(cfg, splits.train, cpu, rank, world_size), splits.val, cpu, rank,
                             world_size, log=None)
        torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_each_other_and_one_process(tmp_path):
    mp.start_processes(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")

    cfg = _config(1)
    splits = make_splits(synthetic_cifar(400, 50), cfg.data, "cpu")
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    single = run_training(cfg, train_loader_for(cfg, splits.train, cpu), splits.val, cpu, log=None).state_dict()

    initial = run_training.__globals__["build_model"](cfg, torch.device("cpu")).state_dict()
    moved = max((single[k] - initial[k]).abs().max().item() for k in single)
    assert moved > 1e-3, "training did not change the weights: the comparison would be vacuous"
    for name in single:
        assert torch.equal(rank0[name], rank1[name]), f"ranks differ in {name}"
        diff = (rank0[name] - single[name]).abs().max().item()
        assert diff < TOLERANCE, f"{name}: DDP vs one process differ by {diff:.2e} (tolerance {TOLERANCE})"


def test_ranks_cover_each_epoch_exactly_once():
    from ray_cifar.data.loader import TrainLoader

    cfg = _config(2)
    splits = make_splits(synthetic_cifar(400, 50), cfg.data, "cpu")
    n = len(splits.train)
    batch = 50  # divides the 350 train images: every image exactly once per epoch
    assert n % batch == 0
    seen = torch.cat([TrainLoader(splits.train, cfg.data, batch, r, 2, seed=3).epoch_indices(epoch=1)
                      for r in range(2)])
    assert sorted(seen.tolist()) == list(range(n))
    other_epoch = TrainLoader(splits.train, cfg.data, batch, 0, 2, seed=3).epoch_indices(epoch=2)
    assert not torch.equal(other_epoch, TrainLoader(splits.train, cfg.data, batch, 0, 2, seed=3).epoch_indices(1))


# The killed-rank study (test_fault_tolerance, RAY_CIFAR_LONG_TESTS=1) in two gloo processes without Ray: rank 0's
# checkpoint of epoch 2 is what every rank of a restarted worker group resumes from, augmentation on (each rank
# draws its own crops and flips).
RESUME_SETS = TINY_MODEL + ["model.norm=group", "train.amp=fp32", "train.epochs=4", "train.global_batch_size=50",
                            "data.val_size=100", "data.pipeline=torch", "optim.lr=0.05", "schedule.name=cosine",
                            "train.torch_threads=1", "train.num_workers=2"]


def _resume_rank_main(rank: int, world_size: int, port: int, out_dir: str) -> None:
    from ray_cifar import checkpoint
    from test_checkpoint import Killed

    with _gloo_group(rank, world_size, port):
        cfg = load_config(None, RESUME_SETS)
        splits = make_splits(synthetic_cifar(400, 50), cfg.data, "cpu")
        cpu = torch.device("cpu")

        def train(on_epoch=None, resume=None) -> tuple[list[dict], dict]:
            """(each epoch's metrics, the final weights); on_epoch in place of keeping the metrics."""
            epochs: list[dict] = []
            model = run_training(cfg, train_loader_for(cfg, splits.train, cpu, rank, world_size), splits.val, cpu,
                                 rank, world_size, on_epoch=on_epoch or (lambda m, state: epochs.append(m)),
                                 log=None, resume=resume)
            return epochs, model.state_dict()

        full, full_weights = train()
        saved = os.path.join(out_dir, "epoch2")

        def stop_after_2(metrics, state):
            if metrics["epoch"] == 2:
                if rank == 0:  # as a trial's rank 0 reports the checkpoint
                    checkpoint.save_state(state(), saved)
                raise Killed

        with contextlib.suppress(Killed):
            train(on_epoch=stop_after_2)
        dist.barrier()  # rank 0's checkpoint is written
        resumed, resumed_weights = train(resume=checkpoint.load_state(saved))
        torch.save({"full": full, "resumed": resumed, "full_weights": full_weights,
                    "resumed_weights": resumed_weights}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_gloo_ranks_resumed_from_rank_0s_checkpoint_continue_exactly(tmp_path):
    mp.start_processes(_resume_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        full, resumed = got["full"], got["resumed"]
        assert [m["epoch"] for m in resumed] == [3, 4] and [m["resumed_from_epoch"] for m in resumed] == [2, 2]
        for have, want in zip(resumed, full[2:]):
            for key in EXACT_METRICS:
                assert have[key] == want[key], (rank, have["epoch"], key, have[key], want[key])
        for name, weights in got["full_weights"].items():
            assert torch.equal(got["resumed_weights"][name], weights), (rank, name)
