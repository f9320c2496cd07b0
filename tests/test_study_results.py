"""A real study's results: replicates get their own seeds and results, the best trial is chosen by
tune.metric/tune.mode (here val_loss/min) for the one test evaluation, per-trial TensorBoard files
land under the output folder (step = epoch), and trials.parquet has the timing columns."""

from __future__ import annotations

import glob
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from conftest import TINY_MODEL

pytestmark = pytest.mark.integration


def test_replicates_ranking_and_tensorboard(tmp_path, synthetic_parquet_dir):
    output = tmp_path / "study"
    sets = TINY_MODEL + ["train.epochs=2", "train.num_workers=1", "train.global_batch_size=50", "data.val_size=100",
                         "data.pipeline=torch", "tune.scheduler=fifo", "tune.num_samples=2", "tune.metric=val_loss",
                         "tune.mode=min", "tune.max_concurrent_trials=2", "train.seed=5",
                         "tune.search_space={optim.lr: {grid: [0.05]}}", "tune.dashboard=false"]
    args = [a for s in sets for a in ("--set", s)]
    result = subprocess.run([sys.executable, "-m", "ray_cifar.tune", "--data", synthetic_parquet_dir,
                             "--output", str(output), *args], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[ray_cifar] TensorBoard: " in result.stdout and "Ray dashboard" not in result.stdout  # tune.dashboard=false

    rows = pq.read_table(output / "results.parquet").to_pylist()
    trials = pq.read_table(output / "trials.parquet").to_pylist()
    assert sorted(t["train.seed"] for t in trials) == [5, 6]
    first_epoch = {r["train.seed"]: r["train_loss"] for r in rows if r["epoch"] == 1}
    assert first_epoch[5] != first_epoch[6]  # two real replicates, not two copies
    assert all(r["eval_seconds"] > 0 for r in rows)
    assert all(t["startup_seconds"] is not None and t["startup_seconds"] > 0 for t in trials)

    best_loss = {t["trial_id"]: min(r["val_loss"] for r in rows if r["trial_id"] == t["trial_id"]) for t in trials}
    winner = min(best_loss, key=best_loss.get)
    assert trials[0]["trial_id"] == winner and trials[0]["test_acc"] is not None
    assert trials[1]["test_acc"] is None
    assert trials[0]["best_metric"] == pytest.approx(best_loss[winner])

    for t in trials:
        assert glob.glob(str(output / "tensorboard" / t["trial_id"] / "events.out.tfevents.*"))
    assert f"tensorboard --logdir {output}" in result.stdout
