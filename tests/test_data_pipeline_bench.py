"""benchmarks/data_pipeline.py, which the GPU check's augment, loaders and fed_epoch parts run: a loader that
fails (here DALI's, its module unimportable) is recorded with its error, the other loaders are still measured,
and data.pipeline=auto reads the failure from the measurement file. Real loaders (a torchvision DataLoader with
worker processes, the torch path), tiny sizes."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import data_pipeline as bench  # noqa: E402
import gpu_figures  # noqa: E402
from conftest import TINY_MODEL, synthetic_cifar  # noqa: E402

from ray_cifar.data import pipelines  # noqa: E402
from ray_cifar.data.loader import Split  # noqa: E402
from ray_cifar.validation import load_config  # noqa: E402


def test_the_fed_epochs_train_under_the_devices_fast_paths_as_a_trial_does(monkeypatch):
    # cuDNN autotuning and TF32 are set per process, on CUDA only (engine.set_fast_paths): the fed epochs' model
    # must step under them, or the slower model hides what a loader costs. Recorded here, as no GPU is needed to
    # ask for them.
    from ray_cifar import engine

    asked = []
    monkeypatch.setattr(engine, "set_fast_paths", asked.append)
    bench.training_step(torch.device("cpu"), "bf16", TINY_MODEL)
    assert asked == [torch.device("cpu")]


def test_a_failing_loader_is_recorded_the_others_measured_and_auto_takes_the_torch_path(tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    data = synthetic_cifar(n_train=256)
    split = Split(torch.from_numpy(data.train_images), torch.from_numpy(data.train_labels))
    args = argparse.Namespace(batch_size=32, seconds=0.05, repeats=1, images=256)
    monkeypatch.setattr(bench, "dali_available", lambda: True)  # DALI's loader is offered ...
    monkeypatch.setitem(sys.modules, "ray_cifar.data.dali", None)  # ... and its build fails (ModuleNotFoundError)
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 1)  # one DataLoader worker process

    def make_feeds(set_name):
        return bench.feeds(set_name, args, split, data.train_images, data.train_labels, cpu)

    record, figures = bench.Recorder(args.repeats), []
    bench.measure_loaders(record, make_feeds, args, cpu, on_figure=lambda: figures.append(len(record.results)))
    assert [(r["set"], r["path"]) for r in record.results] == [
        (s, p) for s in bench.SETS for p in ("torchvision-dataloader", "torch-batch")]
    assert all(r["images_per_second"] > 0 and r["build_seconds"] >= 0 for r in record.results)
    assert [(e["set"], e["path"]) for e in record.errors] == [(s, "dali-cpu") for s in bench.SETS]
    assert all(e["error"].startswith("ModuleNotFoundError: ") for e in record.errors)
    assert len(figures) == 6  # the parts' JSON is rewritten after every loader, the failed ones too

    # The fed epochs (fed_epoch): the failed loader is an error, the others are trained on.
    fed = bench.Recorder(1)
    step = bench.training_step(cpu, "bf16", TINY_MODEL)
    ratios = bench.measure_training(fed, make_feeds, args, cpu, step=step, images=64)
    assert {r["path"] for r in fed.results} == {"resnet18-from-gpu-memory", "resnet18-fed-by-torchvision-dataloader",
                                               "resnet18-fed-by-torch-batch"}
    assert len(ratios) == 4 and [e["path"] for e in fed.errors] == ["resnet18-fed-by-dali-cpu"] * 2

    # The measurement file keeps the failure; auto reads it: the torch path, and why.
    out = bench.results_document(args, cpu, data.source, args.images, record, bench.loader_ratios(record.results, cpu))
    assert out["errors"] == record.errors and not any("dali" in k for k in out["ratios"])
    # README "GPU figures" says which loader failed where, with its error.
    assert [line for line in gpu_figures.loaders(out) if "FAILED" in line] == [
        f"- FAILED dali-cpu ({e['set']}): {e['error']}" for e in record.errors]
    bench.write_json(out, str(tmp_path), "data_pipeline_cpu.json")
    monkeypatch.setattr(pipelines, "BENCHMARK_RESULTS", str(tmp_path))
    monkeypatch.setattr(pipelines, "dali_available", lambda: True)
    logs = []
    cfg = load_config(None, ["data.crop_padding=4", "data.flip_p=0.5"]).data
    assert pipelines.resolve_pipeline(cfg, cpu, logs.append, images=10_000) == "torch"
    assert "DALI failed on the crop+flip set when measured" in logs[-1] and "ModuleNotFoundError" in logs[-1]


def test_auto_takes_dali_where_only_the_other_set_failed(tmp_path, monkeypatch):
    results = [{"set": s, "path": p, "images_per_second": ips}
               for s in ("crop+flip", "full") for p, ips in (("torch-batch", 900.0), ("dali-cpu", 1200.0))]
    errors = [{"set": "full", "path": "dali-cpu", "error": "RuntimeError: out of memory"}]
    (tmp_path / "data_pipeline_cpu.json").write_text(json.dumps({"device": "test cpu", "results": results[:3],
                                                                 "errors": errors}))
    monkeypatch.setattr(pipelines, "BENCHMARK_RESULTS", str(tmp_path))
    monkeypatch.setattr(pipelines, "dali_available", lambda: True)
    logs = []
    crop_flip = load_config(None, ["data.crop_padding=4", "data.flip_p=0.5"]).data
    full = load_config(None, ["data.crop_padding=4", "data.flip_p=0.5", "data.autoaugment=cifar10"]).data
    assert pipelines.resolve_pipeline(crop_flip, torch.device("cpu"), logs.append) == "dali" and "1200" in logs[-1]
    assert pipelines.resolve_pipeline(full, torch.device("cpu"), logs.append) == "torch"
    assert "DALI failed on the full set" in logs[-1] and "out of memory" in logs[-1]


def test_fewer_images_than_a_batch_is_an_error_not_a_loader_that_spins_for_ever(capsys):
    # Every loader drops the last part batch: such an epoch has none, and endless() looped on it without yielding.
    batches = bench.endless(lambda epoch: iter([]))
    with pytest.raises(ValueError, match="fewer images than a batch"):
        next(batches)
    assert list(itertools.islice(bench.endless(lambda epoch: iter([epoch])), 3)) == [0, 1, 2]
    with pytest.raises(SystemExit):
        bench.parse_args(["--images", "256", "--batch-size", "512"])
    assert "--images 256 is fewer than --batch-size 512" in capsys.readouterr().err


def test_a_run_smaller_than_the_measurement_does_not_replace_it_unless_given_an_output(synthetic_parquet_dir, capsys):
    """The measurement data.pipeline=auto reads was the default output of every run: a 1 s, 1-repeat run on 2,000
    images replaced the committed figures of a quiet machine, unsaid, and changed what every CPU study picks."""
    measurement = os.path.join(pipelines.BENCHMARK_RESULTS, "data_pipeline_cpu.json")
    before = open(measurement, "rb").read()
    status = bench.main(["--data", synthetic_parquet_dir, "--images", "600", "--seconds", "0.1", "--repeats", "1"])
    assert status == 2 and open(measurement, "rb").read() == before
    assert capsys.readouterr().err == (
        "data_pipeline.py: error: --images 600, --seconds 0.1, --repeats 1: not the sizes of the measurement "
        f"data.pipeline=auto reads ({os.path.relpath(pipelines.BENCHMARK_RESULTS)}); give --output DIR for this "
        "run's figures\n")
    args = bench.parse_args(["--images", "60000"])
    assert bench.default_output_refusal(args, 50000) is None  # all of CIFAR-10's train images, the default sizes
