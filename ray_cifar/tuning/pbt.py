"""Population based training (PBT, PB2) on ray_cifar's own checkpoints, surviving a driver restart.

Ray's PopulationBasedTraining exploits through Tune checkpoints: it hands the donor's
checkpoint to the weak trial, which a function trainable reads back with `tune.get_checkpoint()`.
ray_cifar's trials keep their state in their own run folders instead (CheckpointStore for one
rank, Ray Train's run for DDP, which only forwards a checkpoint *path* to Tune), so here an
exploit is a new config and nothing else: the donor's values, explored, plus the lineage
(`pbt_lineage`: generation, donor trial id and generation). Tune pauses the trial and starts it
again with that config; the trial (ray_cifar.tuning.trial) trains generation n in a run of its own,
started from a copy of the donor's latest checkpoint, and `checkpoint.restore` keeps the new
values over the donor's (lr, weight decay, momentum; the loader and loss are built from them).

Decisions (Ray's): every `perturbation_interval` epochs a trial in the bottom `quantile` of the
population's latest scores copies one of the top `quantile`. Added here:
- a donor must have reached the trial's epoch (a trial never trains an epoch twice, so its rows
  stay one per epoch), and no decision at a trial's last epoch (nothing left to train);
- a trial whose donors are all behind its epoch waits, paused, until one reaches it, and is judged
  again then (Ray has used up its interval: members trained side by side lost most decisions so);
  it goes on alone if it is no longer in the bottom quantile or no donor can come (`Lineage._judge_waiting`);
- the trial keeps its own train.seed (its data order and augmentation draws stay its own);
- explored values stay inside their search-space entry (x 0.8 / x 1.2 clipped to the range);
- after `Tuner.restore`, each trial's latest score and decision epoch come back from the rows, and
  PB2's data (what its model learns from) too (Ray's scheduler state does not survive a restore; the
  lineage does, in the trials' configs);
- a member's earlier generations keep only the checkpoint of its best epoch, if one of them holds it
  (the test split may evaluate it): every exploit used to leave a run folder of up to three
  checkpoints behind (`Lineage._drop_old_generations`).

The additions are the mixin `Lineage` (.lineage); PB2's class is in .pb2, imported only by a PB2 study.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from ray import tune
from ray.tune.schedulers import PopulationBasedTraining

from ..config import Config, ConfigError, pbt_mutated_keys as mutated_keys
from .lineage import Lineage

RANGES = ("uniform", "loguniform", "randint")


def mutations(cfg: Config) -> dict[str, Any]:
    """PBT's hyperparam_mutations: a list for grid/choice entries (explore steps to a neighbour), a Tune
    domain for ranges (explore multiplies by 0.8 or 1.2, or resamples)."""
    makers = {"uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
              "randint": lambda v: tune.randint(v[0], v[1] + 1)}
    out = {}
    for key in mutated_keys(cfg):
        kind, values = next(iter(cfg.tune.search_space[key].items()))
        out[key] = list(values) if kind in ("grid", "choice") else makers[kind](values)
    return out


def bounds(cfg: Config) -> dict[str, tuple[float, float]]:
    """[low, high] of every perturbed range entry: explored values are clipped into it."""
    out = {}
    for key in mutated_keys(cfg):
        kind, values = next(iter(cfg.tune.search_space[key].items()))
        if kind in RANGES:
            out[key] = (values[0], values[1])
    return out


def pb2_bounds(cfg: Config) -> dict[str, list[float]]:
    """PB2's hyperparam_bounds: PB2 models values on a continuous range, so every perturbed entry must be one."""
    for key in mutated_keys(cfg):
        kind = next(iter(cfg.tune.search_space[key]))
        if kind not in RANGES:
            raise ConfigError(f"tune.search_space.{key}: PB2 perturbs ranges only ({', '.join(RANGES)}), not a "
                              f"{kind} list; use tune.scheduler pbt, or give {key} a range")
    return {key: list(b) for key, b in bounds(cfg).items()}


class RestorablePBT(Lineage, PopulationBasedTraining):
    """PopulationBasedTraining(time_attr="epoch") over ray_cifar's checkpoints, restorable (module docstring).

    Args:
        output: the study's folder (its rows rebuild each trial's last score after a restore).
        hyperparam_mutations: `mutations(cfg)`; limits: `bounds(cfg)` (explored values are clipped into them).
        perturbation_interval: epochs; quantile_fraction, resample_probability: as Ray's.
    """

    label = "pbt"

    def __init__(self, output: str, limits: dict[str, tuple[float, float]], storage_path: str | None = None,
                 all_at_once: bool = False, record: Callable[[Any, dict], None] | None = None, **pbt_args: Any):
        super().__init__(time_attr="epoch", log_config=False, **pbt_args)
        self._setup(output, limits, storage_path, all_at_once, record)


def create_pbt(cfg: Config, output: str, storage_path: str | None = None, all_at_once: bool = False,
               record: Callable[[Any, dict], None] | None = None) -> PopulationBasedTraining:
    """The scheduler of tune.scheduler pbt or pb2; metric and mode come from the TuneConfig. `storage_path`: the
    trials' run folders (None: decisions only, for tests); `all_at_once`: every member runs concurrently;
    `record(trial, result)`: writes the result's row before the scheduler decides on it (Lineage.on_trial_result)."""
    # Ray's explore (resample or x0.8 / x1.2) and the choice among donors draw from Python's `random`: seeded, a
    # study's schedule follows train.seed as its first draws do (two runs of the PBT smoke went 0.081 -> 0.114 and
    # 0.081 -> 0.065). Only as far as the members report in the same order: that is the machine's timing.
    random.seed(cfg.train.seed)
    common = dict(perturbation_interval=cfg.tune.perturbation_interval, quantile_fraction=cfg.tune.pbt_quantile,
                  storage_path=storage_path, all_at_once=all_at_once, record=record)
    if cfg.tune.scheduler == "pb2":
        try:
            import sklearn  # noqa: F401 - PB2's Gaussian process
        except ImportError:
            raise ConfigError("tune.scheduler: pb2 needs scikit-learn: pip install 'ray_cifar[search]'") from None
        from .pb2 import RestorablePB2  # here: PB2's module imports scikit-learn (~1 s), at every driver's start

        limits = pb2_bounds(cfg)
        return RestorablePB2(output, {k: tuple(v) for k, v in limits.items()}, hyperparam_bounds=limits, **common)
    return RestorablePBT(output, bounds(cfg), hyperparam_mutations=mutations(cfg),
                         resample_probability=cfg.tune.pbt_resample_p, **common)


def __getattr__(name: str):
    # A study saved before RestorablePB2 moved to .pb2 pickled its scheduler under this module's name.
    if name == "RestorablePB2":
        from .pb2 import RestorablePB2

        return RestorablePB2
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
