"""Run a study: Ray Tune + ASHA over DDP trials of CIFAR-10 ResNets.

    python -m ray_cifar.tune                                   # the default study (optimizers x batch sizes)
    python -m ray_cifar.tune --smoke-test --data ../shared/data/cifar10 --output out/smoke
    python -m ray_cifar.tune --config studies/x.yaml --set train.epochs=10
    RAY_ADDRESS=auto python -m ray_cifar.tune --config ...     # on a node of a running Ray cluster

Writes OUTPUT/config.yaml (resolved), OUTPUT/results.parquet (a row per trial per
epoch), OUTPUT/trials.parquet (a row per trial), and Ray's own files under OUTPUT/ray.
The test split is evaluated once, for the best trial by validation, at the end.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

from . import cli
from .config import Config, flatten, search_keys
from .validation import trial_config
from .results import epoch_row, write_rows

STATUS_COMPLETED, STATUS_STOPPED, STATUS_FAILED = "completed", "stopped", "failed"


def to_param_space(search_space: dict[str, Any]) -> dict[str, Any]:
    from ray import tune

    makers = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
              "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(v[0], v[1] + 1)}
    return {key: makers[kind](values) for key, spec in search_space.items() for kind, values in spec.items()}


def searched_params(base: dict[str, Any], sampled: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    """The effective values of the searched fields of one trial, as flat 'section.field' columns."""
    flat = flatten(trial_config(base, sampled).to_dict())
    return {k: flat[k] for k in keys}


def make_recorder(cfg: Config, base: dict[str, Any], output: str, provenance: dict[str, Any]):
    from ray.tune import Callback

    class ResultsRecorder(Callback):
        """Collects every reported epoch in the driver and rewrites results.parquet as it goes."""

        def __init__(self):
            self.keys = search_keys(cfg.tune.search_space)
            self.rows: list[dict[str, Any]] = []
            self.trials: dict[str, dict[str, Any]] = {}
            self.params: dict[str, dict[str, Any]] = {}

        def _params(self, trial) -> dict[str, Any]:
            if trial.trial_id not in self.params:
                self.params[trial.trial_id] = searched_params(base, trial.config, self.keys)
            return self.params[trial.trial_id]

        def _trial(self, trial) -> dict[str, Any]:
            return self.trials.setdefault(trial.trial_id, {
                "trial_id": trial.trial_id, **self._params(trial), "status": "running",
                "epochs": 0, "planned_epochs": None, "best_val_acc": None, "best_epoch": None, "checkpoint_path": None, "error": None})

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "epoch" not in result:
                return
            summary = self._trial(trial)
            row = epoch_row(trial.trial_id, self._params(trial), result, {"time": time.time()})
            self.rows.append(row)
            summary["epochs"] = row["epoch"]
            summary["planned_epochs"] = int(result.get("epochs") or cfg.train.epochs)  # max_steps decides it in a trial
            if summary["best_val_acc"] is None or row["val_acc"] > summary["best_val_acc"]:
                summary.update(best_val_acc=row["val_acc"], best_epoch=row["epoch"])
            if result.get("checkpoint_path"):
                summary["checkpoint_path"] = result["checkpoint_path"]
            self.write()

        def on_trial_complete(self, iteration, trials, trial, **info):
            summary = self._trial(trial)
            planned = summary.get("planned_epochs") or cfg.train.epochs
            summary["status"] = STATUS_COMPLETED if summary["epochs"] >= planned else STATUS_STOPPED

        def on_trial_error(self, iteration, trials, trial, **info):
            summary = self._trial(trial)
            summary["status"] = STATUS_FAILED
            summary["error"] = str(trial.error_file) if getattr(trial, "error_file", None) else "see Ray logs"

        def write(self):
            write_rows([{**r, **provenance} for r in self.rows], os.path.join(output, "results.parquet"))

    return ResultsRecorder()


def run_study(cfg: Config, output: str) -> list[dict[str, Any]]:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from . import distributed
    from .results import format_table, provenance

    distributed.init_ray(cfg)
    cfg.train.use_gpu = distributed.resolve_use_gpu(cfg)
    max_concurrent = distributed.concurrent_trials(cfg)
    # With train.max_steps the epochs per trial follow from the data and the batch size; without
    # tune.max_epochs ASHA then has no top rung and survivors run to their own end.
    max_t = cfg.tune.max_epochs or (cfg.train.epochs if cfg.train.max_steps is None else 10**6)
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=cfg.tune.grace_period,
                               reduction_factor=cfg.tune.reduction_factor)
                 if cfg.tune.scheduler == "asha" else FIFOScheduler())
    length = f"max {max_t} epochs" if cfg.train.max_steps is None else f"{cfg.train.max_steps} steps per trial"
    print(f"[ray_cifar] study: {grid_size(cfg)} grid point(s) x {cfg.tune.num_samples} sample(s), "
          f"{cfg.train.num_workers} DDP rank(s) per trial ({'GPU' if cfg.train.use_gpu else 'CPU'}), "
          f"{max_concurrent} trial(s) at once, scheduler {cfg.tune.scheduler} on {cfg.tune.metric} ({cfg.tune.mode}), "
          f"{length}; results in {output}", flush=True)

    storage = os.path.join(output, "ray")
    base = cfg.to_dict()
    base["tune"]["search_space"] = {}
    run_provenance = provenance()  # git SHA, versions: once per study
    recorder = make_recorder(cfg, base, output, run_provenance)
    trainable = tune.with_parameters(distributed.tune_trial, base_config=base, storage_path=storage)
    trainable = tune.with_resources(trainable, {"CPU": cfg.tune.trial_driver_cpus})
    tuner = tune.Tuner(
        trainable,
        param_space=to_param_space(cfg.tune.search_space),
        tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode=cfg.tune.mode, scheduler=scheduler,
                                    num_samples=cfg.tune.num_samples, max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(name="tune", storage_path=storage, callbacks=[recorder]),
    )
    tuner.fit()

    trials = sorted(recorder.trials.values(), key=lambda t: _sort_key(cfg, t))
    for t in trials:
        t["test_acc"] = None
    best = next((t for t in trials if t["checkpoint_path"]), None)
    if best is not None:
        # The test split, once, for the trial chosen by validation alone.
        test = distributed.evaluate_checkpoint(best["checkpoint_path"], "test", cfg.train.use_gpu)
        best["test_acc"], best["test_loss"] = test["test_acc"], test["test_loss"]
    write_rows([{**t, **run_provenance} for t in trials], os.path.join(output, "trials.parquet"))
    recorder.write()
    columns = ["trial_id", *recorder.keys, "status", "epochs", "best_val_acc", "best_epoch", "test_acc"]
    print("\n" + format_table(trials, columns))
    if best is not None:
        print(f"\n[ray_cifar] best trial {best['trial_id']}: val_acc {best['best_val_acc']:.4f} "
              f"(epoch {best['best_epoch']}), test_acc {best['test_acc']:.4f}")
    print(f"[ray_cifar] results: {output}/results.parquet (per epoch), {output}/trials.parquet (per trial)")
    return trials


def _sort_key(cfg: Config, t: dict[str, Any]):
    value = t["best_val_acc"]
    if value is None:
        return (1, 0.0)
    return (0, -value if cfg.tune.mode == "max" else value)


def grid_size(cfg: Config) -> int:
    """Trials per sample: the product of the grid lengths (choice and ranges draw one value per sample)."""
    return math.prod(len(values) for spec in cfg.tune.search_space.values()
                     for kind, values in spec.items() if kind == "grid")


def main(argv: list[str] | None = None) -> int:
    args = cli.parse_args("python -m ray_cifar.tune", __doc__, argv)
    cfg, dataset, output = cli.prepare(args, "tune")
    print(f"[ray_cifar] data: {dataset.source}; resolved config: {output}/config.yaml", flush=True)
    trials = run_study(cfg, output)
    failed = [t for t in trials if t["status"] == STATUS_FAILED]
    return 1 if failed and len(failed) == len(trials) else 0


if __name__ == "__main__":
    sys.exit(main())
