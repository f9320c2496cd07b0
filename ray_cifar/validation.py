"""Checks a config's values (those types alone cannot), and hands out checked configs.

Above the registries (the model, optimizer and schedule names come from them) and below
everything that trains: `load_config`, `trial_config` and `config_from_dict` are how code gets a
Config it can trust. Every problem is a ConfigError with one line naming the key; the entry
points print it and exit 2 before any work. `check_against_data` and `check_resources` are the
checks that need the dataset's size or the machine's CPUs/GPUs, over every trial of a study.

    cfg = load_config("studies/x.yaml", sets=["train.epochs=5"])
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import re
from typing import Any, Callable

from .config import loading, presets
from .config.schema import (PUBLISHED_METRICS, SEARCH_KINDS, Config, ConfigError, DataConfig, ModelConfig,
                            OptimConfig, ScheduleConfig, TrainConfig, TuneConfig)
from .config.search import (MODEL_BASED_SEARCHERS, apply_searched, pbt_mutated_keys, sampled_config, search_keys,
                            trial_configs)


def load_config(path: str | None = None, sets: list[str] = (), smoke_test: bool = False,
                budget_scale: float = 1.0) -> Config:
    """Defaults, then the YAML file, then --smoke-test, then --set, then the budget scale; validated."""
    cfg = Config()
    study = None
    if path is not None:
        for file, overrides in loading.read_config_chain(path):
            try:
                loading.apply_overrides(cfg, overrides)
            except ConfigError as e:  # a key misspelt in a file it extends was named as if in the one given
                raise ConfigError(f"{file}: {e}") from None
        study = copy.deepcopy(cfg) if cfg.published else None  # the study as its file has it
    if smoke_test:
        presets.apply_smoke(cfg)
    for assignment in sets:
        try:
            loading.set_value(cfg, *loading.parse_set(assignment))
        except ConfigError as e:
            raise ConfigError(f"--set {assignment}: {e}") from None
    if budget_scale != 1.0:
        presets.apply_budget_scale(cfg, budget_scale)
    try:
        validate(cfg)
        _check_study_searches(cfg)
    except ConfigError as e:
        raise ConfigError(name_the_set(str(e), sets)) from None
    if study is not None:
        pin_published_runs(cfg, study)
    return cfg


def name_the_set(message: str, sets: list[str]) -> str:
    """A refusal of a value a --set gave, the --set named first, as a misspelt key's is: "tune.search_space.optim.lr:
    expected one of {grid, ...}" read as if in the study file when a --set had written the whole space. The last
    --set of the refused field, of a section above it or of a field inside it (the checks see only the result)."""
    key = message.split(": ", 1)[0]
    if message.startswith("--set ") or not re.fullmatch(r"[\w.]+", key):
        return message
    for assignment in reversed(sets):
        field = loading.parse_set(assignment)[0]
        if field == key or key.startswith(field + ".") or field.startswith(key + "."):
            return f"--set {assignment}: {message}"
    return message


def _check_study_searches(cfg: Config) -> None:
    """A study's search that has nothing to search. (validate cannot tell: a trial's own config, its search space
    emptied, is a valid one.) PBT with an empty space was refused only once Ray had started, its output folder
    removed after the `--resume` line was printed; a model-based searcher drew tune.num_samples identical trials."""
    if cfg.tune.search_space:
        return
    if cfg.tune.scheduler in ("pbt", "pb2"):
        pbt_mutated_keys(cfg)  # its one line: nothing to perturb
    _check(cfg.tune.search not in MODEL_BASED_SEARCHERS, "tune.search",
           f"{cfg.tune.search} draws trials from tune.search_space, which is empty: every trial would be alike. "
           f"Give it fields to search, or tune.search grid (tune.num_samples then gives seed replicates)",
           cfg.tune.search)


def config_from_dict(d: dict[str, Any]) -> Config:
    """A Config from its to_dict() form (config.yaml, a checkpoint, a Ray trial's arguments); validated."""
    cfg = Config()
    loading.apply_overrides(cfg, d)
    validate(cfg)
    return cfg


def trial_config(base: dict[str, Any], sampled: dict[str, Any]) -> Config:
    """The config of one trial: the study's resolved config plus its sampled values; validated."""
    cfg = sampled_config(base, sampled)
    validate_fixed(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Check values that types alone cannot; also every value of the search space."""
    validate_fixed(cfg)
    _validate_search_space(cfg)


def validate_fixed(cfg: Config) -> None:
    """Check the fixed values (the search space's values are another matter: validate)."""
    _validate_data(cfg.data)
    _validate_model(cfg.model)
    _validate_optim(cfg.optim)
    _validate_schedule(cfg.schedule)
    _validate_train(cfg.train)
    _validate_tune(cfg.tune, cfg.train)
    _validate_published(cfg.published)


def _check(ok: bool, key: str, msg: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg} (got {value!r})")


def _check_name(key: str, value: str, allowed: list[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: unknown '{value}' (allowed: {', '.join(sorted(allowed))})")


def _check_range(key: str, pair: list[float], low: float, high: float) -> None:
    _check(len(pair) == 2 and low <= pair[0] <= pair[1] <= high, key,
           f"must be [min, max] with {low} <= min <= max <= {high}", pair)


def _validate_data(d: DataConfig) -> None:
    if (d.val_size is None) == (d.val_fraction is None):
        raise ConfigError(f"data.val_fraction: set exactly one of data.val_size and data.val_fraction, the other "
                          f"null (got val_size={d.val_size!r}, val_fraction={d.val_fraction!r})")
    # No validation split: every epoch read val_acc 0.0, the best epoch was the first, and the test split evaluated
    # that. Trials, epochs and points are chosen on validation only.
    _check(d.val_size is None or d.val_size >= 1, "data.val_size",
           "must be >= 1: trials, epochs and ASHA's cuts are chosen on the validation split", d.val_size)
    _check(d.val_fraction is None or 0 < d.val_fraction < 1, "data.val_fraction",
           "must be in (0, 1): trials, epochs and ASHA's cuts are chosen on the validation split", d.val_fraction)
    _check(d.train_subset is None or d.train_subset > 0, "data.train_subset", "must be > 0 or null", d.train_subset)
    _check(d.split_seed >= 0, "data.split_seed", "must be >= 0", d.split_seed)  # numpy's generators refuse less
    _check_name("data.pipeline", d.pipeline, ["auto", "dali", "torch"])
    _validate_augmentation(d)


def _validate_augmentation(d: DataConfig) -> None:
    for name in ("flip_p", "erasing_p", "cutout_p", "mixup_p", "cutmix_p"):
        value = getattr(d, name)
        _check(0.0 <= value <= 1.0, f"data.{name}", "must be a probability in [0, 1]", value)
    _check(0 <= d.crop_padding <= 16, "data.crop_padding", "must be in [0, 16] pixels", d.crop_padding)
    _check(0 <= d.crop_fill <= 255, "data.crop_fill", "must be a pixel value in [0, 255]", d.crop_fill)
    if d.autoaugment is not None:
        _check_name("data.autoaugment", d.autoaugment, ["cifar10"])
    for name in ("jitter_brightness", "jitter_contrast", "jitter_saturation"):
        value = getattr(d, name)
        _check(0.0 <= value <= 1.0, f"data.{name}", "must be in [0, 1] (a factor range around 1)", value)
    _check(0.0 <= d.jitter_hue <= 0.5, "data.jitter_hue", "must be in [0, 0.5] turns", d.jitter_hue)
    _check(0.0 <= d.rotation_degrees <= 180.0, "data.rotation_degrees", "must be in [0, 180]", d.rotation_degrees)
    _check_range("data.erasing_scale", d.erasing_scale, 0.0, 1.0)
    _check(d.erasing_scale[1] > 0, "data.erasing_scale", "max must be > 0", d.erasing_scale)
    _check(len(d.erasing_ratio) == 2 and 0 < d.erasing_ratio[0] <= d.erasing_ratio[1], "data.erasing_ratio",
           "must be [min, max] with 0 < min <= max", d.erasing_ratio)
    _check_name("data.erasing_fill", d.erasing_fill, ["zero", "mean", "random"])
    _check(0 <= d.cutout_size <= 32, "data.cutout_size", "must be in [0, 32] pixels", d.cutout_size)
    for name in ("mixup_alpha", "cutmix_alpha"):
        value = getattr(d, name)
        _check(value > 0 and math.isfinite(value), f"data.{name}", "must be > 0", value)
    _check(d.mixup_p + d.cutmix_p <= 1.0 + 1e-9, "data.cutmix_p",
           f"must be <= 1 - data.mixup_p={d.mixup_p} (one of the two per batch at most)", d.cutmix_p)


def _validate_model(m: ModelConfig) -> None:
    from . import models  # the registry (torch is imported on the first check, not at import)

    _check_name("model.name", m.name, models.list_models())
    for key, seq in (("model.blocks", m.blocks), ("model.widths", m.widths)):
        _check(seq is None or (len(seq) > 0 and all(v > 0 for v in seq)), key, "must be positive integers", seq)
    _check(m.stem_width is None or m.stem_width > 0, "model.stem_width", "must be > 0", m.stem_width)
    # What the model will be built with: a null field keeps the registry entry's own (a model built with blocks of
    # one length and the entry's widths of another failed at build time, with a traceback).
    entry = models.entry_defaults(m.name)
    blocks = m.blocks if m.blocks is not None else entry.get("blocks")
    widths = m.widths if m.widths is not None else entry.get("widths")
    if m.blocks is not None and m.widths is not None:
        _check(len(m.blocks) == len(m.widths), "model.widths", "needs one width per stage of model.blocks", m.widths)
    elif blocks is not None and widths is not None and len(blocks) != len(widths):
        key, other, given, kept = (("model.blocks", "widths", m.blocks, widths) if m.blocks is not None
                                   else ("model.widths", "blocks", m.widths, blocks))
        raise ConfigError(f"{key}: {len(given)} stages, but {m.name}'s own {other} has {len(kept)} ({list(kept)}): set "
                          f"model.{other} too, one per stage (got {given!r})")
    _check_name("model.norm", m.norm, ["batch", "group"])
    if m.norm == "group" and widths is not None:
        stem = m.stem_width or entry.get("stem_width")  # null: the first width's, checked with the widths
        for key, channels in [("model.stem_width", stem)] * bool(stem) + [("model.widths", w) for w in widths]:
            _check(channels % models.norm_groups(channels) == 0, key,
                   f"with model.norm group every layer's channels must split into {models.norm_groups(channels)} "
                   f"equal groups: {channels} does not", m.widths if key == "model.widths" else m.stem_width)
    _check(m.num_classes >= 10, "model.num_classes", "must be >= 10: CIFAR-10's labels are 0-9", m.num_classes)
    _check(0 <= m.dropout < 1, "model.dropout", "must be a probability in [0, 1)", m.dropout)
    if m.max_params is not None:
        n = models.count_config_parameters(m)  # built on the meta device: no memory, no init time
        _check(n <= m.max_params, "model.max_params", f"the model has {n:,} parameters, more than {m.max_params:,}",
               m.max_params)


def _validate_optim(o: OptimConfig) -> None:
    from . import optim  # the registry

    _check_name("optim.name", o.name, optim.list_optimizers())
    _check(o.lr > 0 and math.isfinite(o.lr), "optim.lr", "must be > 0", o.lr)
    _check(0 <= o.momentum < 1, "optim.momentum", "must be in [0, 1)", o.momentum)
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0", o.weight_decay)
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "must be two values in [0, 1)", o.betas)
    _check(o.eps > 0, "optim.eps", "must be > 0", o.eps)
    _check(0 <= o.dampening < 1, "optim.dampening", "must be in [0, 1)", o.dampening)
    _check(not (o.name == "sgd" and o.nesterov and o.momentum > 0 and o.dampening > 0), "optim.dampening",
           "Nesterov momentum needs dampening 0 (or set optim.nesterov: false)", o.dampening)
    _check(o.adagrad_lr_decay >= 0, "optim.adagrad_lr_decay", "must be >= 0", o.adagrad_lr_decay)
    _check(o.asgd_lambd >= 0, "optim.asgd_lambd", "must be >= 0", o.asgd_lambd)
    _check(o.asgd_alpha >= 0, "optim.asgd_alpha", "must be >= 0", o.asgd_alpha)
    _check(o.asgd_t0 >= 0, "optim.asgd_t0", "must be >= 0", o.asgd_t0)
    _check(o.lookahead_k is None or o.lookahead_k >= 1, "optim.lookahead_k", "must be >= 1 or null", o.lookahead_k)
    _check(0 < o.lookahead_alpha <= 1, "optim.lookahead_alpha", "must be in (0, 1]", o.lookahead_alpha)


def _validate_schedule(s: ScheduleConfig) -> None:
    from . import optim  # the schedule registry

    _check_name("schedule.name", s.name, optim.list_schedules())
    _check(s.warmup_epochs >= 0, "schedule.warmup_epochs", "must be >= 0", s.warmup_epochs)
    _check(s.eta_min >= 0, "schedule.eta_min", "must be >= 0", s.eta_min)
    _check(s.t_max_epochs is None or s.t_max_epochs > 0, "schedule.t_max_epochs", "must be > 0 or null",
           s.t_max_epochs)
    _check(s.gamma > 0, "schedule.gamma", "must be > 0", s.gamma)
    _check(s.step_every_iters is None or s.step_every_iters >= 1, "schedule.step_every_iters", "must be >= 1 or null",
           s.step_every_iters)
    _check(s.step_every_epochs is None or s.step_every_epochs > 0, "schedule.step_every_epochs",
           "must be > 0 or null", s.step_every_epochs)
    if s.name == "step" and (s.step_every_iters is None) == (s.step_every_epochs is None):
        raise ConfigError(f"schedule.step_every_iters: the step schedule needs exactly one of step_every_iters and "
                          f"step_every_epochs (got {s.step_every_iters!r} and {s.step_every_epochs!r})")
    m = s.milestones_epochs
    _check(all(v > 0 for v in m) and m == sorted(m), "schedule.milestones_epochs", "must be increasing and > 0", m)
    _check(s.name != "multistep" or len(m) > 0, "schedule.milestones_epochs", "multistep needs at least one", m)
    _check(0 < s.onecycle_pct_start < 1, "schedule.onecycle_pct_start", "must be in (0, 1)", s.onecycle_pct_start)
    _check(s.onecycle_div_factor > 0, "schedule.onecycle_div_factor", "must be > 0", s.onecycle_div_factor)
    _check(s.onecycle_final_div_factor > 0, "schedule.onecycle_final_div_factor", "must be > 0",
           s.onecycle_final_div_factor)


def _validate_train(t: TrainConfig) -> None:
    _check(t.epochs >= 1, "train.epochs", "must be >= 1", t.epochs)
    _check(t.seed >= 0, "train.seed", "must be >= 0", t.seed)
    _check(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "must be >= 1 or null", t.max_steps)
    _check(t.global_batch_size >= 1, "train.global_batch_size", "must be >= 1", t.global_batch_size)
    _check(t.eval_batch_size is None or t.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1 or null",
           t.eval_batch_size)
    _check(t.num_workers >= 1, "train.num_workers", "must be >= 1", t.num_workers)
    _check(t.global_batch_size % t.num_workers == 0, "train.global_batch_size",
           f"must be divisible by train.num_workers={t.num_workers} (each rank gets an equal share)", t.global_batch_size)
    _check(t.cpus_per_worker > 0, "train.cpus_per_worker", "must be > 0", t.cpus_per_worker)
    _validate_gpu_share(t)
    _check_name("train.amp", t.amp, ["auto", "bf16", "fp16", "fp32"])
    _check(0 <= t.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)", t.label_smoothing)
    _check(t.torch_threads is None or t.torch_threads >= 1, "train.torch_threads", "must be >= 1", t.torch_threads)
    _check(t.max_failures >= 0, "train.max_failures", "must be >= 0", t.max_failures)
    _check_name("train.placement_strategy", t.placement_strategy, ["PACK", "SPREAD", "STRICT_SPREAD"])


def _validate_gpu_share(t: TrainConfig) -> None:
    """train.gpus_per_worker: one GPU or a share of one per rank; a share only for a trial of one rank."""
    _check(0 < t.gpus_per_worker <= 1, "train.gpus_per_worker",
           "must be in (0, 1]: a rank trains on one GPU (for more GPUs per trial raise train.num_workers)",
           t.gpus_per_worker)
    # Ray Train sets every rank's CUDA_VISIBLE_DEVICES to the union of its run's GPU ids (so NCCL can
    # connect them): ranks on shares of one GPU all pick that GPU, and NCCL refuses a GPU used twice.
    _check(t.gpus_per_worker == 1 or t.num_workers == 1, "train.gpus_per_worker",
           f"a share of a GPU needs train.num_workers 1, not {t.num_workers}: Ray Train gives every rank of a "
           f"trial the union of its GPU ids, so ranks on shares of one GPU land on the same device and NCCL "
           f"refuses it (Duplicate GPU); pack 1-rank trials, or use whole GPUs for DDP", t.gpus_per_worker)


def _validate_tune(u: TuneConfig, t: TrainConfig) -> None:
    _check_name("tune.scheduler", u.scheduler, ["asha", "fifo", "pbt", "pb2"])
    _check_name("tune.search", u.search, ["grid", "random", "optuna", "hyperopt", "bohb"])
    _check(u.perturbation_interval >= 1, "tune.perturbation_interval", "must be >= 1 epoch", u.perturbation_interval)
    _check(0 < u.pbt_quantile <= 0.5, "tune.pbt_quantile", "must be in (0, 0.5]", u.pbt_quantile)
    _check(0 <= u.pbt_resample_p <= 1, "tune.pbt_resample_p", "must be a probability in [0, 1]", u.pbt_resample_p)
    _check_name("tune.mode", u.mode, ["max", "min"])
    _check_name("tune.tracking", u.tracking, ["none", "mlflow", "wandb"])
    _check_name("tune.metric", u.metric, ["val_acc", "val_loss", "train_acc", "train_loss"])
    best = "min" if u.metric.endswith("loss") else "max"  # with the other mode the worst trial ranked first
    _check(u.mode == best, "tune.mode", f"{u.metric} is best at its {'lowest' if best == 'min' else 'highest'}: "
           f"set tune.mode {best}", u.mode)
    _check_name("tune.time_attr", u.time_attr, ["epoch", "steps"])
    _check(u.time_attr == "epoch" or (u.scheduler in ("asha", "fifo") and u.search != "bohb"), "tune.time_attr",
           "steps is ASHA's clock; PBT/PB2 decide and BOHB's HyperBand counts in epochs", u.time_attr)
    _check_name("tune.test", u.test, ["best", "all"])
    _check(u.grace_period >= 1, "tune.grace_period", f"must be >= 1 {u.time_attr}", u.grace_period)
    _check(u.max_failures >= 0, "tune.max_failures", "must be >= 0", u.max_failures)
    _check(u.reduction_factor > 1, "tune.reduction_factor", "must be > 1", u.reduction_factor)
    _check(u.brackets >= 1, "tune.brackets", "must be >= 1", u.brackets)
    if u.time_attr == "steps":
        _check(u.max_epochs is None, "tune.max_epochs", "must be null with tune.time_attr steps "
               "(the top rung is train.max_steps)", u.max_epochs)
        _check(t.max_steps is None or u.grace_period <= t.max_steps, "tune.grace_period",
               f"must be <= train.max_steps={t.max_steps} (time_attr steps)", u.grace_period)
    elif t.max_steps is None:
        max_epochs = u.max_epochs if u.max_epochs is not None else t.epochs
        _check(1 <= max_epochs <= t.epochs, "tune.max_epochs", f"must be in [1, train.epochs={t.epochs}]", u.max_epochs)
        _check(u.grace_period <= max_epochs, "tune.grace_period", f"must be <= max epochs ({max_epochs})",
               u.grace_period)
    else:  # the epochs follow from max_steps and the data, known only when training starts
        _check(u.max_epochs is None or u.max_epochs >= u.grace_period, "tune.max_epochs",
               f"must be >= tune.grace_period={u.grace_period}", u.max_epochs)
        _check(u.max_epochs is not None or u.search != "bohb", "tune.max_epochs",
               "must be set for tune.search bohb with train.max_steps (its HyperBand's budget, in epochs)",
               u.max_epochs)
    _check(u.num_samples >= 1, "tune.num_samples", "must be >= 1", u.num_samples)
    _check(u.max_concurrent_trials is None or u.max_concurrent_trials >= 1, "tune.max_concurrent_trials",
           "must be >= 1 or null", u.max_concurrent_trials)
    _check(u.trial_driver_cpus >= 0, "tune.trial_driver_cpus", "must be >= 0", u.trial_driver_cpus)
    _check(u.num_cpus is None or u.num_cpus >= 1, "tune.num_cpus", "must be >= 1 or null", u.num_cpus)
    # Ray Train's controller and placement-group cleaner ask the state API (the dashboard's) whether a DDP trial's
    # actors live: without it they warn every few seconds and a dead trial's placement group is never removed.
    _check(u.dashboard or t.num_workers == 1, "tune.dashboard",
           f"false needs one-rank trials, not train.num_workers {t.num_workers}: Ray Train watches a DDP trial "
           f"through the dashboard's state API", u.dashboard)


PUBLISHED_KEYS = ("where", "value", "metric", "source")
PUBLISHED_RUN = "run"  # a published entry's run: filled in from the study file (pin_published_runs), not written
PUBLISHED_RUN_KEYS = ("train.epochs", "train.max_steps", "data.train_subset")  # and every model.* field


def pin_published_runs(cfg: Config, study: Config) -> None:
    """Each published entry of `cfg` gets `run`: the model and length of the trials of `study` (its file's config)
    that its `where` names (a length the study searches included), where `where` names neither and those trials
    agree. The figure is of that run, so the report matches it only to trials of it: a --smoke-test, --budget-scale
    or --set of them matches none (a 3-epoch run of the smoke ResNet stood beside a 50-epoch ResNet-18's figure,
    with no word). A study file whose own trials cannot be listed (a search space only its --set makes valid) keeps
    its entries as written. (Listed, not validated again: a second validate of the study doubled load_config's
    time, 0.30 s against 0.16 for resnet_under_5m, whose trials' models it builds for model.max_params.)"""
    try:
        trials = [loading.flatten(trial.to_dict()) for _, trial in trial_configs(study)]
    except (ConfigError, AttributeError, TypeError, ValueError):  # a malformed space: validate names cfg's
        return
    for entry in cfg.published:
        if PUBLISHED_RUN in entry:
            continue
        where = entry["where"]
        runs = [t for t in trials if all(t.get(k) == v for k, v in where.items())] or trials
        keys = [k for k in runs[0] if k.startswith("model.") or k in PUBLISHED_RUN_KEYS]
        entry[PUBLISHED_RUN] = {k: runs[0][k] for k in keys
                                if k not in where and all(t.get(k) == runs[0][k] for t in runs)}


def _validate_published(published: list[dict]) -> None:
    """Each published figure: where (known section.field names, values of their types), value, metric, source."""
    for i, entry in enumerate(published):
        key = f"published[{i}]"
        _check(isinstance(entry, dict) and sorted(set(entry) - {PUBLISHED_RUN}) == sorted(PUBLISHED_KEYS), key,
               f"must be a mapping with exactly the keys {', '.join(PUBLISHED_KEYS)}", entry)
        where = entry["where"]
        _check(isinstance(where, dict) and len(where) > 0, f"{key}.where", "must be a mapping of section.field: value",
               where)
        run = entry.get(PUBLISHED_RUN, {})
        _check(isinstance(run, dict), f"{key}.{PUBLISHED_RUN}", "must be a mapping of section.field: value", run)
        for part, fields in (("where", where), (PUBLISHED_RUN, run)):
            for field_key, value in fields.items():
                _check("." in str(field_key), f"{key}.{part}", "keys must be section.field names", field_key)
                try:
                    loading.set_value(Config(), str(field_key), value)  # known key, value of the field's type
                except ConfigError as e:
                    raise ConfigError(f"{key}.{part}: {e}") from None
        value = entry["value"]
        _check(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 100, f"{key}.value",
               "must be an accuracy in percent, in [0, 100]", value)
        _check(entry["metric"] in PUBLISHED_METRICS, f"{key}.metric", f"must be one of {', '.join(PUBLISHED_METRICS)}",
               entry["metric"])
        _check(isinstance(entry["source"], str) and entry["source"].strip() != "", f"{key}.source",
               "must be a non-empty string", entry["source"])


def _validate_search_space(cfg: Config) -> None:
    _validate_search_kinds(cfg)
    for key, spec in cfg.tune.search_space.items():
        if not isinstance(key, str):
            raise ConfigError(f"tune.search_space: keys are 'section.field' names, got {key!r}")
        where = f"tune.search_space.{key}"
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SEARCH_KINDS):
            raise ConfigError(f"{where}: expected one of {{{', '.join(SEARCH_KINDS)}}}: [...] (got {spec!r})")
        if key.split(".")[0] == "tune":
            raise ConfigError(f"{where}: the tune section cannot itself be searched")
        kind, values = next(iter(spec.items()))
        _check(isinstance(values, list) and len(values) >= 1, where, f"{kind} needs a non-empty list", values)
        if kind not in ("grid", "choice"):
            numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            _check(len(values) == 2 and numbers and values[0] < values[1], where,
                   f"{kind} needs [low, high], two numbers with low < high", values)
            _check(kind != "loguniform" or values[0] > 0, where, "loguniform needs low > 0", values)
            # Both ends are integers and pass the checks below; every draw between them is a fraction, which the
            # first trial refused, ending the study.
            _check(kind == "randint" or not loading.is_integer_field(key), where,
                   f"{kind} draws fractions and {key} is an integer: use randint: [low, high] (high included)", spec)
    # Every key's shape first: the check of a value below may build trials from the other keys.
    for key, spec in cfg.tune.search_space.items():
        where = f"tune.search_space.{key}"
        for value in next(iter(spec.values())):  # every listed value; for a range, both ends
            trial = copy.deepcopy(cfg)
            trial.tune.search_space = {}
            try:
                apply_searched(trial, key, value)
                validate_fixed(trial)
            except ConfigError as e:
                # Against the fixed config alone; with the other searched values it may be fine (model.blocks
                # [1, 1] beside a searched model.widths [8, 16]): then only its clashes are wrong, named below.
                if not _fine_in_some_trial(cfg, key, value):
                    raise ConfigError(f"{where}: value {value!r}: {e}") from None
    # Each value was checked alone above (so a bad one is named by its key); values each fine alone can still
    # clash in one trial (mixup_p 0.6 with cutmix_p 0.6, blocks of one searched length with widths of another, a
    # share of a GPU with several ranks). Every trial the space can give, checked as the trial will check itself:
    # a clash found only when Tune made that trial ended the study mid-run, and every --resume again.
    for_each_trial(cfg, validate_fixed)


def _fine_in_some_trial(cfg: Config, key: str, value: Any) -> bool:
    if len(cfg.tune.search_space) < 2:
        return False
    try:
        for sampled, trial in trial_configs(cfg):  # (raises where another key's value is wrong for its field)
            if sampled.get(key) == value:
                try:
                    validate_fixed(trial)
                    return True
                except ConfigError:
                    pass
    except ConfigError:
        pass
    return False


def _check_search(cfg: Config) -> None:
    """What tune.search cannot express with this study, as one ConfigError line (no Ray, no searcher needed)."""
    search, scheduler = cfg.tune.search, cfg.tune.scheduler
    needs = {"optuna": ["optuna"], "hyperopt": ["hyperopt"], "bohb": ["hpbandster", "ConfigSpace"]}.get(search, [])
    key, needs = ("tune.scheduler", ["sklearn"]) if scheduler == "pb2" and not needs else ("tune.search", needs)
    missing = [name for name in needs if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"{key}: {search if key == 'tune.search' else scheduler} needs {' and '.join(missing)}, "
                          f"which is not installed: pip install 'ray_cifar[search]'")
    if search in MODEL_BASED_SEARCHERS and "train.seed" in cfg.tune.search_space:
        raise ConfigError(f"tune.search_space.train.seed: tune.search {search} would tune the seed as a "
                          f"hyper-parameter; remove it (every trial uses train.seed), or use tune.search grid for "
                          f"replicates")
    if search in MODEL_BASED_SEARCHERS and scheduler in ("pbt", "pb2"):
        raise ConfigError(f"tune.scheduler: {scheduler} evolves one population; it does not take trials from "
                          f"tune.search {search} (use tune.search grid or random with it)")


def _validate_search_kinds(cfg: Config) -> None:
    """What tune.search and tune.scheduler pbt/pb2 cannot do with this search space, in one line. A trial's
    own config (its search space emptied) has nothing to check."""
    if not cfg.tune.search_space:
        return
    _check_search(cfg)
    u = cfg.tune
    only_grids = u.search == "grid" and all(isinstance(spec, dict) and set(spec) == {"grid"}
                                            for spec in u.search_space.values())
    _check(not (only_grids and "train.seed" in u.search_space and u.num_samples > 1), "tune.num_samples",
           f"with train.seed searched by a grid, each of the {u.num_samples} samples is the whole grid again: every "
           f"trial would run {u.num_samples} times alike. Set it to 1 (the seed grid gives the replicates), or drop "
           f"train.seed from the search space (num_samples then gives the seeds train.seed, +1, ...)", u.num_samples)
    if cfg.tune.scheduler in ("pbt", "pb2"):
        pbt_mutated_keys(cfg)
        if cfg.tune.scheduler == "pb2":
            for key in pbt_mutated_keys(cfg):
                kind = next(iter(cfg.tune.search_space[key]))
                _check(kind in ("uniform", "loguniform", "randint"), f"tune.search_space.{key}",
                       f"PB2 perturbs ranges only (uniform, loguniform, randint), not a {kind} list; use "
                       f"tune.scheduler pbt, or give it a range", cfg.tune.search_space[key])


# ---------------------------------------------------------------------------
# Up-front checks that need the data or the machine: every trial of the study, before any trial runs.


def check_against_data(cfg: Config, num_train_images: int, searched: bool = True) -> None:
    """The split sizes against the dataset (`num_train_images` before the validation split), for the
    fixed config and, with `searched`, for every trial of the search space."""
    for_each_trial(cfg, lambda trial: _check_data(trial, num_train_images), searched)


def lengths_past_the_run(cfg: Config, num_train_images: int, searched: bool = True) -> list[str]:
    """A line for each length the run ends before, in the fixed config or (`searched`) in trials of the study: one
    per field and run length, with each value it has there and how many of the trials it is in. Each alone is a
    valid value, and the run trains, but as another study: a decay every 20 epochs of a 10-epoch run (--set
    train.epochs=10 on adam_batch_lr_grid) is a constant lr, a PBT interval of the whole run is a population never
    perturbed. Warned, not refused: a short trial run of a study stays one --set away."""
    trials = [t for _, t in trial_configs(cfg)] if searched and cfg.tune.search_space else [cfg]
    found: dict[tuple[str, str], tuple[list[Any], int]] = {}  # (field, what follows its value) -> (values, trials)
    for trial in trials:
        for key, value, rest in _lengths_past_the_run(trial, num_train_images):
            values, count = found.get((key, rest), ([], 0))
            found[(key, rest)] = (values + [value] * (value not in values), count + 1)
    lines = []
    for (key, rest), (values, count) in found.items():
        where = "" if count == len(trials) else f"{count} of the {len(trials)} trials: "
        lines.append(f"{where}{key}={' / '.join(map(str, values))}: {rest} (shorten it too, or shorten the run with "
                     f"--budget-scale X, which scales every length together)")
    return lines


def _lengths_past_the_run(cfg: Config, n: int) -> list[tuple[str, Any, str]]:
    """(field, its value, what the run does with it) for each length of `cfg` that the run ends before."""
    s, t, u = cfg.schedule, cfg.train, cfg.tune
    steps, steps_per_epoch = presets.run_length(cfg, n)
    run = (f"the run's {t.max_steps} steps (train.max_steps)" if t.max_steps is not None
           else f"the run's {t.epochs} epoch(s) (train.epochs)")
    found = []
    warmup = round(s.warmup_epochs * steps_per_epoch)
    if warmup >= steps:  # the lr at the run's last step: steps / warmup of optim.lr
        found.append(("schedule.warmup_epochs", s.warmup_epochs,
                      f"{run} are all warm-up; the lr climbs to {steps / warmup:.0%} of optim.lr, at the last step"))
    # The step of each decay the schedule names (a step schedule: its first; a multistep one: every milestone).
    key, decays = None, []
    if s.name == "step":
        key = "schedule.step_every_iters" if s.step_every_iters else "schedule.step_every_epochs"
        decays = [s.step_every_iters or round(s.step_every_epochs * steps_per_epoch)]
    elif s.name == "multistep":
        key, decays = "schedule.milestones_epochs", [round(m * steps_per_epoch) for m in s.milestones_epochs]
    reached = sum(d < steps for d in decays)
    if key and reached == 0:
        found.append((key, getattr(s, key.split(".")[1]),
                      f"{run} end before the first decay; the lr never decays (a constant lr)"))
    elif reached < len(decays):
        found.append((key, getattr(s, key.split(".")[1]),
                      f"{run} end before its last milestone(s); the lr decays {reached} of {len(decays)} times"))
    if s.name == "cosine" and s.t_max_epochs is not None and warmup + round(s.t_max_epochs * steps_per_epoch) > steps:
        from . import optim  # the schedule registry (torch): only where a cosine's end is set

        final = optim.lr_multiplier(s, 1.0, steps_per_epoch, steps)(steps - 1)
        found.append(("schedule.t_max_epochs", s.t_max_epochs,
                      f"{run} end before the cosine does; the lr ends at {final:.0%} of optim.lr, not at eta_min"))
    if u.scheduler in ("pbt", "pb2") and u.perturbation_interval * steps_per_epoch >= steps:
        found.append(("tune.perturbation_interval", u.perturbation_interval,
                      f"{run} end before the first perturbation (none comes at a trial's last epoch); "
                      f"{u.scheduler} never exploits nor explores"))
    return found


def _check_data(cfg: Config, n: int) -> None:
    d, batch = cfg.data, cfg.train.global_batch_size
    val = d.val_count(n)
    if d.val_fraction is None:
        _check(val < n, "data.val_size", f"must be less than the {n} train images", d.val_size)
    else:
        _check(val < n, "data.val_fraction", f"leaves none of the {n} train images for training", d.val_fraction)
    _check(d.train_subset is None or d.train_subset >= batch, "data.train_subset",
           f"smaller than one global batch (train.global_batch_size={batch})", d.train_subset)
    train = d.train_count(n)
    _check(batch <= train, "train.global_batch_size",
           f"larger than the {train} train images ({n} minus {val} for validation"
           + (f", data.train_subset={d.train_subset}" if d.train_subset is not None else "") + ")", batch)


def local_resources() -> tuple[float, float]:
    """This machine's real cores (those this process may run on) and CUDA GPUs."""
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return float(cpus), float(torch.cuda.device_count())


def check_resources(cfg: Config, cpus: float, gpus: float, count_driver: bool = True, searched: bool = True) -> None:
    """A trial's DDP ranks (train.num_workers x train.cpus_per_worker CPUs and, with GPUs, x train.gpus_per_worker
    GPUs) plus, with `count_driver`, its driver (tune.trial_driver_cpus) against `cpus` and `gpus`, for every trial."""
    for_each_trial(cfg, lambda trial: _check_resources(trial, cpus, gpus, count_driver), searched)


def _check_resources(cfg: Config, cpus: float, gpus: float, count_driver: bool) -> None:
    t = cfg.train
    # A one-rank trial trains in its own Tune process: no separate driver to count.
    driver = cfg.tune.trial_driver_cpus if count_driver and t.num_workers > 1 else 0.0
    need = driver + t.num_workers * t.cpus_per_worker
    if need > cpus + 1e-9:
        # Name what to change: the ranks, unless they would fit at one CPU each.
        key, value = (("train.cpus_per_worker", t.cpus_per_worker) if driver + t.num_workers <= cpus + 1e-9
                      else ("train.num_workers", t.num_workers))
        driver_text = f" + tune.trial_driver_cpus={driver:g}" if count_driver else ""
        raise ConfigError(f"{key}: a trial needs {t.num_workers} rank(s) x {t.cpus_per_worker:g} CPUs{driver_text} = "
                          f"{need:g} CPUs, more than the {cpus:g} there are (got {value!r})")
    _check_gpus(t, gpus)


def _check_gpus(t: TrainConfig, gpus: float) -> None:
    # Here rather than in validate: a study resolves use_gpu null to false on a machine without GPUs, and
    # its trials may still carry a share meant for GPU machines, which is then ignored.
    _check(t.use_gpu is not False or t.gpus_per_worker == 1, "train.gpus_per_worker",
           "a share of a GPU has no effect with train.use_gpu false (CPU ranks): set it to 1, or use_gpu to "
           "true or null", t.gpus_per_worker)
    if t.use_gpu and gpus < 1:
        raise ConfigError(f"train.use_gpu: true but there is no GPU (got {t.use_gpu!r})")
    need = t.num_workers * t.gpus_per_worker  # a share of a GPU counts as that share
    if (t.use_gpu or (t.use_gpu is None and gpus >= 1)) and need > gpus + 1e-9:
        raise ConfigError(f"train.num_workers: a trial needs {t.num_workers} rank(s) x train.gpus_per_worker="
                          f"{t.gpus_per_worker:g} = {need:g} GPUs, more than the {gpus:g} there are "
                          f"(got {t.num_workers!r})")


def for_each_trial(cfg: Config, check: Callable[[Config], None], searched: bool = True) -> None:
    """check(config) for the fixed config, or (with `searched` and a search space) for every trial it can give:
    the cross product of every listed value (grid and choice values, both ends of a range)."""
    if not (searched and cfg.tune.search_space):
        check(cfg)
        return
    for sampled, trial in trial_configs(cfg):
        try:
            check(trial)
        except ConfigError as e:
            try:
                check(cfg)
            except ConfigError as fixed:
                if str(fixed) == str(e):  # not the searched values': the study's own setting, named as it is
                    raise fixed from None
            values = ", ".join(f"{k}={v!r}" for k, v in sampled.items())
            raise ConfigError(f"tune.search_space: the trial with {values}: {e}") from None
