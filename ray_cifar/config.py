"""One typed config for everything ray_cifar does.

A study is the defaults below, then a YAML file that overrides some fields, then
`--set section.field=value` overrides, then validation. Every field says its unit.
Anything wrong (unknown key, wrong type, impossible value, unknown registry name)
raises ConfigError with one line naming the key; the CLIs print it and exit 2.

    cfg = load_config("studies/x.yaml", sets=["train.epochs=5"])
    cfg.train.global_batch_size        # images per optimizer step, all DDP ranks together
    cfg.to_dict()                      # plain, YAML/JSON-able, written beside the results
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml


class ConfigError(ValueError):
    """A config problem, phrased as one line that names the key."""


# ---------------------------------------------------------------------------
# Sections. Comments are the documentation: `python -m ray_cifar.tune --help-config`
# prints them, so keep each on one line after the field.


@dataclass
class DataConfig:
    path: str | None = None  # folder with train/test.parquet or cifar-10-batches-py; None: $RAY_CIFAR_DATA, else download
    cache_dir: str | None = None  # where decoded uint8 arrays are cached; None: $RAY_CIFAR_CACHE or ~/.cache/ray_cifar
    val_size: int | None = 5000  # train images held out for validation (class-stratified, seeded; test is never tuned on); null: val_fraction decides
    val_fraction: float | None = None  # fraction of train held out for validation, e.g. 0.16 for 84:16; set val_size: null with it
    train_subset: int | None = None  # use only this many train images (stratified), for smoke runs; None: all
    split_seed: int = 0  # seed of the train/val split and the train subset (same seed, same split, in every trial)
    shuffle: bool = True  # reshuffle the train images every epoch (from train.seed and the epoch number)
    pipeline: str = "auto"  # augmentation pipeline: dali (NVIDIA DALI) | torch (batch tensor ops) | auto (the faster in benchmarks/results for this device and augmentation set)
    crop_padding: int = 4  # pixels of padding on each side before the random 32x32 crop; 0 = no crop
    crop_fill: int = 0  # pixel value (0..255, all channels) of the crop padding
    flip_p: float = 0.5  # probability of a horizontal flip per image; 0 = no flip
    autoaugment: str | None = None  # AutoAugment policy: cifar10 (the paper's 25 CIFAR-10 sub-policies); None = off
    jitter_brightness: float = 0.0  # color jitter: brightness factor uniform in [1-b, 1+b]; 0 = off
    jitter_contrast: float = 0.0  # color jitter: contrast factor uniform in [1-c, 1+c] around the image's mean gray; 0 = off
    jitter_saturation: float = 0.0  # color jitter: saturation factor uniform in [1-s, 1+s]; 0 = off
    jitter_hue: float = 0.0  # color jitter: hue rotation uniform in [-h, h] turns of the YIQ hue circle (<= 0.5); 0 = off
    rotation_degrees: float = 0.0  # random rotation uniform in [-d, d] degrees about the centre, fill 0; 0 = off
    erasing_p: float = 0.0  # random erasing: probability per image; 0 = off
    erasing_scale: list[float] = field(default_factory=lambda: [0.02, 0.33])  # random erasing: [min, max] erased area, fraction of the image
    erasing_ratio: list[float] = field(default_factory=lambda: [0.3, 3.3])  # random erasing: [min, max] aspect ratio h/w (log-uniform)
    erasing_fill: str = "zero"  # random erasing fill: zero | mean (per-channel dataset mean) | random (uniform 0..255 per pixel)
    cutout_size: int = 0  # cutout: side of the zeroed square in pixels (centre uniform, clipped at the border); 0 = off
    cutout_p: float = 1.0  # cutout: probability per image
    mixup_alpha: float = 1.0  # mixup: lambda ~ Beta(alpha, alpha), one per batch
    mixup_p: float = 0.0  # mixup: probability per batch (after either pipeline; targets become soft); 0 = off
    cutmix_alpha: float = 1.0  # cutmix: box area fraction ~ Beta(alpha, alpha), one box per batch
    cutmix_p: float = 0.0  # cutmix: probability per batch (mixup_p + cutmix_p <= 1; never both on one batch); 0 = off


@dataclass
class ModelConfig:
    name: str = "resnet18"  # registry name: resnet18 | resnet (see ray_cifar.models)
    blocks: list[int] | None = None  # residual blocks per stage; None: the named model's own
    widths: list[int] | None = None  # channels per stage; None: the named model's own
    stem_width: int | None = None  # channels of the 3x3 stem conv; None: first stage width
    norm: str = "batch"  # batch | group (GroupNorm is per-image, so DDP equals one process exactly)
    num_classes: int = 10  # classifier outputs
    dropout: float = 0.0  # probability of dropout on the pooled features, before the classifier; 0 = none
    max_params: int | None = None  # a config error when the model has more parameters than this; null: no limit


@dataclass
class OptimConfig:
    name: str = "sgd"  # registry name: sgd | adam | adamw | adagrad | asgd (see ray_cifar.optim)
    lr: float = 0.1  # peak learning rate per optimizer step (not rescaled with the batch size)
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = True  # SGD Nesterov momentum (needs momentum > 0 and dampening 0)
    dampening: float = 0.0  # SGD dampening: the new gradient enters the momentum buffer times (1 - dampening)
    weight_decay: float = 5e-4  # L2 coefficient: coupled (added to the gradient), but decoupled (lr * wd * w) for adamw
    wd_exclude_norm_bias: bool = False  # no weight decay for normalization weights/biases and any bias
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam/AdamW (beta1, beta2)
    eps: float = 1e-8  # Adam/AdamW/Adagrad denominator epsilon
    adagrad_lr_decay: float = 0.0  # Adagrad: lr / (1 + (t - 1) * lr_decay) at step t
    asgd_lambd: float = 1e-4  # ASGD decay term
    asgd_alpha: float = 0.75  # ASGD power for the eta update
    asgd_t0: float = 1e6  # ASGD: optimizer step at which averaging starts
    lookahead_k: int | None = None  # Lookahead around the optimizer: sync slow weights every k steps; null: no Lookahead
    lookahead_alpha: float = 0.5  # Lookahead slow-weight step: slow += alpha * (fast - slow)


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # registry name: constant | cosine | step | multistep | onecycle; stepped every iteration
    warmup_epochs: float = 0.0  # linear warm-up from 0 to optim.lr over this many epochs, before any schedule
    eta_min: float = 0.0  # cosine: final learning rate (absolute), kept after t_max_epochs
    t_max_epochs: float | None = None  # cosine: epochs from the end of warm-up down to eta_min; null: the rest of the run
    gamma: float = 0.1  # step/multistep: lr multiplier at each decay (0.2 = divide by 5)
    step_every_iters: int | None = None  # step: decay every this many iterations (from the first); set this or step_every_epochs
    step_every_epochs: float | None = None  # step: decay every this many epochs (from the first); set this or step_every_iters
    milestones_epochs: list[float] = field(default_factory=list)  # multistep: decay at these epochs (from the first)
    onecycle_pct_start: float = 0.3  # onecycle: fraction of the (post-warm-up) steps spent rising to optim.lr
    onecycle_div_factor: float = 25.0  # onecycle: starting lr = optim.lr / div_factor
    onecycle_final_div_factor: float = 1e4  # onecycle: final lr = starting lr / final_div_factor


@dataclass
class TrainConfig:
    epochs: int = 30  # passes over the train split (the schedule spans all of them); ignored when max_steps is set
    max_steps: int | None = None  # optimizer steps in all (the last epoch cut short); null: epochs decide the length
    global_batch_size: int = 512  # images per optimizer step over ALL DDP ranks; each rank gets 1/num_workers
    eval_batch_size: int = 1024  # images per evaluation step per rank (no gradients)
    num_workers: int = 1  # DDP ranks per trial (Ray Train workers); gloo on CPU, NCCL on GPU
    use_gpu: bool | None = None  # one GPU per rank; None: yes when the machine/cluster has GPUs
    cpus_per_worker: float = 1.0  # logical CPUs Ray reserves per rank
    amp: str = "bf16"  # autocast dtype: bf16 | fp16 (with a grad scaler) | fp32 (autocast off)
    channels_last: bool = True  # NHWC memory format for the model and its inputs (faster convs)
    label_smoothing: float = 0.0  # cross-entropy label smoothing in [0, 1)
    seed: int = 0  # seed of weights, batch order and augmentation
    torch_threads: int | None = None  # intra-op threads per rank on CPU; None: cores / ranks on the node
    max_failures: int = 2  # worker-group restarts of a trial (a rank or its node died), each from the last epoch's checkpoint


@dataclass
class TuneConfig:
    scheduler: str = "asha"  # asha (early stopping) | fifo (every trial runs to the end)
    metric: str = "val_acc"  # what ASHA and "best trial" compare (reported every epoch)
    mode: str = "max"  # max | min, for metric
    grace_period: int = 1  # ASHA: epochs every trial runs before it can be stopped
    reduction_factor: float = 2.0  # ASHA: keep the best 1/reduction_factor at each rung
    max_epochs: int | None = None  # ASHA max_t in epochs; None: train.epochs
    num_samples: int = 1  # samples of the search space (each grid point is run num_samples times)
    max_concurrent_trials: int | None = None  # None: as many as the cluster's CPUs/GPUs fit; a local Ray is sized to fit this many
    max_failures: int = 1  # times Tune runs a failed trial again (it resumes from its last checkpoint); 0 = never
    trial_driver_cpus: float = 0.25  # logical CPUs of each trial's driver (it only watches its DDP workers)
    num_cpus: int | None = None  # logical CPUs of a local Ray instance; None: max(cores, one trial's needs)
    address: str | None = None  # Ray cluster address ("auto" on a cluster node); None: $RAY_ADDRESS or a local Ray
    # Search space: "section.field" (or a whole "section") -> one of
    #   {grid: [v1, v2, ...]}  every value, crossed with the other grids
    #   {choice: [v1, ...]}    one value drawn per sample
    #   {uniform: [lo, hi]} | {loguniform: [lo, hi]} | {randint: [lo, hi]}
    # A section key takes dicts of that section's fields, e.g. optim: {grid: [{name: sgd, lr: 0.1}, ...]}.
    # The key "variants" takes dicts of any "section.field" keys: a grid over whole runs, for a study that
    # is a list of hand-picked rows rather than one cross product, e.g.
    #   variants: {grid: [{optim.lr: 0.1, train.epochs: 15}, {schedule.name: cosine, train.epochs: 300}]}
    search_space: dict[str, Any] = field(
        default_factory=lambda: {
            "optim": {"grid": [{"name": "sgd", "lr": 0.1}, {"name": "adam", "lr": 0.001, "weight_decay": 0.0}]},
            "train.global_batch_size": {"grid": [128, 256, 512, 1024]},
        }
    )


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        cfg = cls()
        apply_overrides(cfg, d)
        validate(cfg)
        return cfg


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))
SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")

# What --smoke-test changes: a study that finishes on 2 CPU cores in minutes and
# still shows ASHA stopping trials. Search-space lists are cut to two values each.
SMOKE_OVERRIDES = {
    "model": {"name": "resnet", "blocks": [1, 1, 1], "widths": [16, 32, 64], "stem_width": 16},
    "data": {"train_subset": 8000, "val_size": 2000},
    "train": {"epochs": 6, "num_workers": 2, "global_batch_size": 128, "eval_batch_size": 500},
    # Two trials at once: one's start-up (Ray workers, imports, pipeline build) hides behind the
    # other's training; measured 1.5x the whole-study images/s on 2 cores (benchmarks/README.md).
    "tune": {"grace_period": 1, "reduction_factor": 2.0, "max_epochs": None, "num_samples": 1,
             "max_concurrent_trials": 2},
}
SMOKE_VALUES_PER_KEY = 2
SMOKE_MAX_BATCH = 256  # searched batch sizes above this are cut to it (a smoke run has a few thousand images)
SMOKE_MAX_STEPS = 300  # a train.max_steps study (fixed or searched) runs at most this many steps
VARIANTS = "variants"  # the search-space key of a grid over whole runs (see TuneConfig)

# Every training length, for --budget-scale: (key, is an integer count).
LENGTH_KEYS = {
    "train.epochs": True, "train.max_steps": True, "tune.max_epochs": True, "tune.grace_period": True,
    "schedule.warmup_epochs": False, "schedule.t_max_epochs": False, "schedule.step_every_epochs": False,
    "schedule.step_every_iters": True, "schedule.milestones_epochs": False,
}


# ---------------------------------------------------------------------------
# Field docs (parsed from the comments above, for --help-config)


def field_docs() -> dict[str, str]:
    """Each field's doc: the comment after it, or the comment lines just above it."""
    import inspect

    docs = {}
    for section in SECTIONS:
        section_cls = type(getattr(Config(), section))
        above: list[str] = []
        for line in inspect.getsource(section_cls).splitlines():
            line = line.strip()
            if line.startswith("#"):
                above.append(line.lstrip("# "))
                continue
            if ":" in line and not line.startswith(("class", '"', "def", "@")):
                name = line.split(":", 1)[0].strip()
                if name.isidentifier():
                    doc = line.split("#", 1)[1].strip() if "#" in line else " ".join(above)
                    docs[f"{section}.{name}"] = doc
            above = []
    return docs


def describe() -> str:
    defaults = Config().to_dict()
    lines = []
    for key, doc in field_docs().items():
        section, name = key.split(".")
        lines.append(f"  {key} = {defaults[section][name]!r}\n      {doc}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Overrides and type checks


def _allowed(section: str) -> str:
    names = [f.name for f in dataclasses.fields(type(getattr(Config(), section)))]
    return ", ".join(names)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a field's type hint; returns the (lightly converted) value."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}")
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_hint)}, got {value!r}")
        return [_coerce(v, item_hint, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads 5e-4 (no dot) as a string; people write it that way all the time.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _hints(section_obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(section_obj))


def set_value(cfg: Config, key: str, value: Any) -> None:
    """Set `section.field` (or a whole `section` from a dict) with type checking."""
    section, _, name = key.partition(".")
    if section not in SECTIONS:
        raise ConfigError(f"unknown key '{key}' (sections: {', '.join(SECTIONS)})")
    section_obj = getattr(cfg, section)
    if not name:
        if not isinstance(value, dict):
            raise ConfigError(f"{section}: expected a mapping of its fields, got {value!r}")
        for k, v in value.items():
            set_value(cfg, f"{section}.{k}", v)
        return
    hints = _hints(section_obj)
    if name not in hints:
        raise ConfigError(f"unknown key '{key}' (allowed in {section}: {_allowed(section)})")
    setattr(section_obj, name, _coerce(copy.deepcopy(value), hints[name], key))


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> None:
    """Apply a nested ({section: {field: v}}) or flat ({"section.field": v}) mapping."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(overrides).__name__}")
    for key, value in overrides.items():
        set_value(cfg, str(key), value)


def parse_set(assignment: str) -> tuple[str, Any]:
    """'train.epochs=5' -> ('train.epochs', 5); the value is read as YAML."""
    key, eq, raw = assignment.partition("=")
    if not eq or not key.strip():
        raise ConfigError(f"--set expects section.field=value, got '{assignment}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


EXTENDS = "extends"  # a study file's key naming the file it builds on (relative to it), e.g. x_asha.yaml -> x.yaml


def read_config_chain(path: str, _seen: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The YAML mappings to apply, base first: `extends: other.yaml` puts other.yaml's chain before this file."""
    if os.path.abspath(path) in _seen:
        raise ConfigError(f"{EXTENDS}: {path} extends itself (via {' -> '.join(_seen)})")
    try:
        with open(path) as f:
            overrides = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(overrides, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(overrides).__name__}")
    parent = overrides.pop(EXTENDS, None)
    if parent is None:
        return [overrides]
    if not isinstance(parent, str):
        raise ConfigError(f"{EXTENDS}: expected a file name, got {parent!r}")
    parent_path = os.path.join(os.path.dirname(os.path.abspath(path)), parent)
    return read_config_chain(parent_path, _seen + (os.path.abspath(path),)) + [overrides]


def load_config(path: str | None = None, sets: list[str] = (), smoke_test: bool = False,
                budget_scale: float = 1.0) -> Config:
    """Defaults, then the YAML file, then --smoke-test, then --set, then the budget scale; validated."""
    cfg = Config()
    if path is not None:
        for overrides in read_config_chain(path):
            apply_overrides(cfg, overrides)
    if smoke_test:
        apply_smoke(cfg)
    for assignment in sets:
        set_value(cfg, *parse_set(assignment))
    if budget_scale != 1.0:
        apply_budget_scale(cfg, budget_scale)
    validate(cfg)
    return cfg


def map_searched(cfg: Config, fn: Callable[[str, Any], Any]) -> None:
    """Replace every grid/choice value of the search space by fn('section.field', value), in place.

    Flat keys, the fields inside section dicts and the keys inside variants are all visited;
    values that become equal are kept once.
    """
    def one(key: str, value: Any) -> Any:
        if key == VARIANTS and isinstance(value, dict):
            return {k: one(str(k), v) for k, v in value.items()}
        if "." not in key and isinstance(value, dict):
            return {k: fn(f"{key}.{k}", v) for k, v in value.items()}
        return fn(key, value)

    for key, spec in cfg.tune.search_space.items():
        if isinstance(spec, dict) and len(spec) == 1:
            kind, values = next(iter(spec.items()))
            if kind in ("grid", "choice") and isinstance(values, list):
                mapped = [one(key, v) for v in values]
                spec[kind] = [v for i, v in enumerate(mapped) if v not in mapped[:i]]


def apply_smoke(cfg: Config) -> None:
    """--smoke-test: SMOKE_OVERRIDES, also inside the search space, and two values per searched key."""
    val_fraction = cfg.data.val_fraction
    apply_overrides(cfg, SMOKE_OVERRIDES)
    if val_fraction is not None:  # a study split by fraction keeps its fraction
        cfg.data.val_size = None
    if cfg.train.max_steps is not None:
        cfg.train.max_steps = min(cfg.train.max_steps, SMOKE_MAX_STEPS)
    for key, spec in list(cfg.tune.search_space.items()):
        if isinstance(spec, dict) and len(spec) == 1:
            kind, values = next(iter(spec.items()))
            if kind in ("grid", "choice") and isinstance(values, list):
                cfg.tune.search_space[key] = {kind: values[:SMOKE_VALUES_PER_KEY]}
    smoke = flatten(SMOKE_OVERRIDES)

    def shrink(key: str, value: Any) -> Any:
        if key == "train.global_batch_size":
            return min(value, SMOKE_MAX_BATCH)  # batch sizes that fit a few thousand images
        if key == "train.max_steps" and value is not None:
            return min(value, SMOKE_MAX_STEPS)
        if key == "data.val_size" and value is None:
            return None
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


# ---------------------------------------------------------------------------
# Validation


def _check(ok: bool, key: str, msg: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg} (got {value!r})")


def _check_name(key: str, value: str, allowed: list[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: unknown '{value}' (allowed: {', '.join(sorted(allowed))})")


def validate(cfg: Config) -> None:
    """Check values that types alone cannot; also every value of the search space."""
    _validate_fixed(cfg)
    _validate_search_space(cfg)


def _validate_fixed(cfg: Config) -> None:
    from . import models, optim  # registries (torch is imported here, not at config import)

    d, m, o, s, t, u = cfg.data, cfg.model, cfg.optim, cfg.schedule, cfg.train, cfg.tune
    if (d.val_size is None) == (d.val_fraction is None):
        raise ConfigError(f"data.val_fraction: set exactly one of data.val_size and data.val_fraction, the other "
                          f"null (got val_size={d.val_size!r}, val_fraction={d.val_fraction!r})")
    _check(d.val_size is None or d.val_size >= 0, "data.val_size", "must be >= 0", d.val_size)
    _check(d.val_fraction is None or 0 <= d.val_fraction < 1, "data.val_fraction", "must be in [0, 1)", d.val_fraction)
    _check(d.train_subset is None or d.train_subset > 0, "data.train_subset", "must be > 0 or null", d.train_subset)
    _check_name("data.pipeline", d.pipeline, ["auto", "dali", "torch"])
    _validate_augmentation(d)

    _check_name("model.name", m.name, models.list_models())
    for key, seq in (("model.blocks", m.blocks), ("model.widths", m.widths)):
        _check(seq is None or (len(seq) > 0 and all(v > 0 for v in seq)), key, "must be positive integers", seq)
    if m.blocks is not None and m.widths is not None:
        _check(len(m.blocks) == len(m.widths), "model.widths", "needs one width per stage of model.blocks", m.widths)
    _check(m.stem_width is None or m.stem_width > 0, "model.stem_width", "must be > 0", m.stem_width)
    _check_name("model.norm", m.norm, ["batch", "group"])
    _check(m.num_classes >= 2, "model.num_classes", "must be >= 2", m.num_classes)
    _check(0 <= m.dropout < 1, "model.dropout", "must be a probability in [0, 1)", m.dropout)
    if m.max_params is not None:
        n = models.count_config_parameters(m)  # built on the meta device: no memory, no init time
        _check(n <= m.max_params, "model.max_params", f"the model has {n:,} parameters, more than {m.max_params:,}",
               m.max_params)

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

    _validate_schedule(s, optim.list_schedules())

    _check(t.epochs >= 1, "train.epochs", "must be >= 1", t.epochs)
    _check(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "must be >= 1 or null", t.max_steps)
    _check(t.global_batch_size >= 1, "train.global_batch_size", "must be >= 1", t.global_batch_size)
    _check(t.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1", t.eval_batch_size)
    _check(t.num_workers >= 1, "train.num_workers", "must be >= 1", t.num_workers)
    _check(t.global_batch_size % t.num_workers == 0, "train.global_batch_size",
           f"must be divisible by train.num_workers={t.num_workers} (each rank gets an equal share)", t.global_batch_size)
    _check(t.cpus_per_worker > 0, "train.cpus_per_worker", "must be > 0", t.cpus_per_worker)
    _check_name("train.amp", t.amp, ["bf16", "fp16", "fp32"])
    _check(0 <= t.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)", t.label_smoothing)
    _check(t.torch_threads is None or t.torch_threads >= 1, "train.torch_threads", "must be >= 1", t.torch_threads)
    _check(t.max_failures >= 0, "train.max_failures", "must be >= 0", t.max_failures)

    _check_name("tune.scheduler", u.scheduler, ["asha", "fifo"])
    _check_name("tune.mode", u.mode, ["max", "min"])
    _check_name("tune.metric", u.metric, ["val_acc", "val_loss", "train_acc", "train_loss"])
    _check(u.grace_period >= 1, "tune.grace_period", "must be >= 1 epoch", u.grace_period)
    _check(u.reduction_factor > 1, "tune.reduction_factor", "must be > 1", u.reduction_factor)
    if t.max_steps is None:
        max_epochs = u.max_epochs if u.max_epochs is not None else t.epochs
        _check(1 <= max_epochs <= t.epochs, "tune.max_epochs", f"must be in [1, train.epochs={t.epochs}]", u.max_epochs)
        _check(u.grace_period <= max_epochs, "tune.grace_period", f"must be <= max epochs ({max_epochs})",
               u.grace_period)
    else:  # the epochs follow from max_steps and the data, known only when training starts
        _check(u.max_epochs is None or u.max_epochs >= u.grace_period, "tune.max_epochs",
               f"must be >= tune.grace_period={u.grace_period}", u.max_epochs)
    _check(u.num_samples >= 1, "tune.num_samples", "must be >= 1", u.num_samples)
    _check(u.max_concurrent_trials is None or u.max_concurrent_trials >= 1, "tune.max_concurrent_trials",
           "must be >= 1 or null", u.max_concurrent_trials)
    _check(u.max_failures >= 0, "tune.max_failures", "must be >= 0", u.max_failures)
    _check(u.trial_driver_cpus >= 0, "tune.trial_driver_cpus", "must be >= 0", u.trial_driver_cpus)
    _check(u.num_cpus is None or u.num_cpus >= 1, "tune.num_cpus", "must be >= 1 or null", u.num_cpus)


def _check_range(key: str, pair: list[float], low: float, high: float) -> None:
    _check(len(pair) == 2 and low <= pair[0] <= pair[1] <= high, key,
           f"must be [min, max] with {low} <= min <= max <= {high}", pair)


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


def _validate_schedule(s: ScheduleConfig, names: list[str]) -> None:
    _check_name("schedule.name", s.name, names)
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


def search_keys(search_space: dict[str, Any]) -> list[str]:
    """The searched fields as flat 'section.field' names (section keys expand to their fields)."""
    keys: list[str] = []
    for key, spec in search_space.items():
        kind, values = next(iter(spec.items()))
        if "." in key:
            keys += [key] if key not in keys else []
            continue
        for v in values if kind in ("grid", "choice") else []:
            names = flatten(v) if key == VARIANTS else {f"{key}.{k}": None for k in v}
            keys += [k for k in names if k not in keys]
    return keys


def apply_searched(cfg: Config, key: str, value: Any) -> None:
    """Set one search-space entry's value: a field, a section dict, or a variant (dict of fields)."""
    if key != VARIANTS:
        set_value(cfg, key, value)
        return
    if not isinstance(value, dict):
        raise ConfigError(f"{VARIANTS}: expected a mapping of section.field keys, got {value!r}")
    for k, v in flatten(value).items():
        if k.split(".")[0] == "tune":
            raise ConfigError(f"{k}: the tune section cannot be part of a variant")
        set_value(cfg, k, v)


def _validate_search_space(cfg: Config) -> None:
    for key, spec in cfg.tune.search_space.items():
        where = f"tune.search_space.{key}"
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SEARCH_KINDS):
            raise ConfigError(f"{where}: expected one of {{{', '.join(SEARCH_KINDS)}}}: [...] (got {spec!r})")
        if key.split(".")[0] == "tune":
            raise ConfigError(f"{where}: the tune section cannot itself be searched")
        kind, values = next(iter(spec.items()))
        _check(isinstance(values, list) and len(values) >= 1, where, f"{kind} needs a non-empty list", values)
        if kind in ("grid", "choice"):
            candidates = values
        else:
            _check(len(values) == 2 and values[0] < values[1], where, f"{kind} needs [low, high] with low < high", values)
            _check(kind != "loguniform" or values[0] > 0, where, "loguniform needs low > 0", values)
            candidates = values
        for value in candidates:
            trial = copy.deepcopy(cfg)
            trial.tune.search_space = {}
            try:
                apply_searched(trial, key, value)
                _validate_fixed(trial)
            except ConfigError as e:
                raise ConfigError(f"{where}: value {value!r}: {e}") from None


def trial_config(base: dict[str, Any], sampled: dict[str, Any]) -> Config:
    """The config of one trial: the study's resolved config plus its sampled values."""
    cfg = Config()
    apply_overrides(cfg, base)
    for key, value in sampled.items():
        apply_searched(cfg, key, value)
    cfg.tune.search_space = {}
    _validate_fixed(cfg)
    return cfg


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "search_space":
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
