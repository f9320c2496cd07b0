"""A real ASHA study on a local Ray cluster: 2-rank gloo DDP trials, a tiny ResNet, synthetic data.

The search space sets a learning rate that learns the colour-coded classes within an epoch
before one too small to move off chance, and trials run one at a time in grid order, so
ASHA's first rung must stop the hopeless one.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from conftest import TINY_MODEL
from ray_cifar import console
from ray_cifar.tuning import worker_setup

pytestmark = pytest.mark.integration

EPOCHS = 4


def cli_sets(*sets: str) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def test_asha_study_stops_weak_trials_and_writes_results(tmp_path, synthetic_parquet_dir):
    output = tmp_path / "study"
    args = cli_sets(*TINY_MODEL, f"train.epochs={EPOCHS}", "train.num_workers=2", "train.global_batch_size=50",
                    "data.val_size=100", "schedule.name=constant", "tune.grace_period=1", "tune.reduction_factor=2",
                    "tune.max_concurrent_trials=1",
                    "tune.search_space={optim.lr: {grid: [0.05, 0.0000001]}}")
    result = subprocess.run([sys.executable, "-m", "ray_cifar.tune", "--data", synthetic_parquet_dir,
                             "--output", str(output), *args], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Trial status" in result.stdout  # Ray's own progress table
    # Each trial's start and end in a line of ray_cifar's, not Tune's boxes of its config and of every metric it
    # reported (~45 lines a trial)
    assert "started with configuration" not in result.stdout and " iterations at " not in result.stdout
    assert "timing_trial_started_at" not in result.stdout
    assert "Checkpoint successfully created" not in result.stdout + result.stderr  # Ray Train's, every epoch
    assert "PreemptionWatcher" not in result.stdout + result.stderr  # Ray's C++ error line about its own actor
    assert "Current best trial" not in result.stdout  # Tune's, by each trial's last result: not the study's best
    assert len(re.findall(r"^\[ray_cifar\] trial \w+ started: optim\.lr=", result.stdout, re.M)) == 2
    assert re.search(r"^\[ray_cifar\] trial \w+ stopped by its scheduler after 1 epoch\(s\); best val_acc ",
                     result.stdout, re.M)
    assert re.search(r"^\[ray_cifar\] TensorBoard: .*; Ray dashboard: http://127\.0\.0\.1:\d+ \(its token: ray "
                     r"get-auth-token\)$", result.stdout, re.M)
    # Tune ends each DDP trial's process, its Train controller with it; Ray's cleanup of its placement group
    # is routine, and its warning (after every DDP trial) is not shown (ray_cifar.tuning.worker_setup).
    assert worker_setup.ROUTINE_CLEANUP not in result.stdout + result.stderr

    trials = pq.read_table(output / "trials.parquet").to_pylist()
    rows = pq.read_table(output / "results.parquet").to_pylist()
    assert len(trials) == 2
    by_lr = {t["optim.lr"]: t for t in trials}
    assert by_lr[0.05]["status"] == "completed" and by_lr[0.05]["epochs"] == EPOCHS
    # Two DDP trials are enough: at the first rung (reduction factor 2) the second is judged against the first.
    assert by_lr[0.0000001]["status"] == "stopped" and by_lr[0.0000001]["epochs"] < EPOCHS

    # One row per trial per epoch, searched field as a column, metrics present.
    assert len(rows) == sum(t["epochs"] for t in trials)
    for t in trials:
        epochs = sorted(r["epoch"] for r in rows if r["trial_id"] == t["trial_id"])
        assert epochs == list(range(1, t["epochs"] + 1))
    assert all(r["num_workers"] == 2 and r["images_per_second"] > 0 and r["epoch_seconds"] > 0 for r in rows)

    # Best first; the test split evaluated for the best trial only.
    best = trials[0]
    assert best["best_val_acc"] == max(t["best_val_acc"] for t in trials)
    assert best["best_val_acc"] > 0.5
    assert best["test_acc"] is not None and best["test_acc"] > 0.5
    assert all(t["test_acc"] is None for t in trials[1:])
    assert "best trial" in result.stdout

    # The driver's console, kept in OUTPUT/logs, without colour codes: every line it printed up to the report's
    # (the ranks' forwarded lines included, and the data line printed before the output folder exists; what Ray
    # prints as the process exits may come after the log's end), and Ray's logger's lines.
    (log,) = (output / console.LOGS).iterdir()
    first, *lines = log.read_text().splitlines()
    assert first.endswith(" python -m ray_cifar.tune " + shlex.join(["--data", synthetic_parquet_dir, "--output",
                                                                      str(output), *args]))
    shown = console.ANSI.sub("", result.stdout).splitlines()
    shown = shown[:next(i for i, line in enumerate(shown) if line.startswith("[ray_cifar] report:")) + 1]
    logged = set(lines)
    assert [line for line in shown if line not in logged] == [] and shown[0].startswith("cifar10: ")
    assert any("(RayTrainWorker pid=" in line and f"epoch {EPOCHS}/{EPOCHS}" in line for line in lines)
    assert any("Started a local Ray instance" in line for line in lines) and "\x1b" not in "".join(lines)
