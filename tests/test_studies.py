"""Every study file in studies/: it loads and validates, its header says what it reproduces, it runs with --smoke-test.

Three studies use augmentation keys that arrive with issue 3 (the DALI/augment branch). Until then
their load test is an expected failure, and the same study with those keys stripped must validate
and smoke-run, so everything but the augmentation is checked for real now.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from ray_cifar.config import VARIANTS, Config, DataConfig, load_config, read_config_chain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY_FILES = sorted(glob.glob(os.path.join(ROOT, "studies", "**", "*.yaml"), recursive=True))
STUDY_IDS = [os.path.relpath(p, os.path.join(ROOT, "studies")) for p in STUDY_FILES]

# The augmentation keys issue 3 defines (the other branch), and the studies that use them.
AUGMENTATION_KEYS = {"data.erasing_p", "data.erasing_scale", "data.erasing_ratio", "data.erasing_fill",
                     "data.cutout_p", "data.cutout_size", "data.autoaugment", "data.color_jitter",
                     "data.rotation_degrees"}
STUDIES_NEEDING_AUGMENTATION_KEYS = {"resnet18_lr_schedule_wd.yaml", "resnet18_erasing_sweep.yaml",
                                     "resnet_under_5m.yaml"}
AUGMENTATION_KEYS_DEFINED = all(k.split(".")[1] in {f.name for f in dataclasses.fields(DataConfig)}
                                for k in AUGMENTATION_KEYS)
AUGMENTATION_XFAIL = pytest.mark.xfail(strict=False,
                                       reason="augmentation keys arrive with issue 3 (DALI/augment branch)")
PUBLISHED_STUDIES = {"resnet18_lr_schedule_wd", "resnet18_erasing_sweep", "resnet_under_5m", "adam_batch_lr_grid",
                     "optimizer_batch_decay"}


def _study_params(ids=STUDY_IDS):
    return [pytest.param(p, id=i, marks=[AUGMENTATION_XFAIL] if i in STUDIES_NEEDING_AUGMENTATION_KEYS else [])
            for p, i in zip(STUDY_FILES, ids)]


def _merged(path: str) -> dict:
    """The study's overrides with its `extends` chain applied, as one flat-ish mapping (for stripping)."""
    merged: dict = {}
    for overrides in read_config_chain(path):
        for section, fields in overrides.items():
            merged.setdefault(section, {}).update(copy.deepcopy(fields))
    return merged


def strip_augmentation(overrides: dict) -> dict:
    """The study without AUGMENTATION_KEYS: fixed fields, searched keys and variant entries; empty variants dropped."""
    out = copy.deepcopy(overrides)
    for key in AUGMENTATION_KEYS:
        out.get("data", {}).pop(key.split(".")[1], None)
    space = out.get("tune", {}).get("search_space", {})
    for key in list(space):
        if key in AUGMENTATION_KEYS:
            del space[key]
    if VARIANTS in space:
        (kind, values), = space[VARIANTS].items()
        kept = [{k: v for k, v in variant.items() if k not in AUGMENTATION_KEYS} for variant in values]
        kept = [v for i, v in enumerate(kept) if v and v not in kept[:i]]
        space[VARIANTS] = {kind: kept}
    return out


def test_every_published_study_has_a_file_and_asha_variants_exist():
    names = {os.path.splitext(i)[0] for i in STUDY_IDS}
    assert PUBLISHED_STUDIES <= names
    # Studies 4 and 5 compare optimizers or batch sizes: each also ships as an ASHA study.
    for study in ("adam_batch_lr_grid", "optimizer_batch_decay"):
        assert load_config(os.path.join(ROOT, "studies", f"{study}_asha.yaml")).tune.scheduler == "asha"
        assert load_config(os.path.join(ROOT, "studies", f"{study}.yaml")).tune.scheduler == "fifo"


@pytest.mark.parametrize("path", _study_params())
def test_study_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.tune.search_space, "a study searches something"
    load_config(path, smoke_test=True)


@pytest.mark.parametrize("path", STUDY_FILES, ids=STUDY_IDS)
def test_study_without_augmentation_keys_validates(path, tmp_path):
    stripped = tmp_path / "study.yaml"
    stripped.write_text(yaml.safe_dump(strip_augmentation(_merged(path))))
    cfg = load_config(str(stripped))
    assert cfg.tune.search_space
    smoke = load_config(str(stripped), smoke_test=True)
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
    study_id = os.path.relpath(path, os.path.join(ROOT, "studies"))
    if study_id in STUDIES_NEEDING_AUGMENTATION_KEYS and not AUGMENTATION_KEYS_DEFINED:
        path = str(tmp_path / "stripped.yaml")  # until issue 3 lands: the study less its augmentation
        with open(path, "w") as f:
            yaml.safe_dump(strip_augmentation(_merged(os.path.join(ROOT, "studies", study_id))), f)
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
