"""Must-show 2: a study runs end to end through Ray Tune + 2 DDP ranks on each pipeline, and the
per-epoch Parquet rows record the pipeline that fed it (dali-cpu on a machine without a GPU).

Here the DALI one: a study of one 2-rank trial, the ranks fed by DALI with every augmentation it has. The torch
pipeline's 2-rank rows are checked in test_two_nodes (its study's trial), and the two pipelines side by side in
one study in test_gpu_check's ray_dali dry run (one-rank trials). A second,
torch-fed DDP trial here cost a third of the test's ~80 s on 2 cores and checked nothing those do not."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from conftest import TINY_MODEL

pytestmark = pytest.mark.integration

pytest.importorskip("nvidia.dali", reason="nvidia.dali is not installed: no DALI study to run")


def test_study_with_dali_fed_ddp_ranks_records_the_pipeline(synthetic_parquet_dir, tmp_path):
    output = tmp_path / "study"
    sets = TINY_MODEL + [
        "train.epochs=2", "train.num_workers=2", "train.global_batch_size=100", "train.eval_batch_size=100",
        "train.torch_threads=1", "train.use_gpu=false", "data.val_size=100", "data.erasing_p=0.5",
        "data.autoaugment=cifar10", "data.mixup_p=0.5", "tune.scheduler=fifo", "data.pipeline=dali",
        "tune.search_space={}",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                                         os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "ray_cifar.tune", "--data", synthetic_parquet_dir, "--output", str(output)]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = pq.read_table(output / "results.parquet").to_pylist()
    assert sorted((r["data_pipeline"], r["epoch"], r["num_workers"]) for r in rows) == [("dali-cpu", 1, 2),
                                                                                         ("dali-cpu", 2, 2)]
    assert all(0.0 <= row["val_acc"] <= 1.0 and row["train_images"] == 500 for row in rows)
