"""Start-up instrumentation: the per-phase timing columns of a trial's first row (no Ray started)."""

from __future__ import annotations

import pytest


def test_phase_clock_columns_add_up_to_the_startup(monkeypatch):
    import ray_cifar.tuning.trial as trial_mod

    now = iter([103.0, 104.5, 110.0])
    monkeypatch.setattr(trial_mod.time, "time", lambda: next(now))
    clock = trial_mod.PhaseClock(started=100.0)
    for phase in ("worker_group", "resume_read", "data_load"):
        clock.lap(phase)
    columns = clock.columns(startup_seconds=14.0, loop_setup=2.0)
    assert columns == {"timing_trial_started_at": 100.0, "timing_worker_group_seconds": 3.0,
                       "timing_resume_read_seconds": 1.5, "timing_data_load_seconds": 5.5,
                       "timing_loop_setup_seconds": 2.0, "timing_first_step_seconds": 2.0}


def test_epoch_row_keeps_timing_columns_only():
    from ray_cifar.results import epoch_row

    row = epoch_row("t1", {}, {"epoch": 1, "timing_data_load_seconds": 0.5, "time_this_iter_s": 3.0}, {})
    assert row["timing_data_load_seconds"] == 0.5 and "time_this_iter_s" not in row


@pytest.mark.parametrize("cores, ranks, concurrent, threads", [(2, 2, 1, 1), (16, 2, 1, 8), (16, 2, 4, 2), (2, 2, 2, 1)])
def test_concurrent_trials_split_the_cores(monkeypatch, cores, ranks, concurrent, threads):
    from ray_cifar.tuning import cluster as ray_cluster
    from ray_cifar.config import Config

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_cluster.os, "cpu_count", lambda: cores)
    cfg = Config()
    cfg.train.num_workers, cfg.train.use_gpu = ranks, False
    ray_cluster.split_cpu_threads(cfg, concurrent)
    assert cfg.train.torch_threads == threads


def test_thread_split_leaves_gpus_and_user_settings_alone(monkeypatch):
    from ray_cifar.tuning import cluster as ray_cluster
    from ray_cifar.config import Config

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    gpu, user = Config(), Config()
    gpu.train.use_gpu = True
    user.train.use_gpu, user.train.torch_threads = False, 3
    for cfg in (gpu, user):
        ray_cluster.split_cpu_threads(cfg, 4)
    assert gpu.train.torch_threads is None and user.train.torch_threads == 3


def test_ray_train_polls_the_ranks_often_unless_the_user_set_it(monkeypatch):
    from ray.train.v2._internal import constants as train_constants

    from ray_cifar.tuning.cluster import job_env_vars

    name = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    # Ray's own contract: it reads this variable and carries it from the trial process to its controller.
    assert train_constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR == name
    assert name in train_constants.ENV_VARS_TO_PROPAGATE
    monkeypatch.delenv(name, raising=False)
    assert 0 < float(job_env_vars()[name]) < train_constants.DEFAULT_HEALTH_CHECK_INTERVAL_S
    monkeypatch.setenv(name, "3")
    assert job_env_vars()[name] == "3"


CENSUS = """
import sys
from ray import tune
from ray.air._internal import usage
from ray_cifar.tuning import cluster
cluster.skip_unsent_callback_census()
usage.tag_callbacks([tune.Callback()])  # what Tune.run does with the study's callbacks
print(sorted(m for m in ("ray.air.integrations.mlflow", "ray.air.integrations.wandb") if m in sys.modules))
"""


@pytest.mark.parametrize("stats, imported", [("0", "[]"), ("1", "['ray.air.integrations.mlflow', "
                                                                 "'ray.air.integrations.wandb']")])
def test_callback_census_imports_the_trackers_only_where_usage_stats_are_sent(stats, imported):
    import os
    import subprocess
    import sys

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": stats}
    out = subprocess.run([sys.executable, "-c", CENSUS], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == imported


def test_worker_setup_drops_only_the_routine_placement_group_cleanup_line(monkeypatch):
    """The job's worker setup hook, in a logger like the cleaner's; this process's logger and unraisable hook are
    put back afterwards (the hook sets both, as it would in a worker)."""
    import logging
    import sys

    from ray_cifar.tuning import cluster, worker_setup

    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # restored at teardown
    hook = cluster.job_runtime_env({})["worker_process_setup_hook"]
    logger = logging.getLogger(worker_setup.CLEANER_LOGGER)

    def shown(message: str) -> bool:
        return bool(logger.filter(logger.makeRecord(logger.name, logging.WARNING, __file__, 0, message, (), None)))

    try:
        hook()
        hook()  # a worker that runs it twice keeps one filter
        assert logger.filters.count(worker_setup.not_routine_cleanup) == 1
        assert not shown("Detected that the Ray Train controller actor (ab12) is dead. Cleaning up placement group "
                         "= [PlacementGroupID(cd34)] created by this run.")
        assert shown("Failed to clean up placement group: the GCS is gone")
        assert shown("Failed to query placement group table: timeout. Assuming placement group is not removed.")
    finally:
        logger.removeFilter(worker_setup.not_routine_cleanup)


# A Ray worker's start as far as the hook goes: ray_cifar is not importable yet (a worker runs the hook before it
# puts the driver's directory on sys.path), the hook comes pickled (stdin), then Ray's SIGTERM handler is set.
WORKER = '''
import os, signal, sys, weakref

class NoRayCifar:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "ray_cifar":
            raise ModuleNotFoundError(name)

sys.meta_path.insert(0, NoRayCifar())
if sys.argv[1] == "hook":
    from ray import cloudpickle
    cloudpickle.loads(sys.stdin.buffer.read())()

def sigterm_handler(signum, frame):  # the name of a Ray worker's handler, which raises SystemExit too
    sys.exit(1)

signal.signal(signal.SIGTERM, sigterm_handler)

class Thing:
    pass

def on_collect(ref):  # the signal lands inside a callback that cannot raise
    os.kill(os.getpid(), signal.SIGTERM)

def bug(ref):
    raise ValueError("a bug of ours")

a, b = Thing(), Thing()
refs = [weakref.ref(a, on_collect), weakref.ref(b, bug)]
del a, b
print("went on")
'''


@pytest.mark.parametrize("hook", ["none", "hook"])
def test_worker_setup_drops_rays_sigterm_exit_from_a_callback_and_nothing_else(hook):
    """What a trial process printed in CI when Ray's SIGTERM landed in a weakref callback, made on purpose; the
    hook runs in a worker that cannot import ray_cifar."""
    import subprocess
    import sys

    from ray import cloudpickle
    from ray_cifar.tuning import cluster

    pickled = cloudpickle.dumps(cluster.job_runtime_env({})["worker_process_setup_hook"])
    result = subprocess.run([sys.executable, "-c", WORKER, hook], input=pickled, capture_output=True, timeout=60)
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0 and out == "went on\n", err
    assert "ValueError: a bug of ours" in err  # every other unraisable exception is still reported
    assert ("SystemExit: 1" in err) == (hook == "none"), err


# A Ray Train rank as Ray ends it mid-training: its training loop runs in a daemon thread, in torch's backward most
# of the time, when Ray's SIGTERM handler ends the main thread. The loop is a file named as ray_cifar's is (the hook
# finds training threads by their loop's file), with the steps of a small network that keep it in backward.
TRAINING_LOOP = '''
import threading
import torch
from torch import nn

torch.set_num_threads(1)
model = nn.Sequential(*[nn.Conv2d(16, 16, 3, padding=1) for _ in range(6)])
images = torch.randn(32, 16, 32, 32)
stepped = threading.Event()

def train():
    while True:
        model(images).square().mean().backward()
        stepped.set()
'''

RANK = '''
import importlib.util, os, signal, sys, threading, time

spec = importlib.util.spec_from_file_location("loop", sys.argv[2])
loop = importlib.util.module_from_spec(spec)
spec.loader.exec_module(loop)
if sys.argv[1] == "hook":
    from ray import cloudpickle
    cloudpickle.loads(sys.stdin.buffer.read())()

def sigterm_handler(signum, frame):  # a Ray worker's: SystemExit(1)
    sys.exit(1)

signal.signal(signal.SIGTERM, sigterm_handler)
threading.Thread(target=loop.train, daemon=True).start()
loop.stepped.wait(60)
time.sleep(0.5)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(60)
'''


def test_a_rank_ended_by_ray_mid_training_exits_with_its_status_not_a_cpp_abort(tmp_path):
    """Python ended such a thread from under torch's C++ as it finalized (its next take of the GIL called
    pthread_exit): std::terminate, ~95 lines of C++ stack and "Fatal Python error: Aborted" in a study's console,
    exit 134. Without the hook this process ended by SIGABRT 3 times in 3; the hook stops the thread first."""
    import subprocess
    import sys

    from ray import cloudpickle
    from ray_cifar.tuning import cluster

    (tmp_path / "ray_cifar").mkdir()
    (tmp_path / "ray_cifar" / "loop.py").write_text(TRAINING_LOOP)
    pickled = cloudpickle.dumps(cluster.job_runtime_env({})["worker_process_setup_hook"])
    result = subprocess.run([sys.executable, "-c", RANK, "hook", str(tmp_path / "ray_cifar" / "loop.py")],
                            input=pickled, capture_output=True, timeout=120)
    err = result.stderr.decode()
    assert result.returncode == 1 and "Aborted" not in err and "terminate" not in err, (result.returncode, err[-2000:])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the SystemExit that ends it
def test_at_exit_a_training_thread_at_work_is_stopped_and_one_waiting_on_a_lock_is_left(tmp_path):
    """A one-rank trial's thread waits in tune.report for Tune (a lock): no torch C++ state, and an exception raised in
    it would be met only once the lock came, so its process's exit waited the whole STOP_TRAINING_WAIT_S."""
    import importlib.util
    import os
    import sys
    import threading
    import time

    from ray_cifar.tuning import worker_setup

    (tmp_path / "ray_cifar").mkdir()
    (tmp_path / "ray_cifar" / "loop.py").write_text(
        "def wait(lock):\n    lock.acquire()\n\n"
        "def work(started, steps):\n    started.set()\n    while True:\n        steps.append(sum(range(1000)))\n")
    spec = importlib.util.spec_from_file_location("loop", tmp_path / "ray_cifar" / "loop.py")
    loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loop)
    lock, started, steps = threading.Semaphore(0), threading.Event(), []
    waiting = threading.Thread(target=loop.wait, args=(lock,), daemon=True)
    working = threading.Thread(target=loop.work, args=(started, steps), daemon=True)
    waiting.start()
    working.start()
    try:
        assert started.wait(10)
        while os.path.basename(sys._current_frames()[waiting.ident].f_code.co_filename) != "threading.py":
            time.sleep(0.01)  # until it waits on the lock
        assert worker_setup.training_threads() == [working.ident]
        assert worker_setup.stop_training_threads(wait_s=10) == []
        working.join(10)
        assert not working.is_alive() and waiting.is_alive()
    finally:
        lock.release()
        waiting.join(10)
