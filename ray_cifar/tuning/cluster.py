"""Ray itself: connect to a cluster or start a local one, and what a trial needs of it.

Nothing here trains; `trial` and `study` ask this module for a running Ray and for
resource arithmetic (CPUs and GPUs per trial, trials that fit at once).
"""

from __future__ import annotations

import _thread
import contextlib
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time

import ray

from ..config import Config, ConfigError, trial_configs
from ..validation import check_resources, local_resources
from . import worker_setup


def runs_in_trial_process(num_workers: int) -> bool:
    """A one-rank trial trains in its Tune trial process (no DDP, no TorchTrainer); DDP trials run on TorchTrainer."""
    return num_workers == 1


def trial_cpus(cfg: Config, num_workers: int | None = None) -> float:
    """CPUs a trial holds while it runs: its ranks, plus its driver when the ranks are a TorchTrainer's."""
    ranks = num_workers or cfg.train.num_workers
    driver = 0.0 if runs_in_trial_process(ranks) else cfg.tune.trial_driver_cpus
    return driver + ranks * cfg.train.cpus_per_worker


def trial_resources(cfg: Config) -> dict[str, float]:
    """What a trial's Tune process asks Ray for: a one-rank trial is its own rank (its CPUs and GPU);
    a DDP trial's process only drives its TorchTrainer, whose workers ask for the ranks' resources."""
    if runs_in_trial_process(cfg.train.num_workers):
        return {"CPU": cfg.train.cpus_per_worker, **({"GPU": cfg.train.gpus_per_worker} if cfg.train.use_gpu else {})}
    return {"CPU": cfg.tune.trial_driver_cpus}


# How long Tune waits for a finished (or stopped) trial's thread before it runs the next trial in the
# same process; a one-rank trial's thread ends at its next report, within a second or so.
REUSE_WAIT_SECONDS = "60"


def reuse_trial_processes(cfg: Config) -> bool:
    """Tune's reuse_actors: where every trial has one rank, the next trial trains in a finished trial's
    process (Python, torch and DALI already imported, the dataset mapped): most of its start-up.

    Not with DDP trials: their thread sits inside TorchTrainer.fit(), which does not return when Tune
    stops the trial (ASHA); Tune waited the whole REUSE_WAIT_SECONDS, errored the next trial, and the
    study hung (measured with Ray 2.60 on the smoke study)."""
    return runs_in_trial_process(max_workers(cfg))


def max_failures(cfg: Config) -> int:
    """Tune's retries of a failed trial. Where every trial has one rank, a dead rank is a failed trial
    (there is no worker group to restart), so train.max_failures counts here too."""
    one_rank = runs_in_trial_process(max_workers(cfg))
    return cfg.tune.max_failures + (cfg.train.max_failures if one_rank else 0)


def max_workers(cfg: Config) -> int:
    """The most DDP ranks any trial of the study asks for (searched as a key, in a section or a variant)."""
    return _trial_extent(cfg)[0]


# (ranks, GPU share, epochs, search space) -> (most ranks, most GPUs, most epochs) over the study's trials:
# expanding the search space costs ~10 ms a point, and a study's start asks several times (sizing Ray, trials
# at once, threads, process reuse, retries, ASHA's top rung, the banner).
_EXTENTS: dict[str, tuple[int, float, int]] = {}


def _trial_extent(cfg: Config) -> tuple[int, float, int]:
    key = json.dumps([cfg.train.num_workers, cfg.train.gpus_per_worker, cfg.train.epochs, cfg.tune.search_space],
                     sort_keys=True, default=str)
    if key not in _EXTENTS:
        trials = [trial.train for _, trial in trial_configs(cfg)]
        _EXTENTS[key] = (max(t.num_workers for t in trials), max(t.num_workers * t.gpus_per_worker for t in trials),
                         max(t.epochs for t in trials))
    return _EXTENTS[key]


def max_trial_epochs(cfg: Config) -> int:
    """The most epochs any trial of the study trains (train.epochs, searched as a key or in a variant): ASHA's top
    rung when tune.max_epochs is not set. It was the fixed train.epochs, and ASHA cut a trial that searched 4 epochs
    at the study's 2, which then read `completed`."""
    return _trial_extent(cfg)[2]


def max_trial_gpus(cfg: Config) -> float:
    """The most GPUs any trial of the study asks for: its ranks times each rank's GPU or share of one,
    over every trial the search space can give (variants included)."""
    return _trial_extent(cfg)[1]


# How often Ray Train's controller polls a DDP trial's ranks (its default: 2 s). Each poll takes at most one
# report from a rank, whose queue holds one (Ray 2.60, train/v2 worker.py): a rank reporting faster than the
# polls waits in `report`, and every step of a trial's life (workers up, first report, last report, done)
# waits for the next poll. Measured on 2 CPU cores, a 3-trial 2-rank study of short epochs: 117.9 s at 2 s,
# 81.4 s at 0.5 s (epochs 2.0 s apart -> 0.45 s; last epoch to trial done 6.6 s -> 1.8 s). A poll is a tiny
# task per rank; a poll that takes longer counts as a missed health check, not a failure (a rank is dead only
# after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 min). Ray carries the variable from the trial process (the
# TorchTrainer's driver) to its controller.
TRAIN_POLL_SECONDS = "0.5"


def job_env_vars() -> dict[str, str]:
    """Environment of every process of the study's Ray job (trial processes, Train controllers, ranks)."""
    return {
        # Ray Train 2.60 routes workers' print() through its logger *and* the stream
        # (every line twice); our workers print one line an epoch, so keep plain print.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        "TUNE_FUNCTION_THREAD_TIMEOUT_S": REUSE_WAIT_SECONDS,
        # A value the user exported wins (the job's env_vars would override the cluster's own).
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_SECONDS),
    }


def job_runtime_env(env_vars: dict[str, str]) -> dict:
    """The study's Ray job: its environment variables, and the first thing every worker process runs.

    The hook goes to the workers pickled by value, not as a module path: a worker runs it before it puts the
    driver's directory on its sys.path, so in a checkout that is not installed (`python -m ray_cifar.tune` run
    from its root, as on the GPU machine) `import ray_cifar` would fail there and every worker would die."""
    ray.cloudpickle.register_pickle_by_value(worker_setup)
    return {"env_vars": env_vars, "worker_process_setup_hook": worker_setup.quiet_routine_ray_lines}


def init_ray(cfg: Config) -> str:
    """Connect to a cluster (tune.address / $RAY_ADDRESS) or start a local Ray sized for one trial at least; the
    dashboard's host:port, "" where there is none (tune.dashboard false).

    A SIGTERM or Ctrl-C while ray.init runs is held until it returns (_signals_held); then Ray is shut down, what
    it started is ended, and KeyboardInterrupt is raised: the caller's line with the --resume command
    (cli.sigterm_as_ctrl_c), exit 130. Raised inside ray.init (Ray's own SIGTERM handler, sys.exit(15), or
    Python's KeyboardInterrupt), the exception unwound Ray's half-made C++ objects: the driver aborted
    ("terminate called without an active exception", exit -6, in a CI) or hung for ever in the destructor of
    Ray's GlobalStateAccessor (1 of 34 SIGTERMs sent 0-2 s after Ray's agents appeared). A second signal, or
    HOLD_SECONDS without ray.init returning, raises in it all the same.

    Whatever stops ray.init part way ends the Ray processes it had started (every process below the driver then
    that was not there before). Ray does not: its agents, started by the raylet, lived on, reparented, for a
    minute or more after the driver had exited (measured 60-77 s, in half the tries: they wait on the gone GCS
    for its reconnect timeout)."""
    before = set(_descendants(os.getpid()))
    with _signals_held() as held:
        try:
            dashboard = _start_or_connect(cfg)
        except BaseException:
            end_started(before)
            if held:
                raise KeyboardInterrupt from None
            raise
    if held:
        ray.shutdown()
        end_started(before)
        raise KeyboardInterrupt
    _drop_routine_forwarded_lines()
    return dashboard


# Ray Train's controller starts its PreemptionWatcher actor with arguments in the object store and restarts allowed,
# and Ray's core worker logs that at ERROR as each DDP trial starts ("[... E ...] core_worker.cc:2465: Actor with
# class name: 'PreemptionWatcher' and ID: '...' has constructor arguments in the object store and max_restarts >
# 0"): a line a trial that reads as a failure, about Ray's own actor. It is C++'s, out of reach of Python's logging
# in the controller's process, so the driver drops it from the lines Ray forwards; every other line passes.
ROUTINE_FORWARDED = re.compile(r"Actor with class name: 'PreemptionWatcher' .* has constructor arguments in the "
                               r"object store and max_restarts > 0")


def _drop_routine_forwarded_lines() -> None:
    try:  # Ray 2.60's dispatcher of the workers' lines to the driver's screen (a private name: Ray is pinned)
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return

    def dropping(handle):
        def handler(data: dict) -> None:
            lines = [line for line in data.get("lines", []) if not ROUTINE_FORWARDED.search(line)]
            if lines:
                handle({**data, "lines": lines})

        handler.drops_routine_lines = True
        return handler

    with dispatcher._lock:
        dispatcher.handlers = [(name, handle if getattr(handle, "drops_routine_lines", False) else dropping(handle))
                               for name, handle in dispatcher.handlers]


# The longest a signal is held while ray.init runs: a local Ray starts in 2-15 s here (a loaded 2-core machine),
# but ray.init of an address where no cluster answers was still waiting after 200 s; a SIGTERM is most often
# followed by a SIGKILL 30 s later (Kubernetes' default grace period).
HOLD_SECONDS = 20.0


@contextlib.contextmanager
def _signals_held():
    """Inside, SIGTERM and SIGINT (unless ignored) are noted, not raised: the list yielded gets the first one's
    number (and stderr a line); a second raises KeyboardInterrupt, and so does the first HOLD_SECONDS after it
    where ray.init has not returned by then. Meanwhile ray.init does not put in its own SIGTERM handler. After,
    the handlers before are back; where SIGTERM had none of Python's, Ray's (sys.exit, so that atexit's
    ray.shutdown runs), as ray.init would have left it. Outside the main thread (no handlers there): nothing."""
    held: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield held
        return
    timer: list[threading.Timer] = []

    def hold(signum, frame):
        if held:
            raise KeyboardInterrupt
        held.append(signum)
        with contextlib.suppress(OSError):  # (not print: the main thread may be inside a write to sys.stderr)
            os.write(2, f"\n[ray_cifar] {signal.Signals(signum).name} while Ray starts: the study stops once Ray "
                        f"is up (seconds); a second one stops it now\n".encode())
        # The second signal, sent by this process, where ray.init takes that long (a cluster that does not answer).
        timer.append(threading.Timer(HOLD_SECONDS, _thread.interrupt_main, (signal.SIGTERM,)))
        timer[0].daemon = True
        timer[0].start()

    import ray._private.utils as ray_utils  # (where ray.init finds the function that installs its handler)

    previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGTERM, signal.SIGINT)
                if sig == signal.SIGTERM or signal.getsignal(sig) is not signal.SIG_IGN}  # (a job that ignores ^C)
    install = ray_utils.set_sigterm_handler
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield held
    finally:
        for t in timer:
            t.cancel()
        ray_utils.set_sigterm_handler = install
        if not callable(previous[signal.SIGTERM]):
            previous[signal.SIGTERM] = lambda signum, frame: sys.exit(signum)
        for sig, handler in previous.items():
            if handler is not None:  # (None: a handler not installed from Python)
                signal.signal(sig, handler)


def end_started(before: set[int], grace: float = 1.0) -> None:
    """SIGTERM every process below this one but those `before`, then SIGKILL what is left after `grace` seconds
    (Linux: read from /proc)."""
    pids = [p for p in _descendants(os.getpid()) if p not in before]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0.0)):
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while (pids := [p for p in pids if _running(p)]) and time.monotonic() < deadline:
            time.sleep(0.05)


def _stat(pid: int | str) -> list[str]:
    """/proc/PID/stat's fields after the command name: [state, ppid, ...]; OSError where PID is gone."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def _descendants(pid: int) -> list[int]:
    parents = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        with contextlib.suppress(OSError, IndexError, ValueError):
            parents[int(entry)] = int(_stat(entry)[1])
    found, frontier = [], {pid}
    while frontier:
        frontier = {c for c, p in parents.items() if p in frontier}
        found += frontier
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie (a reparented child ended but not yet reaped)."""
    try:
        return _stat(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


# How long a study waits for the cluster at its address to take connections before it refuses: a head that is
# starting (a retried job's) takes seconds. ray.init itself waited on, printing a warning every few seconds: it was
# still waiting after 200 s (measured, an address where nothing listened).
CONNECT_WAIT_SECONDS = 30.0
HOST_PORT = re.compile(r"(\[[0-9a-fA-F:.]+\]|[\w.-]+):\d+")


def _wait_for_cluster(address: str, named_by: str) -> None:
    """Wait up to CONNECT_WAIT_SECONDS for a host:port ADDRESS (its GCS) to take connections (one line says so),
    then refuse the study in one line (ConfigError: exit 2, before any work). Other forms ("auto", ray://) are
    left to ray.init, whose ConnectionError for them _start_or_connect turns into the same one-line refusal."""
    if not HOST_PORT.fullmatch(address):
        return
    deadline = time.monotonic() + CONNECT_WAIT_SECONDS
    waiting = False
    while not gcs_reachable(address, timeout=2.0):
        if time.monotonic() >= deadline:
            raise ConfigError(f"{named_by} {address}: no Ray cluster answers there (nothing took a connection in "
                              f"{CONNECT_WAIT_SECONDS:.0f} s); start it (`ray start --head`, `ray up`) or fix the "
                              f"address")
        if not waiting:
            print(f"[ray_cifar] no Ray cluster answers at {address} ({named_by}) yet: waiting up to "
                  f"{CONNECT_WAIT_SECONDS:.0f} s", flush=True)
            waiting = True
        time.sleep(1.0)


def _start_or_connect(cfg: Config) -> str:
    env_vars = job_env_vars()
    address = cfg.tune.cluster_address()
    if address:
        named_by = "tune.address" if cfg.tune.address else "$RAY_ADDRESS"
        _wait_for_cluster(address, named_by)
        if os.environ.get("RAY_API_SERVER_ADDRESS"):
            # The cluster's dashboard, named by the user where several Ray clusters share a machine
            # (see below); Train's controller reads it in its own process.
            env_vars["RAY_API_SERVER_ADDRESS"] = os.environ["RAY_API_SERVER_ADDRESS"]
        try:
            return ray.init(address=address, log_to_driver=True, runtime_env=job_runtime_env(env_vars)).dashboard_url
        except ConnectionError as e:
            # "auto" with no Ray running on this machine (at once), a ray:// server that never answered (after
            # Ray client's 30 s): a traceback before; now one line, exit 2, the new output folder removed.
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if HOST_PORT.fullmatch(address):  # its GCS took a connection (_wait_for_cluster): there, but refused
                # Seen: Ray's C++ client logged "InvalidAuthToken" and this line said the cluster was not there.
                raise ConfigError(f"{named_by} {address}: a Ray cluster answers there but the connection failed "
                                  f"({why}); where it uses token authentication (`ray start` turns it on unless "
                                  f"RAY_AUTH_MODE=disabled), give this process the cluster's token ($RAY_AUTH_TOKEN, "
                                  f"$RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); else check that its Ray is this "
                                  f"one's ({ray.__version__})") from None
            raise ConfigError(f"{named_by} {address}: Ray could not connect ({why}); start the cluster "
                              "(`ray start --head`, `ray up`) or fix the address") from None
    if cfg.tune.dashboard:
        # Ray Train's placement-group cleaner finds the cluster through the state API; with
        # two local Ray instances on one machine its auto-detection fails ("multiple active
        # Ray instances") and a finished trial's resources are never released. Name the
        # dashboard (state API server) explicitly so concurrent local studies keep working.
        dashboard_port = _free_port()
        env_vars["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
        dashboard: dict = {"dashboard_port": dashboard_port}
    else:  # one-rank trials only (validation): nothing of ray_cifar's needs the state API
        dashboard = {"include_dashboard": False}
    return ray.init(**local_sizes(cfg), runtime_env=job_runtime_env(env_vars), **dashboard).dashboard_url


def local_sizes(cfg: Config) -> dict[str, int]:
    """ray.init's num_cpus and num_gpus for a local Ray.

    CPUs: on a small machine enough logical CPUs for one trial's driver plus all its ranks (times
    tune.max_concurrent_trials, when asked for), or trials would wait forever; torch threads are split between
    the ranks of the trials at once (split_cpu_threads). GPUs: the ones torch sees, which the study was checked
    against (cli.check_before_trials). Ray's own count (NVML) finds none in some containers where CUDA works
    (ray-project/ray#53919): trials with use_gpu null would then train on the CPU of a GPU machine."""
    need = math.ceil(trial_cpus(cfg, max_workers(cfg)) * (cfg.tune.max_concurrent_trials or 1))
    return {"num_cpus": cfg.tune.num_cpus or max(os.cpu_count() or 1, need), "num_gpus": int(local_resources()[1])}


def skip_unsent_callback_census() -> None:
    """Tune.run tags the study's callbacks for Ray's usage statistics, and to name them it imports every tracker
    integration Ray has (MLflow, W&B, Comet, Aim): 1.3 CPU-s of every driver's start on this project's 2-core
    machines (measured), also when usage statistics are off and the tag is never sent. Where they are off, the
    census is skipped; where they are on, Ray's own runs."""
    try:
        from ray._common.usage import usage_lib
        from ray.air._internal import usage
    except ImportError:  # another Ray layout: leave Ray as it is
        return
    if not usage_lib.usage_stats_enabled():
        usage.tag_callbacks = lambda callbacks: False


def gcs_address() -> str:
    """host:port of the connected cluster's GCS, Ray's head process (every other Ray process needs it)."""
    return ray.get_runtime_context().gcs_address


def gcs_reachable(address: str, timeout: float = 1.0) -> bool:
    """Whether the GCS at host:port still takes connections. A GCS that is gone cannot be waited for: a local
    Ray's does not come back, and the driver's calls to it would block for Ray's reconnect timeout (60 s)."""
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Where `ray up` puts the cluster's config on its head, which is where `ray submit` runs the study's driver.
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


def capacity() -> dict[str, float]:
    """The cluster's CPUs, GPUs and nodes: those it has now or, where an autoscaler can add nodes, the most it can
    have (the larger of each). Read once, at the study's start. A head of the cluster launcher or KubeRay has no CPU
    or GPU of its own for trials (cluster/*.yaml: CPU 0), and its GPU workers come when trials wait for them:
    checked against what was there at the start, every study of cluster/aws-gpu.yaml was refused ("more than the 0
    there are"), train.use_gpu null became false (trials on the GPU workers' CPUs), and one trial ran at a time."""
    now, most = {**ray.cluster_resources(), "nodes": alive_nodes()}, autoscaling_max() or {}
    return {key: max(float(now.get(key, 0.0)), most.get(key, 0.0)) for key in ("CPU", "GPU", "nodes")}


def autoscaling_max() -> dict[str, float] | None:
    """The most CPUs, GPUs and nodes the cluster's autoscaler can bring up, or None: no autoscaler this driver can
    see. An autoscaler may report its node types to Ray's GCS, where Ray Train reads them too (none of Ray 2.60's
    own do: checked on a `ray start --autoscaling-config` head); the cluster launcher's leaves them on the head as
    BOOTSTRAP_CONFIG. (KubeRay's are seen by neither: cluster/kuberay-rayjob.yaml says what it does instead.)"""
    try:
        from ray._private.state import state  # private (Ray pinned 2.60.*): no public API says this

        most = state.get_max_resources_from_cluster_config()
    except Exception:  # an older GCS, a client connection: as if none
        most = None
    if most:
        # (It gives no node count: more than one, so a local --output is refused.)
        return {"CPU": float(most.get("CPU", 0)), "GPU": float(most.get("GPU", 0)), "nodes": 2.0}
    return bootstrap_max(os.path.expanduser(BOOTSTRAP_CONFIG))


def bootstrap_max(path: str) -> dict[str, float] | None:
    """A cluster-launcher config's most CPUs, GPUs and nodes: the head's, plus each worker type's max_workers
    times its resources (an upper bound: the cluster's own max_workers caps the sum of the types'). Counted as the
    autoscaler counts them: a type without its own max_workers may have the cluster's (Ray's
    fill_node_type_min_max_workers); a config without the cluster's, as `ray up` would fill it, none of them
    (the provider's default is not known here: the workers up now are counted, as without an autoscaler)."""
    import yaml

    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None
    types = config.get("available_node_types") if isinstance(config, dict) else None
    if not isinstance(types, dict):
        return None
    most = {"CPU": 0.0, "GPU": 0.0, "nodes": 0.0}
    cluster_max = int(config.get("max_workers") or 0)
    for name, node_type in types.items():
        if not isinstance(node_type, dict):
            continue
        own_max = node_type.get("max_workers")
        count = 1 if name == config.get("head_node_type") else min(
            cluster_max, cluster_max if own_max is None else int(own_max))
        resources = node_type.get("resources") or {}
        most["nodes"] += count
        for key in ("CPU", "GPU"):
            most[key] += count * float(resources.get(key) or 0)
    return most


def resolve_use_gpu(cfg: Config, gpus: float) -> bool:
    """train.use_gpu, null resolved against the cluster's `gpus` (capacity)."""
    if cfg.train.use_gpu is None:
        return gpus > 0
    if cfg.train.use_gpu and gpus == 0:
        raise RuntimeError("train.use_gpu=true but the Ray cluster has no GPUs")
    return cfg.train.use_gpu


def concurrent_trials(cfg: Config, resources: dict[str, float]) -> int:
    """How many trials the cluster's `resources` (capacity) fit at once (each needs all its ranks at the same
    time)."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    gpus_per_trial = max_trial_gpus(cfg) if cfg.train.use_gpu else 0.0
    return trials_that_fit(resources["CPU"], resources["GPU"], trial_cpus(cfg, max_workers(cfg)), gpus_per_trial)


def trials_that_fit(cpus: float, gpus: float, cpus_per_trial: float, gpus_per_trial: float) -> int:
    """Trials of `cpus_per_trial` CPUs and `gpus_per_trial` GPUs (0: none; 0.25: a quarter of one) that fit
    in `cpus` and `gpus` at once; at least 1 (on an autoscaling cluster a waiting trial brings its nodes)."""
    fits = [cpus / cpus_per_trial] + ([gpus / gpus_per_trial] if gpus_per_trial > 0 else [])
    return max(1, math.floor(min(fits) + 1e-9))


def alive_nodes() -> int:
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def check_fits(cfg: Config, resources: dict[str, float]) -> None:
    """On a running cluster, refuse (ConfigError, one line) a trial larger than its `resources` (the most its
    autoscaler can bring: capacity), its driver included, before any trial starts. A local Ray was checked
    against this machine's real cores before it started (cli.check_before_trials)."""
    if cfg.tune.cluster_address():
        check_resources(cfg, resources["CPU"], resources["GPU"], count_driver=True)


def split_cpu_threads(cfg: Config, max_concurrent: int) -> None:
    """On a local CPU-only Ray, give each rank its share of the machine's cores across the trials
    that run at once (train.torch_threads), instead of every trial's ranks taking all of them.

    Left alone when set by the user, on GPUs (a rank's threads only feed its GPU), and on a
    cluster (this process cannot see the workers' cores)."""
    if cfg.train.torch_threads is not None or cfg.train.use_gpu or cfg.tune.cluster_address():
        return
    cfg.train.torch_threads = max(1, (os.cpu_count() or 1) // (max_workers(cfg) * max_concurrent))
