"""The floor under a DDP trial's start-up: a Ray Train TorchTrainer whose ranks do nothing.

    python benchmarks/trainer_startup.py                 # 2 ranks, 3 runs, gloo, on this machine
    python benchmarks/trainer_startup.py --ranks 1 2 4

One local Ray; per run, from a Ray task (as a Tune trial function runs it): `TorchTrainer(...).fit()`
of N CPU ranks whose train function only imports torch and notes the time. Recorded per run:

- start_seconds: fit() called -> rank 0's train function runs (Train controller process, placement
  group, worker processes and their imports, the gloo process group);
- end_seconds: rank 0's function returns -> fit() returns (teardown).

No ray_cifar code runs in the ranks, so this is what any DDP trial on TorchTrainer pays before its
first step and after its last, whatever the trial does. Results: results/trainer_startup_cpu.json.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data_pipeline import write_json  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _rank(config: dict) -> None:
    import torch  # noqa: F401 - what every real rank imports

    if ray.train.get_context().get_world_rank() == 0:
        with open(config["stamp"], "w") as f:
            f.write(repr(time.time()))


@ray.remote(num_cpus=0)
def _one_fit(storage: str, name: str, ranks: int) -> tuple[float, float]:
    stamp = os.path.join(storage, f"{name}.started")
    called = time.time()
    TorchTrainer(_rank, train_loop_config={"stamp": stamp},
                 scaling_config=ScalingConfig(num_workers=ranks, resources_per_worker={"CPU": 1}),
                 torch_config=TorchConfig(backend="gloo"),
                 run_config=RunConfig(name=name, storage_path=storage)).fit()
    returned = time.time()
    with open(stamp) as f:
        started = float(f.read())
    return started - called, returned - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[2])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--output", default=os.path.join(HERE, "results"),
                   help="folder of trainer_startup_cpu.json (default: benchmarks/results, the committed figures)")
    args = p.parse_args()
    os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    init_start = time.time()
    ray.init(num_cpus=max(args.ranks), log_to_driver=False)
    init_seconds = time.time() - init_start
    results = []
    with tempfile.TemporaryDirectory() as storage:
        for ranks in args.ranks:
            runs = [ray.get(_one_fit.remote(storage, f"r{ranks}-{i}", ranks)) for i in range(args.runs)]
            # The first run also starts Ray's own helpers: report the median of the rest too.
            later = runs[1:] or runs
            entry = {"ranks": ranks, "runs": [{"start_seconds": round(s, 2), "end_seconds": round(e, 2)} for s, e in runs],
                     "start_seconds_median": round(statistics.median(s for s, _ in later), 2),
                     "end_seconds_median": round(statistics.median(e for _, e in later), 2)}
            results.append(entry)
            print(f"{ranks} rank(s): fit -> rank runs {entry['start_seconds_median']:.2f} s, "
                  f"rank done -> fit returns {entry['end_seconds_median']:.2f} s ({'median of runs 2..' + str(args.runs) if args.runs > 1 else 'one run'})",
                  flush=True)
    ray.shutdown()
    out = {"what": "no-op TorchTrainer fit(), CPU ranks, gloo", "ray": ray.__version__, "cpus": os.cpu_count(),
           "load_average_1min": round(os.getloadavg()[0], 1), "ray_init_seconds": round(init_seconds, 2),
           "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "results": results}
    print(f"wrote {write_json(out, args.output, 'trainer_startup_cpu.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
