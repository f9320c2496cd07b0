"""Every study file in studies/: it loads and validates, its header says what it reproduces, its trials are
what Ray Tune would run and each trains a step (without Ray), and one study runs end to end through Ray."""

from __future__ import annotations

import copy
import glob
import math
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import synthetic_cifar
from ray_cifar import loop
from ray_cifar.config import VARIANTS, Config, flatten
from ray_cifar.data.loader import make_splits
from ray_cifar.optim import create_optimizer
from ray_cifar.data.pipelines import train_loader_for
from ray_cifar.config import grid_size
from ray_cifar.validation import load_config, trial_config
from trial_expansion import expand_trials, searched_fields

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY_FILES = sorted(glob.glob(os.path.join(ROOT, "studies", "**", "*.yaml"), recursive=True))
STUDY_IDS = [os.path.relpath(p, os.path.join(ROOT, "studies")) for p in STUDY_FILES]

PUBLISHED_STUDIES = {"resnet18_lr_schedule_wd", "resnet18_erasing_sweep", "resnet_under_5m", "adam_batch_lr_grid",
                     "optimizer_batch_decay"}


def test_every_published_study_has_a_file_and_asha_variants_exist():
    names = {os.path.splitext(i)[0] for i in STUDY_IDS}
    assert PUBLISHED_STUDIES <= names
    # Studies 4 and 5 compare optimizers or batch sizes: each also ships as an ASHA study.
    for study in ("adam_batch_lr_grid", "optimizer_batch_decay"):
        assert load_config(os.path.join(ROOT, "studies", f"{study}_asha.yaml")).tune.scheduler == "asha"
        assert load_config(os.path.join(ROOT, "studies", f"{study}.yaml")).tune.scheduler == "fifo"


@pytest.mark.parametrize("path", STUDY_FILES, ids=STUDY_IDS)
def test_study_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.tune.search_space, "a study searches something"
    smoke = load_config(path, smoke_test=True)
    assert smoke.model.widths == [16, 32, 64]
    # The published hand-made grids run every trial to its end; the *_asha variants stop early; *_pbt is a
    # population, *_bohb draws its trials (under its own HyperBand).
    kind = os.path.basename(path).rsplit("_", 1)[-1].removesuffix(".yaml")
    if kind == "bohb":
        assert cfg.tune.search == "bohb" and cfg.tune.num_samples > 1
        assert smoke.tune.num_samples == 4  # a smoke run that draws trials and stops some, not one trial
    else:
        assert cfg.tune.scheduler == {"asha": "asha", "pbt": "pbt"}.get(kind, "fifo")
    if kind == "pbt":
        assert grid_size(smoke) * smoke.tune.num_samples >= 2  # a population to exploit in the smoke run


@pytest.mark.parametrize("path", STUDY_FILES, ids=STUDY_IDS)
def test_study_header_quotes_commands(path):
    rel = os.path.relpath(path, ROOT)
    header = "".join(line for line in open(path) if line.startswith("#"))
    assert f"python -m ray_cifar.tune --config {rel}" in header
    assert "--smoke-test" in header
    assert "--budget-scale" in header or "--set train." in header


def test_study_5_is_32000_iterations_with_step_decay_every_n_iterations():
    cfg = load_config(os.path.join(ROOT, "studies", "optimizer_batch_decay.yaml"))
    assert cfg.train.max_steps == 32000 and cfg.schedule.name == "step" and cfg.schedule.gamma == 0.2
    rows = cfg.tune.search_space[VARIANTS]["grid"]
    assert {r.get("schedule.step_every_iters", 5000) for r in rows} == {4000, 5000, 8000, 10000}
    assert {r.get("optim.name", "sgd") for r in rows} == {"adam", "sgd", "adagrad", "asgd"}


# ---------------------------------------------------------------------------
# Every study's trials, without Ray: expanded as Tune would, each distinct trial config trained one step.

# The same shrinking the end-to-end run below uses, plus tiny data; one step per trial is enough to show
# that the trial's searched values build a model, optimizer, schedule and loader that train.
STEP_DATA = dict(n_train=400, n_test=50)  # 300 train images after the 100-image val split: > the largest smoke batch
OPTIMIZER_CLASSES = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
                     "adagrad": torch.optim.Adagrad, "asgd": torch.optim.ASGD}


def _ray_tune_trials(search_space: dict, num_samples: int, seed: int) -> list[dict]:
    """Ray Tune's own expansion (what BasicVariantGenerator(random_state=seed) feeds the trials); no cluster."""
    from ray.tune.search.variant_generator import generate_variants

    from ray_cifar.tuning.study import to_param_space

    rng = np.random.default_rng(seed)  # one Generator for every sample, as BasicVariantGenerator keeps it
    return [config for _ in range(num_samples)
            for _, config in generate_variants(to_param_space(search_space), random_state=rng)]


MIXED_SPACE = {  # every search kind, a whole-section grid and variants, so the order and the draws are pinned
    "optim.lr": {"loguniform": [1e-4, 1e-1]},
    "train.global_batch_size": {"grid": [64, 128]},
    "optim": {"grid": [{"name": "sgd", "momentum": 0.8}, {"name": "adam"}]},
    "data.flip_p": {"uniform": [0.0, 1.0]},
    "train.seed": {"randint": [0, 3]},
    "model.dropout": {"choice": [0.0, 0.1, 0.2]},
    VARIANTS: {"grid": [{"optim.weight_decay": 0.0}, {"optim.weight_decay": 5e-4, "train.label_smoothing": 0.1}]},
}


def test_expansion_matches_ray_tune_for_every_search_kind():
    ours = expand_trials(MIXED_SPACE, num_samples=2, seed=7)
    assert len(ours) == 2 * 2 * 2 * 2
    assert ours == _ray_tune_trials(MIXED_SPACE, num_samples=2, seed=7)  # same order, same draws
    assert expand_trials(MIXED_SPACE, 2, seed=7) == ours
    assert expand_trials(MIXED_SPACE, 2, seed=8) != ours  # the seed decides the draws
    assert {t["train.seed"] for t in expand_trials(MIXED_SPACE, 20, seed=0)} == {0, 1, 2, 3}  # randint is inclusive


@pytest.mark.parametrize("smoke", [False, True], ids=["full", "smoke"])
@pytest.mark.parametrize("path", STUDY_FILES, ids=STUDY_IDS)
def test_study_expansion_matches_ray_tune(path, smoke):
    cfg = load_config(path, smoke_test=smoke)
    ours = expand_trials(cfg.tune.search_space, cfg.tune.num_samples, seed=0)
    assert len(ours) == grid_size(cfg) * cfg.tune.num_samples
    assert ours == _ray_tune_trials(cfg.tune.search_space, cfg.tune.num_samples, seed=0)


def _smoke_trials(path: str) -> tuple[Config, list[tuple[dict, Config]]]:
    """The study as the smoke run below runs it: (study config, [(sampled values, trial config)]), distinct configs."""
    cfg = load_config(path, smoke_test=True, sets=_smoke_sets(path))
    base = cfg.to_dict()
    base["tune"]["search_space"] = {}  # as ray_cifar.tuning.study hands it to every trial
    trials, seen = [], set()
    for sampled in expand_trials(cfg.tune.search_space, cfg.tune.num_samples, seed=0):
        trial = trial_config(base, sampled)
        key = repr(trial.to_dict())
        if key not in seen:
            seen.add(key)
            trials.append((sampled, trial))
    return cfg, trials


@pytest.mark.parametrize("path", STUDY_FILES, ids=STUDY_IDS)
def test_study_trials_reach_their_config_and_train_one_step(path, monkeypatch):
    _, trials = _smoke_trials(path)
    assert len(trials) >= 1
    made = []

    def recording_create_optimizer(model, optim_cfg):
        made.append(create_optimizer(model, optim_cfg))
        return made[-1]

    monkeypatch.setattr(loop, "create_optimizer", recording_create_optimizer)
    dataset = synthetic_cifar(**STEP_DATA)
    for sampled, trial in trials:
        flat = flatten(trial.to_dict())
        for key, value in searched_fields(sampled).items():
            assert flat[key] == value, f"{key}: trial config has {flat[key]!r}, the search drew {value!r}"
        metrics = _train_one_step(trial, dataset)
        optimizer = made[-1].base if trial.optim.lookahead_k else made[-1]
        assert type(optimizer) is OPTIMIZER_CLASSES[trial.optim.name]
        assert optimizer.defaults["lr"] == trial.optim.lr
        assert optimizer.defaults["weight_decay"] == trial.optim.weight_decay
        assert metrics["train_images"] == trial.train.global_batch_size  # one step of the searched global batch
        assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["val_loss"]), metrics


def _train_one_step(trial: Config, dataset) -> dict:
    """The trial's config through the real loop (ray_cifar.loop.run_training), cut to one optimizer step."""
    run = copy.deepcopy(trial)
    run.train.max_steps, run.train.torch_threads = 1, 1  # the CI machine's cores are shared
    metrics = []
    splits, cpu = make_splits(dataset, run.data, "cpu"), torch.device("cpu")
    loop.run_training(run, train_loader_for(run, splits.train, cpu), splits.val, cpu,
                      on_epoch=lambda m, state: metrics.append(m), log=None)
    assert len(metrics) == 1 and metrics[0]["steps"] == 1
    return metrics[0]


# ---------------------------------------------------------------------------
# One study end to end through Ray (the others are covered above without Ray):
# python -m ray_cifar.tune --config X --smoke-test on synthetic data.

E2E_STUDY = "optimizer_batch_decay_asha.yaml"  # the smallest ASHA study: two trials in its smoke run


def _smoke_sets(config_path: str) -> list[str]:
    """Extra shrinking for the 600-image synthetic set: 2 epochs (or 6 steps), one rank per trial, a 100-image val split."""
    cfg: Config = load_config(config_path, smoke_test=True)
    # 4 one-rank trials at once; Ray without its dashboard (one-rank trials need none)
    sets = ["train.epochs=2", "train.num_workers=1", "tune.num_cpus=6", "tune.dashboard=false"]
    if cfg.data.val_fraction is None:
        sets.append("data.val_size=100")
    if cfg.train.max_steps is not None:
        sets.append("train.max_steps=6")
    return sets


def test_e2e_study_is_the_smallest_asha_study():
    asha = [p for p in STUDY_FILES if load_config(p).tune.scheduler == "asha"]
    sizes = {os.path.basename(p): len(_smoke_trials(p)[1]) for p in asha}
    assert sizes[E2E_STUDY] == min(sizes.values()), sizes


@pytest.mark.integration
def test_study_smoke_run(synthetic_parquet_dir, tmp_path):
    path = os.path.join(ROOT, "studies", E2E_STUDY)
    output = tmp_path / "out"
    cmd = [sys.executable, "-m", "ray_cifar.tune", "--config", path, "--smoke-test", "--data", synthetic_parquet_dir,
           "--output", str(output)]
    for s in _smoke_sets(path):
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = pq.read_table(output / "trials.parquet").to_pylist()
    assert len(trials) == len(_smoke_trials(path)[1])
    assert all(t["status"] in ("completed", "stopped") for t in trials), trials
    assert any(t["test_acc"] is not None for t in trials)
