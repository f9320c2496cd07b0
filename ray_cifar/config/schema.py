"""The config schema: one dataclass per section, each field with its unit and a comment.

The bottom of the package: imports nothing of ray_cifar. The comments are the documentation
(`python -m ray_cifar.tune --help-config` prints them), so keep each on one line after the field.

    cfg = Config()                     # the defaults
    cfg.train.global_batch_size        # images per optimizer step, all DDP ranks together
    cfg.to_dict()                      # plain, YAML/JSON-able, written beside the results
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config problem, phrased as one line that names the key (a newline in a quoted key or value is shown
    as \\n, so the message stays one line whatever the input)."""

    def __str__(self) -> str:
        return super().__str__().replace("\r", "\\r").replace("\n", "\\n")


@dataclass
class DataConfig:
    path: str | None = None  # folder with train/test.parquet or cifar-10-batches-py; None: $RAY_CIFAR_DATA, else download
    cache_dir: str | None = None  # where decoded uint8 arrays are cached; None: $RAY_CIFAR_CACHE or ~/.cache/ray_cifar
    val_size: int | None = 5000  # train images held out for validation (class-stratified, seeded; test is never tuned on); null: val_fraction decides
    val_fraction: float | None = None  # fraction of train held out for validation, e.g. 0.16 for 84:16; set val_size: null with it
    train_subset: int | None = None  # use only this many train images (stratified), for smoke runs; None: all
    split_seed: int = 0  # seed of the train/val split and the train subset (same seed, same split, in every trial)
    shuffle: bool = True  # reshuffle the train images every epoch (from train.seed and the epoch number)
    pipeline: str = "auto"  # augmentation pipeline: dali (NVIDIA DALI) | torch (batch tensor ops) | auto (the faster in ray_cifar/measurements for this device and augmentation set)
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

    def val_count(self, num_train_images: int) -> int:
        """Validation images: val_size, or val_fraction of the train images (rounded)."""
        return self.val_size if self.val_fraction is None else round(self.val_fraction * num_train_images)

    def train_count(self, num_train_images: int) -> int:
        """Images a run trains on: those left after validation, at most train_subset."""
        left = num_train_images - (self.val_count(num_train_images) or 0)
        return left if self.train_subset is None else min(self.train_subset, left)


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
    eval_batch_size: int | None = None  # images per evaluation step per rank (no gradients); null: 1024 on a GPU, 256 on CPU (where a smaller batch evaluates faster)
    num_workers: int = 1  # DDP ranks per trial (Ray Train workers); gloo on CPU, NCCL on GPU
    use_gpu: bool | None = None  # train on GPUs (train.gpus_per_worker per rank); None: yes when the machine/cluster has GPUs
    gpus_per_worker: float = 1.0  # GPUs per rank, in (0, 1]: 0.25 packs four 1-rank trials on one GPU, each capped to 1/4 of its memory; < 1 needs num_workers 1
    cpus_per_worker: float = 1.0  # logical CPUs Ray reserves per rank
    amp: str = "auto"  # autocast dtype: auto (bf16 on a GPU, fp16 where it has no bf16 in hardware: V100, T4; fp32 on CPU, where autocast is slower) | bf16 | fp16 (with a grad scaler; bf16 on CPU) | fp32 (autocast off)
    compile: bool = False  # torch.compile the (DDP-wrapped) model's training step: faster steps after a one-off compile of tens of seconds; evaluation runs eager
    channels_last: bool = True  # NHWC memory format for the model and its inputs (faster convs)
    label_smoothing: float = 0.0  # cross-entropy label smoothing in [0, 1)
    seed: int = 0  # seed of weights, batch order and augmentation
    torch_threads: int | None = None  # intra-op threads per rank on CPU; None: cores / ranks on the node
    max_failures: int = 2  # worker-group restarts of a trial (a rank or its node died), each from the last epoch's checkpoint; where every trial has 1 rank (no worker group) Tune retries that many more times
    placement_strategy: str = "PACK"  # where a trial's ranks go: PACK (few nodes) | SPREAD (one per node, if it can) | STRICT_SPREAD


def improves(value: float | None, than: float | None, mode: str) -> bool:
    """Whether `value` of tune.metric beats `than` under tune.mode ("max" | "min"): what "best" means
    for the loop's best epoch, the recorder's best checkpoint and the ranking alike. A missing or
    non-finite value never improves; any value improves on None."""
    if value is None or not math.isfinite(value):
        return False
    return than is None or (value > than if mode == "max" else value < than)


@dataclass
class TuneConfig:
    scheduler: str = "asha"  # asha (early stopping) | fifo (every trial runs to the end) | pbt | pb2 (population based training: the weak copy the strong's full training state and perturb their values; see pbt_*); tune.search bohb brings its own HyperBand
    search: str = "grid"  # how trials get their values: grid (every grid point x num_samples; choices and ranges drawn at random) | random (every entry drawn at random, a grid as a choice; num_samples trials) | optuna (TPE) | hyperopt (TPE) | bohb (with its HyperBand scheduler); model-based searchers treat a grid as a choice and take num_samples as the trial budget
    metric: str = "val_acc"  # what ASHA and "best trial" compare (reported every epoch)
    mode: str = "max"  # max | min, for metric
    time_attr: str = "epoch"  # ASHA's clock: epoch | steps (optimizer steps so far: trials of different batch sizes compared at equal steps, not equal epochs); the unit of grace_period
    grace_period: int = 1  # ASHA: epochs (time_attr steps: optimizer steps) every trial runs before it can be stopped (larger: fewer early, noisy verdicts; costs more)
    reduction_factor: float = 2.0  # ASHA: keep the best 1/reduction_factor at each rung; rungs at grace_period * reduction_factor^k (larger: stops more, sooner)
    brackets: int = 1  # ASHA brackets: bracket b's first rung is grace_period * reduction_factor^b; each trial joins one (Hyperband's hedge against a too-short grace period)
    max_epochs: int | None = None  # ASHA max_t in epochs; None: train.epochs; with time_attr steps it must be null: the top rung is train.max_steps (null: none)
    test: str = "best"  # test-split evaluations at the end: best (the trial chosen by validation, once) | all (every finished trial at its best validation epoch, to stand beside published test figures; never used to choose)
    perturbation_interval: int = 2  # PBT/PB2: epochs between a trial's exploit/explore decisions (never at its last epoch)
    pbt_mutate: list[str] | None = None  # PBT/PB2: the search-space keys perturbed on explore; null: every searched field that can change mid-run (optim lr/weight_decay/momentum, train.label_smoothing, model.dropout, data augmentation strengths); a perturbed optim.lr replaces the schedule's peak: the schedule goes on at its step, scaled to the new peak
    pbt_quantile: float = 0.25  # PBT/PB2: the bottom fraction copies a trial of the top fraction (at least one of each with 2+ members; <= 0.5)
    pbt_resample_p: float = 0.25  # PBT: probability that an explored value is drawn afresh from its search-space entry instead of the donor's value x 0.8 or x 1.2 (a list: one step left or right), clipped to its range
    num_samples: int = 1  # samples of the search space (each grid point is run num_samples times); with optuna/hyperopt/bohb: the number of trials
    max_concurrent_trials: int | None = None  # None: as many as the cluster's CPUs/GPUs fit; a local Ray is sized to fit this many
    max_failures: int = 1  # times Tune runs a failed trial again (it resumes from its last checkpoint); 0 = never
    trial_driver_cpus: float = 0.25  # logical CPUs of each DDP trial's driver (it only watches its workers); a 1-rank trial has none: its rank is its Tune process
    num_cpus: int | None = None  # logical CPUs of a local Ray instance; None: max(cores, one trial's needs)
    address: str | None = None  # Ray cluster address ("auto" on a cluster node); None: $RAY_ADDRESS or a local Ray
    dashboard: bool = True  # a local Ray's dashboard and state API; false starts none: ~3.5 CPU-s less per study (2 cores, measured), for many short studies on a small machine; needs one-rank trials (Ray Train watches a DDP trial's controller through the state API); a running cluster keeps its own
    tracking: str = "none"  # experiment tracker, one run per trial (step = epoch): none | mlflow | wandb (pip install 'ray_cifar[tracking]')
    tracking_uri: str | None = None  # mlflow: tracking URI (http://HOST:5000, sqlite:///FILE, databricks); None: sqlite OUTPUT/mlflow.db. wandb: unused (WANDB_BASE_URL)
    tracking_project: str | None = None  # mlflow: experiment name, None: the output folder's name; wandb: project, None: ray_cifar (the group is the output folder's name)
    # Search space: "section.field" (or a whole "section") -> one of
    #   {grid: [v1, v2, ...]}  every value, crossed with the other grids
    #   {choice: [v1, ...]}    one value drawn per sample
    #   {uniform: [lo, hi]} | {loguniform: [lo, hi]} | {randint: [lo, hi]}  (randint: hi included; integer fields)
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

    def cluster_address(self) -> str | None:
        """The running Ray cluster the study joins: address, else $RAY_ADDRESS; None: a local Ray it starts."""
        return self.address or os.environ.get("RAY_ADDRESS") or None


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    published: list[dict] = field(default_factory=list)  # figures this study reproduces, each {where: {section.field: value, ...}, value: accuracy in percent (0..100) as published, metric: test_acc | val_acc, source: str}, and `run` (filled in as the file is read: the model and length of the trials where names, so a shortened or smoke run matches none); metadata: never searched nor a trial column

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The sections (each a dataclass of fields) and the top-level metadata fields beside them.
SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default_factory))
METADATA = tuple(f.name for f in dataclasses.fields(Config) if f.name not in SECTIONS)
PUBLISHED_METRICS = ("test_acc", "val_acc")
SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")

VARIANTS = "variants"  # the search-space key of a grid over whole runs (see TuneConfig)
