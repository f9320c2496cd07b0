"""Every study file in studies/: it loads and validates, its header says what it reproduces, it runs with --smoke-test."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from ray_cifar.config import VARIANTS, Config
from ray_cifar.validation import load_config

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
    # The published hand-made grids run every trial to its end; the *_asha variants stop early.
    assert cfg.tune.scheduler == ("asha" if path.endswith("_asha.yaml") else "fifo")


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
# Every study, end to end: python -m ray_cifar.tune --config X --smoke-test on synthetic data.


def _smoke_sets(config_path: str) -> list[str]:
    """Extra shrinking for the 600-image synthetic set: 2 epochs (or 6 steps), one rank per trial, a 100-image val split."""
    cfg: Config = load_config(config_path, smoke_test=True)
    sets = ["train.epochs=2", "train.num_workers=1", "tune.num_cpus=6"]  # 4 one-rank trials at once
    if cfg.data.val_fraction is None:
        sets.append("data.val_size=100")
    if cfg.train.max_steps is not None:
        sets.append("train.max_steps=6")
    return sets


@pytest.mark.integration
@pytest.mark.parametrize("path", STUDY_FILES, ids=STUDY_IDS)
def test_study_smoke_run(path, synthetic_parquet_dir, tmp_path):
    output = tmp_path / "out"
    cmd = [sys.executable, "-m", "ray_cifar.tune", "--config", path, "--smoke-test", "--data", synthetic_parquet_dir,
           "--output", str(output)]
    for s in _smoke_sets(path):
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = pq.read_table(output / "trials.parquet").to_pylist()
    assert trials and all(t["status"] in ("completed", "stopped") for t in trials), trials
    assert any(t["test_acc"] is not None for t in trials)
