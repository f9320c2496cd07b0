"""What a trial asks Ray and Tune for, by its rank count: a one-rank trial is its own rank (it trains in its
Tune trial process), a DDP trial's process only drives its TorchTrainer. No Ray cluster is started."""

from __future__ import annotations

import os

import pytest
import torch

from ray_cifar.tuning import cluster as ray_cluster
from ray_cifar.validation import load_config

NO_SEARCH = "tune.search_space={}"


@pytest.mark.parametrize("sets, expected", [
    (["train.num_workers=1", "train.cpus_per_worker=2"], {"CPU": 2.0}),
    (["train.num_workers=1", "train.use_gpu=true"], {"CPU": 1.0, "GPU": 1.0}),
    (["train.num_workers=1", "train.use_gpu=true", "train.gpus_per_worker=0.25"], {"CPU": 1.0, "GPU": 0.25}),
    (["train.num_workers=2", "tune.trial_driver_cpus=0.25"], {"CPU": 0.25}),
    (["train.num_workers=4", "train.use_gpu=true"], {"CPU": 0.25}),  # the ranks ask for their GPUs themselves
])
def test_trial_resources(sets, expected):
    assert ray_cluster.trial_resources(load_config(None, [*sets, NO_SEARCH])) == expected


def test_a_one_rank_trial_holds_no_driver_cpus():
    one, two = (load_config(None, [f"train.num_workers={n}", NO_SEARCH]) for n in (1, 2))
    assert ray_cluster.trial_cpus(one) == 1.0
    assert ray_cluster.trial_cpus(two) == 2.25


@pytest.mark.parametrize("space, reuse, retries", [
    (NO_SEARCH, True, 1 + 2),  # every trial one rank: a dead rank is a failed trial, so Train's retries move to Tune
    ("tune.search_space={train.num_workers: {grid: [1, 2]}}", False, 1),  # a DDP trial among them
])
def test_reuse_and_retries_follow_the_largest_trial(space, reuse, retries):
    cfg = load_config(None, ["train.num_workers=1", "train.max_failures=2", "tune.max_failures=1", space])
    assert ray_cluster.reuse_trial_processes(cfg) is reuse
    assert ray_cluster.max_failures(cfg) == retries


@pytest.mark.parametrize("space", [
    "tune.search_space={train.num_workers: {grid: [1, 2]}}",
    "tune.search_space={train: {grid: [{num_workers: 1}, {num_workers: 2}]}}",  # a section bundle
    "tune.search_space={variants: {grid: [{train.num_workers: 1}, {train.num_workers: 2, optim.lr: 0.2}]}}",
])
def test_ddp_trials_anywhere_in_the_search_space_count(space):
    """A 2-rank trial however it is searched: sized for 2 ranks, and no process reuse (Tune would hang on it)."""
    cfg = load_config(None, ["train.num_workers=1", space])
    assert ray_cluster.max_workers(cfg) == 2
    assert ray_cluster.reuse_trial_processes(cfg) is False


def test_an_address_where_no_cluster_answers_is_refused_in_one_line_after_a_wait(monkeypatch, capsys):
    """ray.init of such an address waited on, a warning every few seconds (still waiting after 200 s, measured)."""
    import socket

    from ray_cifar.config import ConfigError

    monkeypatch.setattr(ray_cluster, "CONNECT_WAIT_SECONDS", 1.5)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens there once it is closed
    cfg = load_config(None, [f"tune.address=127.0.0.1:{port}"])
    with pytest.raises(ConfigError, match=rf"^tune.address 127.0.0.1:{port}: no Ray cluster answers there"):
        ray_cluster._start_or_connect(cfg)
    assert f"no Ray cluster answers at 127.0.0.1:{port} (tune.address) yet: waiting up to 2 s" in capsys.readouterr().out
    with socket.socket() as listening:  # one that takes connections: no wait, no line (ray.init connects next)
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        ray_cluster._wait_for_cluster(f"127.0.0.1:{listening.getsockname()[1]}", "tune.address")
    ray_cluster._wait_for_cluster("auto", "$RAY_ADDRESS")  # not host:port: left to ray.init
    assert capsys.readouterr().out == ""


def test_a_local_ray_is_given_the_gpus_torch_sees(monkeypatch):
    """Ray's own GPU count (NVML) finds none in some containers where CUDA works: a local Ray is told torch's
    count, the one the study was checked against, and its CPUs fit one trial at least."""
    ddp = load_config(None, ["train.num_workers=2", NO_SEARCH])  # 2 ranks + 0.25 driver: 3 logical CPUs at least
    monkeypatch.setattr(ray_cluster, "local_resources", lambda: (2.0, 3.0))
    assert ray_cluster.local_sizes(ddp) == {"num_cpus": max(os.cpu_count() or 1, 3), "num_gpus": 3}
    monkeypatch.setattr(ray_cluster, "local_resources", lambda: (2.0, 0.0))
    sized = load_config(None, ["tune.num_cpus=5", NO_SEARCH])
    assert ray_cluster.local_sizes(sized) == {"num_cpus": 5, "num_gpus": 0}


def test_an_address_ray_cannot_connect_to_is_refused_in_one_line(monkeypatch):
    """"auto" with no Ray on this machine, or a ray:// server that never answers: ray.init raises ConnectionError
    (at once for "auto", after Ray client's 30 s for ray://), which was a traceback. Ray's own discovery cannot be
    run here to fail for sure ("auto" joins any Ray process on the machine, another test's included), so ray.init
    raises Ray's error for "auto" as Ray words it."""
    from ray_cifar.config import ConfigError

    def no_cluster(**kwargs):
        assert kwargs["address"] in ("auto", "ray://head:10001")
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to by "
                              "setting `--address` flag or `RAY_ADDRESS` environment variable.")

    monkeypatch.setattr(ray_cluster.ray, "init", no_cluster)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match=r"^tune.address auto: Ray could not connect \(Could not find any running "
                                          r"Ray instance\. .*\); start the cluster"):
        ray_cluster._start_or_connect(load_config(None, ["tune.address=auto"]))
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    with pytest.raises(ConfigError, match=r"^\$RAY_ADDRESS ray://head:10001: Ray could not connect"):
        ray_cluster._start_or_connect(load_config(None, []))
    # A GCS that takes the connection and then refuses the driver (Ray 2.60's token authentication, on unless
    # RAY_AUTH_MODE=disabled: seen against a `ray start` head) was "could not connect ... start the cluster".
    import socket

    with socket.socket() as gcs:
        gcs.bind(("127.0.0.1", 0))
        gcs.listen()
        address = f"127.0.0.1:{gcs.getsockname()[1]}"
        monkeypatch.setattr(ray_cluster.ray, "init", lambda **kwargs: (_ for _ in ()).throw(
            ConnectionError(f"Failed to connect to Ray cluster at {address}")))
        with pytest.raises(ConfigError, match=rf"^tune.address {address}: a Ray cluster answers there but the "
                                              r"connection failed .*token authentication"):
            ray_cluster._start_or_connect(load_config(None, [f"tune.address={address}"]))


@pytest.mark.parametrize("ids, visible, expected", [
    ([], None, 0),  # no GPU asked of Ray (use_gpu forced on a machine Ray gave none): torch's first
    ([2], "2", 0),  # Ray's default: the trial's process sees its GPU alone
    ([2], "0,1,2,3", 2),  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: every GPU visible, its place among them
    (["GPU-b"], "GPU-a,GPU-b", 1),  # ids as the machine's CUDA_VISIBLE_DEVICES named them
    ([3], None, 3),  # nothing narrowed, nothing set: the id is torch's index
])
def test_a_one_rank_trial_trains_on_the_gpu_ray_gave_it(monkeypatch, ids, visible, expected):
    # cuda:0 alone put every one-rank trial of a node (packed ones too) on its first GPU where Ray leaves
    # CUDA_VISIBLE_DEVICES alone. (Ray's own assignment is not started here: its ids are given.)
    import ray

    from ray_cifar.tuning import trial

    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # (inside a Ray worker)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: ids)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert trial.ray_gpu() == torch.device("cuda", expected)


def test_a_gpu_hidden_from_the_trial_is_an_error_in_one_line(monkeypatch):
    import ray

    from ray_cifar.tuning import trial

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [1])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(RuntimeError, match=r"^Ray gave this trial GPU 1, which CUDA_VISIBLE_DEVICES=0 hides$"):
        trial.ray_gpu()


def test_outside_ray_the_gpu_is_the_first_and_no_ray_is_started(monkeypatch):
    # ray.get_gpu_ids() starts a local Ray to answer where none runs (a one-rank trial's code in a test, say).
    import ray

    from ray_cifar.tuning import trial

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: pytest.fail("asked Ray, which starts one to answer"))
    assert trial.ray_gpu() == torch.device("cuda", 0)
