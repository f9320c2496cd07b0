"""Trial packing (train.gpus_per_worker < 1): the rules, the resource arithmetic, the trainer's request,
and the memory cap of a rank on a share of a GPU. No Ray cluster is started. The cap's GPU test is in
test_engine.py, whose imports need no Ray: the core GPU check runs it on a machine without Ray."""

from __future__ import annotations

import pytest
import torch

from ray_cifar import engine
from ray_cifar.tuning import cluster as ray_cluster
from ray_cifar.config import ConfigError
from ray_cifar.validation import check_resources, load_config

NO_SEARCH = "tune.search_space={}"


def refused(sets: list[str]) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(None, sets)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("share", [0, -0.25, 1.5, 2])
def test_a_share_must_be_in_0_1(share):
    assert refused([f"train.gpus_per_worker={share}", NO_SEARCH]).startswith(
        f"--set train.gpus_per_worker={share}: train.gpus_per_worker: must be in (0, 1]: a rank trains on one GPU")


def test_a_share_of_a_gpu_needs_a_one_rank_trial():
    message = refused(["train.gpus_per_worker=0.5", "train.num_workers=2", NO_SEARCH])
    assert message.startswith("--set train.gpus_per_worker=0.5: train.gpus_per_worker: a share of a GPU needs "
                              "train.num_workers 1, not 2: ")
    assert "union of its GPU ids" in message and "Duplicate GPU" in message and message.endswith("(got 0.5)")
    load_config(None, ["train.gpus_per_worker=0.5", "train.num_workers=1", NO_SEARCH])
    load_config(None, ["train.gpus_per_worker=1", "train.num_workers=2", NO_SEARCH])  # whole GPUs: DDP as before


@pytest.mark.parametrize("space, prefix", [
    # Each value is fine alone (the other key keeps its default): only the cross product meets both.
    ("{train.num_workers: {grid: [1, 2]}, train.gpus_per_worker: {grid: [0.5, 1]}}",
     "tune.search_space: the trial with train.num_workers=2, train.gpus_per_worker=0.5: "),
    ("{variants: {grid: [{train.gpus_per_worker: 0.25}, {train.num_workers: 2, train.gpus_per_worker: 0.5}]}}",
     "tune.search_space.variants: value {'train.num_workers': 2, 'train.gpus_per_worker': 0.5}: "),
])
def test_every_trial_of_a_searched_study_is_checked(space, prefix):
    message = refused([f"tune.search_space={space}"])
    assert message.startswith(f"--set tune.search_space={space}: {prefix}train.gpus_per_worker: a share of a GPU "
                              "needs train.num_workers 1"), message


def test_packed_and_ddp_trials_can_share_a_study():
    load_config(None, ["tune.search_space={variants: {grid: [{train.gpus_per_worker: 0.25}, "
                       "{train.num_workers: 2}]}}"])


def test_a_share_with_use_gpu_false_is_refused_and_ignored_where_use_gpu_is_null():
    cfg = load_config(None, ["train.gpus_per_worker=0.25", "train.use_gpu=false", NO_SEARCH])
    with pytest.raises(ConfigError, match=r"^train.gpus_per_worker: a share of a GPU has no effect with "
                                          r"train.use_gpu false .* \(got 0.25\)$"):
        check_resources(cfg, cpus=8, gpus=1)
    cfg.train.use_gpu = None
    check_resources(cfg, cpus=8, gpus=0)  # no GPU here: CPU ranks, the share is ignored
    check_resources(cfg, cpus=8, gpus=1)


def test_check_resources_gives_every_trial_its_own_gpu_count():
    cfg = load_config(None, ["train.use_gpu=true", "train.gpus_per_worker=0.25", NO_SEARCH])
    check_resources(cfg, cpus=2, gpus=1)
    cfg = load_config(None, ["train.use_gpu=true", "train.global_batch_size=256",
                             "tune.search_space={variants: {grid: [{train.gpus_per_worker: 0.25}, "
                             "{train.num_workers: 4}]}}"])
    check_resources(cfg, cpus=8, gpus=4)
    with pytest.raises(ConfigError, match=r"^tune.search_space: the trial with variants=.*: train.num_workers: a trial "
                                          r"needs 4 rank\(s\) x train.gpus_per_worker=1 = 4 GPUs, more than the 2"):
        check_resources(cfg, cpus=8, gpus=2)
    cfg = load_config(None, ["train.use_gpu=false", "tune.search_space={variants: {grid: [{optim.lr: 0.1}, "
                                                    "{train.gpus_per_worker: 0.5}]}}"])
    with pytest.raises(ConfigError, match=r"^tune.search_space: the trial with variants=.*gpus_per_worker.*: "
                                          r"train.gpus_per_worker: a share of a GPU has no effect"):
        check_resources(cfg, cpus=8, gpus=1)


@pytest.mark.parametrize("cpus, gpus, cpus_per_trial, gpus_per_trial, fits", [
    (16, 1, 1.25, 0.25, 4),   # four quarter-GPU trials on one GPU
    (16, 2, 1.25, 0.25, 8),
    (16, 1, 1.25, 0.3, 3),    # 0.9 of the GPU used; a fourth would need 1.2
    (4, 1, 1.25, 0.25, 3),    # the CPUs run out first
    (16, 8, 2.25, 2.0, 4),    # 2-rank DDP trials on whole GPUs
    (16, 0, 1.25, 0.0, 12),   # CPU trials: GPUs do not count
    (0, 0, 1.25, 1.0, 1),     # an autoscaling cluster's CPU-only head: one trial asks for nodes
])
def test_trials_that_fit(cpus, gpus, cpus_per_trial, gpus_per_trial, fits):
    assert ray_cluster.trials_that_fit(cpus, gpus, cpus_per_trial, gpus_per_trial) == fits


@pytest.mark.parametrize("sets, resources, concurrent", [
    (["train.gpus_per_worker=0.25", NO_SEARCH], {"CPU": 16.0, "GPU": 1.0}, 4),
    (["train.gpus_per_worker=0.5", NO_SEARCH], {"CPU": 16.0, "GPU": 1.0}, 2),
    (["train.num_workers=2", NO_SEARCH], {"CPU": 16.0, "GPU": 4.0}, 2),
    # The largest trial decides: a whole-GPU variant beside a quarter-GPU base.
    (["train.gpus_per_worker=0.25", "tune.search_space={variants: {grid: [{optim.lr: 0.1}, "
                                    "{train.gpus_per_worker: 1}]}}"], {"CPU": 16.0, "GPU": 2.0}, 2),
])
def test_concurrent_trials_packs_shares_of_a_gpu(sets, resources, concurrent):
    cfg = load_config(None, sets + ["train.use_gpu=true"])
    assert ray_cluster.concurrent_trials(cfg, resources) == concurrent
    cfg.train.use_gpu = False  # CPU trials: the share does not count (resolved so on a CPU cluster)
    cpu_trials = ray_cluster.trials_that_fit(resources["CPU"], 0, ray_cluster.trial_cpus(cfg), 0)
    assert ray_cluster.concurrent_trials(cfg, resources) == cpu_trials


@pytest.mark.parametrize("use_gpu, share, expected", [(True, 0.25, {"CPU": 1.0, "GPU": 0.25}),
                                                      (True, 1.0, {"CPU": 1.0, "GPU": 1.0}),
                                                      (False, 1.0, {"CPU": 1.0})])
def test_the_trainer_asks_each_rank_for_its_share(tmp_path, use_gpu, share, expected):
    from ray_cifar.tuning import trial

    cfg = load_config(None, [f"train.use_gpu={str(use_gpu).lower()}", f"train.gpus_per_worker={share}", NO_SEARCH])
    scaling = trial.make_trainer(cfg, str(tmp_path), "trial-x").scaling_config  # built, never fit
    assert scaling.use_gpu is use_gpu and scaling.num_workers == 1
    assert scaling.resources_per_worker == expected


class Capped(Exception):
    """Raised by the fake cap: stops a run there (nothing after the cap is under test)."""


@pytest.fixture
def cap_calls(monkeypatch) -> list:
    calls = []

    def cap(device, fraction):
        calls.append((device, fraction))
        raise Capped

    monkeypatch.setattr(engine, "cap_gpu_memory", cap)
    return calls


def test_a_rank_caps_its_gpu_memory_before_loading_data(monkeypatch, cap_calls):
    """train_loop_per_worker with 0.5: the rank's device and share reach the cap first (Ray's context faked)."""
    import ray.train.torch

    from ray_cifar.tuning import trial

    class Context:
        def get_world_rank(self):
            return 0

        def get_world_size(self):
            return 1

        def get_local_world_size(self):
            return 1

    monkeypatch.setattr(ray.train, "get_context", Context)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(trial, "load_cifar10", lambda *a, **k: pytest.fail("data loaded before the cap"))
    cfg = load_config(None, ["train.use_gpu=true", "train.gpus_per_worker=0.5", NO_SEARCH])
    with pytest.raises(Capped):
        trial.train_loop_per_worker({"config": cfg.to_dict(), "started": None})
    assert cap_calls == [(torch.device("cuda", 0), 0.5)]


def test_a_one_rank_trial_in_its_tune_process_caps_its_gpu_memory_too(tmp_path, monkeypatch, cap_calls):
    """The packed case itself: a one-rank trial trains in its Tune trial process, on its share of cuda:0."""
    from ray_cifar.tuning import trial

    monkeypatch.setattr(trial, "load_cifar10", lambda *a, **k: pytest.fail("data loaded before the cap"))
    cfg = load_config(None, ["train.use_gpu=true", "train.gpus_per_worker=0.25", NO_SEARCH])
    with pytest.raises(Capped):
        trial.train_in_trial_process(cfg, str(tmp_path), trial.trainer_name("t1"), started=None)
    assert cap_calls == [(torch.device("cuda", 0), 0.25)]


def test_a_one_process_run_caps_its_gpu_memory_too(tmp_path, cap_calls):
    from ray_cifar import train

    cfg = load_config(None, ["train.use_gpu=true", "train.gpus_per_worker=0.25", NO_SEARCH])
    with pytest.raises(Capped):
        train.run_local(cfg, dataset=None, output=str(tmp_path), run_id="x")  # stopped before the data is used
    assert cap_calls == [(torch.device("cuda"), 0.25)]


def test_the_cap_is_set_once_on_cuda_with_a_share_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d)))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("P", (), {"total_memory": 80 * 2**30}))
    assert engine.cap_gpu_memory(torch.device("cpu"), 0.5) is None
    assert engine.cap_gpu_memory(torch.device("cuda", 0), 1.0) is None
    assert calls == []
    message = engine.cap_gpu_memory(torch.device("cuda", 1), 0.25)
    assert calls == [(0.25, 1)] and message == "0.25 of GPU 1, memory capped to 20.0 of 80.0 GiB"
