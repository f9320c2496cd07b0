"""One run of one config through the same engine as a study's trials (no Tune).

    python -m ray_cifar.train --data ../shared/data/cifar10 --set train.epochs=10
    python -m ray_cifar.train --smoke-test --data ../shared/data/cifar10 --set train.num_workers=1
    python -m ray_cifar.train --config studies/x.yaml --set train.num_workers=4   # DDP via Ray Train

With train.num_workers == 1 the run is one plain process (no Ray); with more it is a
Ray Train TorchTrainer of that many DDP ranks. Either way OUTPUT/results.parquet
gets one row per epoch, the same columns as a study's. The search space is ignored.
"""

from __future__ import annotations

import os
import sys
import uuid
from typing import Any

import torch

from . import cli
from .config import Config
from .data_source import Cifar10
from .results import epoch_row, provenance, write_rows


def run_local(cfg: Config, dataset: Cifar10, output: str, run_id: str) -> list[dict[str, Any]]:
    from .data import make_splits
    from .loop import run_training
    from .pipelines import train_loader_for

    use_gpu = torch.cuda.is_available() if cfg.train.use_gpu is None else cfg.train.use_gpu
    device = torch.device("cuda" if use_gpu else "cpu")
    splits = make_splits(dataset, cfg.data, device)
    rows: list[dict[str, Any]] = []
    extra = provenance()

    def record(metrics: dict, model: torch.nn.Module) -> None:
        rows.append(epoch_row(run_id, {}, metrics, extra))
        write_rows(rows, os.path.join(output, "results.parquet"))

    run_training(cfg, train_loader_for(cfg, splits.train, device, log=print), splits.val, device, on_epoch=record)
    return rows


def run_distributed(cfg: Config, output: str, run_id: str) -> list[dict[str, Any]]:
    import ray
    from ray.train.v2.api.callback import UserCallback
    from ray.util.queue import Queue

    from . import distributed

    distributed.init_ray(cfg)
    cfg.train.use_gpu = distributed.resolve_use_gpu(cfg)
    queue = Queue()

    class ForwardMetrics(UserCallback):
        # Runs in the Train controller actor, so results travel to this driver through a Ray queue.
        def after_report(self, run_context, metrics, checkpoint):
            queue.put(metrics[0])

    trainer = distributed.make_trainer(cfg, os.path.join(output, "ray"), name=f"train-{run_id}",
                                       callbacks=[ForwardMetrics()])
    trainer.fit()
    extra = provenance()
    rows = [epoch_row(run_id, {}, queue.get(), extra) for _ in range(queue.qsize())]
    write_rows(rows, os.path.join(output, "results.parquet"))
    ray.shutdown()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = cli.parse_args("python -m ray_cifar.train", __doc__, argv)
    cfg, dataset, output = cli.prepare(args, "train")
    run_id = uuid.uuid4().hex[:8]
    print(f"[ray_cifar] data: {dataset.source}; run {run_id}; resolved config: {output}/config.yaml", flush=True)
    if cfg.train.num_workers == 1:
        rows = run_local(cfg, dataset, output, run_id)
    else:
        rows = run_distributed(cfg, output, run_id)
    best = max(rows, key=lambda r: r["val_acc"])
    print(f"[ray_cifar] best val_acc {best['val_acc']:.4f} at epoch {best['epoch']}; "
          f"per-epoch rows: {output}/results.parquet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
