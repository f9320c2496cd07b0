"""Presets that rewrite a whole study: --smoke-test (CPU-sized) and --budget-scale (every length times X)."""

from __future__ import annotations

import math
from typing import Any

from .loading import apply_overrides, flatten
from .schema import Config, ConfigError
from .search import MODEL_BASED_SEARCHERS, map_searched

# What --smoke-test changes: a study that finishes on 2 CPU cores in minutes and
# still shows ASHA stopping trials. Search-space lists are cut to two values each: the first and the last.
SMOKE_OVERRIDES = {
    "model": {"name": "resnet", "blocks": [1, 1, 1], "widths": [16, 32, 64], "stem_width": 16},
    "data": {"train_subset": 8000, "val_size": 2000},
    "train": {"epochs": 6, "num_workers": 2, "global_batch_size": 128},
    "tune": {"grace_period": 1, "reduction_factor": 2.0, "max_epochs": None, "num_samples": 1},
}
SMOKE_VALUES_PER_KEY = 2
SMOKE_MAX_BATCH = 256  # searched batch sizes above this are cut to it (a smoke run has a few thousand images)
SMOKE_MAX_STEPS = 300  # a train.max_steps study (fixed or searched) runs at most this many steps
# num_samples 1 is one trial per grid point; where num_samples is the whole study it would be one trial: a
# population of one exploits nothing, and one drawn trial searches nothing (nor does BOHB's HyperBand stop any).
SMOKE_POPULATION = 2  # PBT/PB2 members (at most the study's own)
SMOKE_SEARCH_TRIALS = 4  # trials of tune.search random or a model-based searcher (at most the study's own)

# The train split SMOKE_OVERRIDES' data sizes are cut from (its schedule lengths are scaled against a run on it).
CIFAR10_TRAIN_IMAGES = 50_000

# Every training length, for --budget-scale: (key, is an integer count).
LENGTH_KEYS = {
    "train.epochs": True, "train.max_steps": True, "tune.max_epochs": True, "tune.grace_period": True,
    "schedule.warmup_epochs": False, "schedule.t_max_epochs": False, "schedule.step_every_epochs": False,
    "schedule.step_every_iters": True, "schedule.milestones_epochs": False,
}
# The schedule's lengths, which --smoke-test scales (its presets set the run's length): (key, counted in optimizer
# steps rather than epochs).
SCHEDULE_LENGTH_KEYS = {key: in_steps for key, in_steps in LENGTH_KEYS.items() if key.startswith("schedule.")}


def smoke_values(values: list) -> list:
    """A searched list cut to SMOKE_VALUES_PER_KEY: its first and its last (then evenly between). The first two
    alone cut a study of hand-made rows to its opening rows: resnet18_erasing_sweep's smoke ran two lr rows and no
    erasing one, the same run as resnet18_lr_schedule_wd's."""
    n = SMOKE_VALUES_PER_KEY
    if len(values) <= n:
        return list(values)
    return [values[round(i * (len(values) - 1) / (n - 1))] for i in range(n)]


def run_length(cfg: Config, num_train_images: int = CIFAR10_TRAIN_IMAGES) -> tuple[int, int]:
    """(optimizer steps, steps per epoch) of a run of `cfg`'s fixed values on a train split of `num_train_images`
    (CIFAR-10's by default): a train.max_steps run's epochs follow from its batch size and split, as they will."""
    t = cfg.train
    # The sampler's count (the last partial batch dropped); an invalid batch size is validate's to name.
    steps_per_epoch = max(1, cfg.data.train_count(num_train_images) // max(1, t.global_batch_size))
    return (t.max_steps if t.max_steps is not None else t.epochs * steps_per_epoch), steps_per_epoch


def apply_smoke(cfg: Config) -> None:
    """--smoke-test: SMOKE_OVERRIDES, also inside the search space, and two values per searched key. The schedule's
    lengths keep their share of the run: a decay every 20 of 50 epochs is one every 2.4 of the smoke run's 6 (it
    was left at 20, and a smoke run never decayed: the schedule went untried)."""
    val_fraction, num_samples, max_epochs = cfg.data.val_fraction, cfg.tune.num_samples, cfg.tune.max_epochs
    own_steps, own_steps_per_epoch = run_length(cfg)
    apply_overrides(cfg, SMOKE_OVERRIDES)
    if cfg.tune.search == "bohb":  # its HyperBand's budget, in epochs: the smoke run's
        cfg.tune.max_epochs = min(max_epochs or cfg.train.epochs, cfg.train.epochs)
    if cfg.tune.scheduler in ("pbt", "pb2"):
        cfg.tune.num_samples = min(num_samples, SMOKE_POPULATION)
        cfg.tune.max_concurrent_trials = SMOKE_POPULATION  # members side by side, not taking turns (a restart each)
    elif cfg.tune.search in ("random", *MODEL_BASED_SEARCHERS):
        cfg.tune.num_samples = min(num_samples, SMOKE_SEARCH_TRIALS)
    if val_fraction is not None:  # a study split by fraction keeps its fraction
        cfg.data.val_size = None
    if cfg.train.max_steps is not None:
        cfg.train.max_steps = min(cfg.train.max_steps, SMOKE_MAX_STEPS)
    smoke_steps, smoke_steps_per_epoch = run_length(cfg)
    share = {True: smoke_steps / own_steps,  # by SCHEDULE_LENGTH_KEYS' unit: steps, or epochs
             False: (smoke_steps / smoke_steps_per_epoch) / (own_steps / own_steps_per_epoch)}
    for key, in_steps in SCHEDULE_LENGTH_KEYS.items():
        name = key.split(".")[1]
        setattr(cfg.schedule, name, _scale_length(key, getattr(cfg.schedule, name), share[in_steps]))
    if cfg.tune.perturbation_interval >= cfg.train.epochs:  # else kept: each perturbation restarts a member
        cfg.tune.perturbation_interval = max(1, round(cfg.tune.perturbation_interval * share[False]))
    for key, spec in list(cfg.tune.search_space.items()):
        if isinstance(spec, dict) and len(spec) == 1:
            kind, values = next(iter(spec.items()))
            if kind in ("grid", "choice") and isinstance(values, list):
                cfg.tune.search_space[key] = {kind: smoke_values(values)}
    smoke = flatten(SMOKE_OVERRIDES)

    def shrink(key: str, value: Any) -> Any:
        if key == "train.global_batch_size":
            return min(value, SMOKE_MAX_BATCH)  # batch sizes that fit a few thousand images
        if key == "train.max_steps" and value is not None:
            return min(value, SMOKE_MAX_STEPS)
        if key == "data.val_size" and value is None:
            return None
        if key in SCHEDULE_LENGTH_KEYS:  # against the study's own length (a row's own train.epochs is not seen)
            return _scale_length(key, value, share[SCHEDULE_LENGTH_KEYS[key]])
        return smoke.get(key, value)
    map_searched(cfg, shrink)


def _scale_length(key: str, value: Any, scale: float) -> Any:
    if value is None or key not in LENGTH_KEYS:
        return value
    if isinstance(value, list):
        return [v * scale for v in value]
    return max(1, round(value * scale)) if LENGTH_KEYS[key] else value * scale


def apply_budget_scale(cfg: Config, scale: float) -> None:
    """Multiply every training length (LENGTH_KEYS), fixed or searched, by `scale` (0.1: a tenth)."""
    if not (scale > 0 and math.isfinite(scale)):
        raise ConfigError(f"--budget-scale: must be > 0 (got {scale!r})")
    for key in LENGTH_KEYS:
        section, name = key.split(".")
        obj = getattr(cfg, section)
        setattr(obj, name, _scale_length(key, getattr(obj, name), scale))
    map_searched(cfg, lambda key, value: _scale_length(key, value, scale))
