"""A study: Ray Tune over trials (.trial), a scheduler (.scheduler, .pbt), a searcher (.searchers), rows (.recorder).

    rc = run_study(cfg, output)                 # a new study; OUTPUT must be empty
    rc = run_study(cfg, output, resume=True)    # continue one whose driver died (Tuner.restore)

OUTPUT holds config.yaml, results.parquet (+ results.parts/ while running), trials.json
(the recorder's live state), trials.parquet and the report at the end, tensorboard/, and
Ray's own files under ray/ (Tune's experiment in ray/tune, each trial's TorchTrainer run
and checkpoints in ray/trial-<id>). The test split is evaluated once, for the best trial
by tune.metric/tune.mode, at the end (tune.test all: every finished trial, each at its best
validation epoch, to stand beside published test figures; never used to choose).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
import warnings
from typing import Any, Callable

from .. import cli, storage
from ..config import Config, ConfigError, flatten, grid_size, search_keys
from ..results import (FINISHED, TRIALS_STATE, DamagedFile, ResultsLog, format_table, is_train_output, provenance,
                       rank_trials, read_rows, read_trials_state, write_rows)
from ..validation import trial_config
from .recorder import (FAILED, FULL_DISK, JUDGED, NoTunerRestoreHint, QuietFullDiskFailures,
                       StudyRecorder, quiet_trial_boxes)
from .tune_state import TuneStateBackup

EXPERIMENT = "tune"
SEED = "train.seed"
# The end's table of trials prints the best this many: a study of hundreds printed a screenful a hundred times over
# (trials.parquet and the report list every trial).
CONSOLE_TRIALS = 30


def storage_path(output: str, remote: str | None = None) -> str:
    """Where Ray keeps the experiment and every trial's checkpoints: OUTPUT/ray, or REMOTE/ray."""
    return storage.join(remote, "ray") if remote else os.path.join(output, "ray")


def experiment_dir(output: str, remote: str | None = None) -> str:
    return storage.join(storage_path(output, remote), EXPERIMENT)


def is_finished(output: str) -> bool:
    return os.path.exists(os.path.join(output, FINISHED))


def can_resume(output: str, remote: str | None = None) -> bool:
    from ray import tune

    return (os.path.exists(os.path.join(output, "config.yaml"))
            and tune.Tuner.can_restore(experiment_dir(output, remote)))


def never_started(output: str) -> bool:
    """A study whose driver was stopped in its first seconds, after its config.yaml and before Tune saved its
    experiment: no trial has reported (no results, no trials.json). `--resume` starts it from its config.yaml.
    A train run's output (results.is_train_output) is not."""
    parts = os.path.join(output, ResultsLog.PARTS)
    return (os.path.exists(os.path.join(output, "config.yaml"))
            and not is_train_output(output)
            and not any(os.path.exists(os.path.join(output, name)) for name in ("results.parquet", TRIALS_STATE))
            and not (os.path.isdir(parts) and os.listdir(parts)))


def replicate_seeds(cfg: Config) -> tuple[dict[str, Any], int]:
    """(extra search-space entries, Tune's num_samples) that give every sample of a point its own seed.

    A pure grid with num_samples n becomes the grid x train.seed in [seed, seed + n): replicates
    are reproducible and named by their seed. With random dimensions each sample draws its seed.
    A study that searches train.seed itself keeps it."""
    n = cfg.tune.num_samples
    if n == 1 or SEED in search_keys(cfg.tune.search_space) or cfg.tune.search in ("optuna", "hyperopt", "bohb"):
        return {}, n  # a model-based searcher's num_samples is its trial budget; each trial uses train.seed
    if cfg.tune.search == "grid" and all(kind == "grid" for spec in cfg.tune.search_space.values() for kind in spec):
        return {SEED: {"grid": [cfg.train.seed + i for i in range(n)]}}, 1
    return {SEED: {"randint": [0, 2**31 - 2]}}, n


def to_param_space(search_space: dict[str, Any]) -> dict[str, Any]:
    """Tune's param_space of a grid study (tune.search grid)."""
    from .searchers import param_space

    return param_space(search_space)


def total_trials(cfg: Config) -> int:
    """Trials the study runs: grid points x num_samples, or num_samples where the grid is drawn from (tune.search)."""
    return (grid_size(cfg) if cfg.tune.search == "grid" else 1) * cfg.tune.num_samples


def searched_params(base: dict[str, Any], keys: list[str], sampled: dict[str, Any]) -> dict[str, Any]:
    """The effective values of the searched fields of one trial (and its seed), as flat 'section.field' columns."""
    flat = flatten(trial_config(base, sampled).to_dict())
    return {k: flat[k] for k in keys}


def _build_tuner(cfg: Config, output: str, resume: bool, max_concurrent: int, remote: str | None):
    from ray import tune

    from . import cluster, searchers, trial
    from .pbt import create_pbt
    from .scheduler import create_scheduler

    base = cfg.to_dict()
    base["tune"]["search_space"] = {}
    seeds, num_samples = replicate_seeds(cfg)
    space = {**cfg.tune.search_space, **seeds}
    keys = search_keys(space) + ([SEED] if SEED not in search_keys(space) else [])
    ray_storage = storage_path(output, remote)
    # Every trial keeps a CheckpointStore (one rank), in one run folder (not PBT: a member's generations are
    # runs of their own, and its rows carry the lineage of its reports).
    one_run_each = cluster.runs_in_trial_process(cluster.max_workers(cfg)) and cfg.tune.scheduler not in ("pbt", "pb2")
    recorder = StudyRecorder(output, functools.partial(searched_params, base, keys), cfg.tune.metric, cfg.tune.mode,
                             provenance(), mirror_to=remote, total_trials=total_trials(cfg),
                             tracking=tracking_settings(cfg, output, remote),
                             storage_path=ray_storage if one_run_each else None)
    trainable = tune.with_parameters(trial.tune_trial, base_config=base, storage_path=ray_storage)
    # Per trial: a one-rank trial's process is its rank; a DDP trial's only drives its TorchTrainer.
    trainable = tune.with_resources(trainable, lambda sampled: cluster.trial_resources(trial_config(base, sampled)))
    if resume:
        # tuner.pkl brings back the scheduler and the recorder (copies that re-read their state from disk).
        _state_backup(output, remote).restore()
        return tune.Tuner.restore(experiment_dir(output, remote), trainable=trainable, resume_unfinished=True,
                                  resume_errored=True), keys
    # With train.max_steps the epochs per trial follow from the data and the batch size; without
    # tune.max_epochs ASHA then has no top rung and survivors run to their own end.
    if cfg.tune.time_attr == "steps":  # the top rung is the step budget (none without one)
        max_t = cfg.train.max_steps or 10**12
    else:
        max_t = cfg.tune.max_epochs or (cluster.max_trial_epochs(cfg) if cfg.train.max_steps is None else 10**6)
    if cfg.tune.scheduler in ("pbt", "pb2"):
        scheduler = create_pbt(cfg, output, ray_storage, all_at_once=max_concurrent >= total_trials(cfg),
                               record=recorder.record_now)
    else:
        scheduler = create_scheduler(cfg.tune.scheduler, output, recorder.note_stopped, max_t=max_t,
                                     grace_period=cfg.tune.grace_period, reduction_factor=cfg.tune.reduction_factor,
                                     brackets=cfg.tune.brackets, time_attr=cfg.tune.time_attr, search=cfg.tune.search)
    at_once = _trials_at_once(cfg, max_concurrent)
    return tune.Tuner(
        trainable,
        param_space=searchers.param_space(space, cfg.tune.search),
        tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode=cfg.tune.mode, scheduler=scheduler,
                                    search_alg=searchers.create_search_alg(cfg, at_once), num_samples=num_samples,
                                    max_concurrent_trials=searchers.model_based_limit(cfg, at_once),
                                    reuse_actors=cluster.reuse_trial_processes(cfg)),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=ray_storage,
                                  callbacks=[recorder, _state_backup(output, remote)],
                                  failure_config=tune.FailureConfig(max_failures=cluster.max_failures(cfg))),
    ), keys


def _trials_at_once(cfg: Config, max_concurrent: int) -> int | None:
    """Tune's max_concurrent_trials. Not for a population larger than that: Tune would create a member only when
    one before it ended, so the first would train alone to its end, nothing to exploit; every member is created,
    the cluster runs what fits and PBT takes turns (it pauses a member at its decision epoch while others wait)."""
    if cfg.tune.scheduler in ("pbt", "pb2") and max_concurrent < total_trials(cfg):
        return None
    return max_concurrent


def tracking_settings(cfg: Config, output: str, remote: str | None) -> dict[str, Any] | None:
    """create_tracker's arguments for this study (None without a tracker); the study is named after --output."""
    from .tracking import study_name

    if cfg.tune.tracking == "none":
        return None
    return {"tracking": cfg.tune.tracking, "study": study_name(output, remote), "uri": cfg.tune.tracking_uri,
            "project": cfg.tune.tracking_project}


def attach_to_tracker(cfg: Config, output: str, remote: str | None) -> None:
    """trials.parquet, results.parquet and the report, attached to the study in the tracker (never fails the study)."""
    settings = tracking_settings(cfg, output, remote)
    if settings is None:
        return
    from .tracking import create_tracker

    files = ["trials.parquet", "results.parquet", "report.html", "report.md", "figures"]  # figures/: the report's
    try:
        tracker = create_tracker(output=output, **settings)
        tracker.attach_study([os.path.join(output, f) for f in files])
        tracker.close()
        print(f"[ray_cifar] tracking ({cfg.tune.tracking}): trials.parquet and the report attached to study "
              f"{settings['study']}", flush=True)
    except Exception as e:  # noqa: BLE001 - the study's own files are written; a tracker is a copy
        print(f"[ray_cifar] tracking ({cfg.tune.tracking}): attaching the study's files failed: "
              f"{type(e).__name__}: {e}", flush=True)


def _banner(cfg: Config, output: str, max_concurrent: int, resume: bool) -> str:
    from . import cluster

    max_t = cfg.tune.max_epochs or cluster.max_trial_epochs(cfg)
    length = f"max {max_t} epochs" if cfg.train.max_steps is None else f"{cfg.train.max_steps} steps per trial"
    trials = (f"{grid_size(cfg)} grid point(s) x {cfg.tune.num_samples} sample(s)" if cfg.tune.search == "grid"
              else f"{cfg.tune.num_samples} trial(s) by {cfg.tune.search} search")
    scheduler = "hyperband (BOHB)" if cfg.tune.search == "bohb" else cfg.tune.scheduler
    return (f"[ray_cifar] {'resuming ' if resume else ''}study: {trials}, {cfg.train.num_workers} DDP rank(s) per trial "
            f"({_devices(cfg)}), {max_concurrent} trial(s) at once, scheduler "
            f"{scheduler} on {cfg.tune.metric} ({cfg.tune.mode}), {length}; results in {output}")


def _dashboard_sign_in() -> str:
    # Ray 2.60 turns token authentication on unless RAY_AUTH_MODE=disabled: the dashboard's page then asks for the
    # token that ray.init wrote to ~/.ray/auth_token.
    return "" if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled" else " (its token: ray get-auth-token)"


def _devices(cfg: Config) -> str:
    if not cfg.train.use_gpu:
        return "CPU"
    return "GPU" if cfg.train.gpus_per_worker == 1 else f"{cfg.train.gpus_per_worker:g} of a GPU each"


def _state_backup(output: str, remote: str | None) -> TuneStateBackup:
    return TuneStateBackup(output, None if remote else experiment_dir(output))


def unfinished_trials(output: str, remote: str | None = None) -> int:
    """Trials Tune has not ended (TERMINATED or ERROR), read from the experiment on disk."""
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(experiment_dir(output, remote)).trials
    return sum(str(t.status) not in ("TERMINATED", "ERROR") for t in trials)


DRIVER_LOCK = "driver.json"
STUDY_START = "study-start.json"  # where the study was started, and the config it was started with
MOVABLE_KEYS = ("data.path", "data.cache_dir")  # where the data is read from: a resumed study may find it elsewhere


def check_start(cfg: Config, output: str, remote: str | None) -> None:
    """A study resumes where it started, with the config it started with: ConfigError (one line) otherwise. The
    first driver writes OUTPUT/study-start.json (a study from before it: the driver that resumes it).

    Tune's saved state, the recorder and schedulers it unpickles, and the trials' checkpoint paths name the
    folder the study was started in: a copied or moved folder, resumed, trained on into the old path (or its
    re-made ghost) and then marked the new folder finished with its trials unfinished. An edited config.yaml was
    taken for the study's own, while its trials, rungs and recorder followed the first one: a tune.metric edited
    to val_loss ranked trials by their val_acc, lowest first."""
    path = os.path.join(output, STUDY_START)
    here = remote or os.path.realpath(output)
    now = flatten(cfg.to_dict())
    try:
        with open(path, "rb") as f:
            start = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        start = None
    except (OSError, ValueError):
        print(f"[ray_cifar] warning: {path} is damaged; written again from this config.yaml", flush=True)
        start = None
    if not (isinstance(start, dict) and isinstance(start.get("config"), dict) and start.get("location")):
        # Written again, unless the trials' recorded checkpoints name another folder: a copy whose record was lost
        # (or never copied) resumed into the first folder's trials.json and Tune state, then failed in Ray.
        where = None if remote else _checkpoints_folder(output)
        if where is None:
            with open(path, "w") as f:
                json.dump({"location": here, "config": now}, f)
            return
        start = {"location": where, "config": now}
    where = start["location"]
    moved = where != here and not (remote is None and os.path.isdir(where) and os.path.samefile(where, output))
    if moved:
        # A link at the first place to the folder as it is now resumes it (the same folder by either name): checked
        # end to end with a killed study of one-rank trials, moved and linked. Only where the first place is free
        # (moved, not copied), and not for a bucket: a URI is no link.
        link = ""
        if not remote and not os.path.lexists(where):
            parent = os.path.dirname(where)
            make_parent = "" if os.path.isdir(parent) else f"mkdir -p {parent} && "  # another machine: no such folder
            link = f", or leave a link there to where it is now: {make_parent}ln -s {here} {where}"
        raise ConfigError(f"--resume {remote or output}: this study was started in {where}, and Ray Tune's state and "
                          f"its trials' checkpoints name that place: it resumes only there (move or copy it back, "
                          f"then --resume {where}{link}). Its report reads it anywhere: python -m ray_cifar.report "
                          f"{remote or output}")
    differs = [k for k in sorted(set(now) | set(start["config"]))
               if json.dumps(now.get(k)) != json.dumps(start["config"].get(k))]
    changed = [k for k in differs if k not in MOVABLE_KEYS]
    if changed:
        edits = ", ".join(f"{k} {start['config'].get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise ConfigError(f"--resume: {output}/config.yaml was changed since the study started ({edits}{more}); a "
                          f"study resumes with the config its trials, rungs and ranking began with: undo the edit, or "
                          f"start a new study from it (--config {output}/config.yaml --output NEW)")
    if differs:  # where the data is read from, alone
        print(f"[ray_cifar] the data is read from {cfg.data.path} now (config.yaml's data.path was changed since the "
              f"study started)", flush=True)


def _checkpoints_folder(output: str) -> str | None:
    """The study folder trials.json's checkpoints are in (OUTPUT/ray/trial-<id>/...), where it is not OUTPUT."""
    for summary in (read_trials_state(output) or {}).values():
        for where in (summary.get("latest_checkpoint"), summary.get("best_checkpoint")):
            if isinstance(where, str) and os.path.isabs(where) and f"{os.sep}ray{os.sep}" in where:
                folder = where.rsplit(f"{os.sep}ray{os.sep}", 1)[0]
                if not (os.path.isdir(folder) and os.path.samefile(folder, output)) and \
                        os.path.realpath(folder) != os.path.realpath(output):
                    return folder
    return None


def hold_driver_lock(output: str) -> None:
    """One driver per study: refuse (one line) when another live process on this machine drives it.

    Two drivers on one output would run the same trials twice over the same checkpoints."""
    import socket

    path, me = os.path.join(output, DRIVER_LOCK), {"pid": os.getpid(), "host": socket.gethostname()}
    try:
        with open(path, "rb") as f:
            other = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):  # none yet, or damaged: a damaged lock names no live driver
        other = None
    if not isinstance(other, dict):
        other = None
    if other and other.get("host") == me["host"] and other.get("pid") != me["pid"] and _alive(other.get("pid")):
        raise ConfigError(f"--resume: another driver (pid {other['pid']}) is running the study in {output}; "
                          f"stop it first (Ctrl-C) or wait for it")
    with open(path, "w") as f:
        json.dump(me, f)


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


def run_study(cfg: Config, output: str, resume: bool = False, remote: str | None = None, shared: bool = False) -> int:
    """Run (or resume) the study; returns the exit status: 0, 1 if a trial failed, 130 if interrupted.

    `output` is the local folder of the study's files; `remote` the s3:// or gs:// URI they are copied
    up to (and Ray's checkpoints written to) when --output was one; `shared` says --output was a URI
    (storage every node shares), without which a multi-node cluster is refused."""
    from . import cluster

    # Tune's default loggers write TensorBoard/CSV/JSON files keyed by training_iteration, which
    # restarts at 1 on restore; the recorder writes per-epoch TensorBoard files under OUTPUT instead.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # ... so the result.json / progress.csv that Tune's restore and status reads also look for are never
    # there: their warnings about it are noise.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    from .tracking import check_installed

    check_installed(cfg.tune.tracking)  # one line naming the extra, before Ray starts
    QuietFullDiskFailures.install()
    NoTunerRestoreHint.install()
    quiet_trial_boxes()
    # Ray's advice to every PBT study: ray_cifar's members restart on purpose (a new generation is a new run of
    # the trial, from the donor's copied state), so there is nothing the user could act on.
    warnings.filterwarnings("ignore", message="Consider boosting PBT performance by enabling `reuse_actors`")
    check_start(cfg, output, remote)
    hold_driver_lock(output)
    dashboard = cluster.init_ray(cfg)
    limits = cluster.capacity()  # what an autoscaler can add too
    cluster.check_fits(cfg, limits)  # before use_gpu is resolved: it refuses a GPU share only where use_gpu was false
    cfg.train.use_gpu = cluster.resolve_use_gpu(cfg, limits["GPU"])
    if not shared:
        storage.check_output_shared(output, int(limits["nodes"]))
    max_concurrent = cluster.concurrent_trials(cfg, limits)
    cluster.split_cpu_threads(cfg, max_concurrent)
    cluster.skip_unsent_callback_census()
    if remote and not resume:
        # config.yaml in the bucket now (past the up-front refusals), not a minute later: a head lost in the
        # first minute leaves a study that a retried job (--resume-if-exists) can continue.
        storage.sync_up(output, remote)
    print(_banner(cfg, output, max_concurrent, resume), flush=True)
    print(f"[ray_cifar] TensorBoard: tensorboard --logdir {os.path.join(output, 'tensorboard')}"
          + (f"; Ray dashboard: http://{dashboard}{_dashboard_sign_in()}" if dashboard else ""), flush=True)
    resume_command = f"python -m ray_cifar.tune --resume {remote or output}"
    # Here, not only at a stop: a driver can end without a word (SIGKILL, a lost machine, or Ray's core worker
    # exiting the process as its raylet goes in a group SIGTERM), and this line is then in the job's log.
    print(f"[ray_cifar] if this driver stops or dies, the study continues with: {resume_command}", flush=True)

    def stop_now() -> None:
        print(f"\n[ray_cifar] SIGTERM reached Ray too (every process of a machine or job that is shutting down: a "
              f"spot instance, scancel, a group kill): Ray is gone, so the study stops now instead of waiting on it; "
              f"nothing reported is lost. Continue it with:\n  {resume_command}", flush=True)
        if remote:
            with contextlib.suppress(Exception):  # the rows and trials.json are there already; this is the rest
                storage.sync_up(output, remote)

    gcs = cluster.gcs_address()
    with polite_sigterm(resume_command, lambda: cluster.gcs_reachable(gcs), stop_now):
        try:
            tuner, keys = _build_tuner(cfg, output, resume, max_concurrent, remote)
            tuner.fit()
        except Exception as e:
            # Tune reading back its own files from a full disk fails in many ways (an empty error.pkl, ...).
            if isinstance(e, OSError) and e.errno in storage.DISK_FULL and not FULL_DISK:
                FULL_DISK.append(storage.disk_full_message(e, output))
            if not FULL_DISK:
                raise
    if remote:
        storage.sync_up(output, remote)
    if FULL_DISK:
        raise storage.DiskFull(f"{FULL_DISK[0]}; everything written before is intact; free space, then: "
                               f"{resume_command}")
    if unfinished_trials(output, remote):
        print(f"\n[ray_cifar] study interrupted; nothing reported is lost. Continue it with:\n"
              f"  {resume_command}", flush=True)
        return 130
    return finish_politely(lambda: finish_and_sync(cfg, output, keys, remote), resume_command,
                           lambda: cluster.gcs_reachable(gcs), stop_now)


def finish_politely(finish: Callable[[], int], resume_command: str, ray_alive: Callable[[], bool] | None = None,
                    stop_now: Callable[[], None] | None = None) -> int:
    """The study's last phase (test evaluation, trials.parquet, report) after every trial is done: Tune's handler
    is gone, so SIGTERM or Ctrl-C here end it at once, with the --resume command that runs this phase again
    (exit 130), not a bare signal death.

    Where the SIGTERM went to every process (see polite_sigterm), the local Ray ends with it, and the driver's exit
    (ray.shutdown) waited a minute on Ray's gone GCS, then ended with exit 1 (seen in a kill test). So after the
    line the driver looks at Ray (RAY_ALIVE) for up to RAY_GONE_WITHIN_S: gone (RayGone), stop_now() says so and
    the driver exits 130 at once; there, it goes on to a normal exit.

    Tune's SIGINT handler stays after Tune.fit returns (Ray 2.60 never puts the one before back): the first Ctrl-C
    here only printed Tune's "Stop signal received", and the study finished, exit 0. Python's own is put in for
    the phase, and the one before back after it."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler) if main_thread else None
    try:
        with cli.sigterm_as_ctrl_c():
            return finish()
    except KeyboardInterrupt:
        print(f"\n[ray_cifar] stopped while finishing the study: every trial is done and recorded; the test "
              f"evaluation and the report run again with:\n  {resume_command}", flush=True)
        if ray_alive is not None and _ray_goes(ray_alive):
            _exit_now(stop_now)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)


RAY_GONE_WITHIN_S = 3.0  # room for GONE_AFTER_S after Ray's processes take a moment to end


def _ray_goes(ray_alive: Callable[[], bool]) -> bool:
    """Whether Ray is found gone (RayGone) within RAY_GONE_WITHIN_S."""
    deadline, gone = time.monotonic() + RAY_GONE_WITHIN_S, RayGone()
    while time.monotonic() < deadline:
        if gone.seen(ray_alive()):
            return True
        time.sleep(WATCH_EVERY_S)
    return False


def _exit_now(stop_now: Callable[[], None] | None) -> None:
    """Say so (stop_now), flush, and end the process with 130 without Python's exit: Ray's exit hooks would wait on
    its gone GCS."""
    with contextlib.suppress(Exception):  # a console that is gone must not keep the driver waiting
        if stop_now is not None:
            stop_now()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(130)


# After a SIGTERM, how often the driver checks that Ray is still there, and how long gone means gone.
WATCH_EVERY_S = 0.25
GONE_AFTER_S = 1.0


class RayGone:
    """One rule for "Ray is gone", in the trials and in the finish phase: every look for GONE_AFTER_S found it
    missing (one missed look is not enough: a GCS busy for a moment)."""

    def __init__(self):
        self.since: float | None = None

    def seen(self, alive: bool) -> bool:
        """Take one look's answer; whether Ray has been gone for GONE_AFTER_S now."""
        self.since = None if alive else self.since or time.monotonic()
        return self.since is not None and time.monotonic() - self.since >= GONE_AFTER_S


@contextlib.contextmanager
def polite_sigterm(resume_command: str, ray_alive: Callable[[], bool], stop_now: Callable[[], None]):
    """SIGTERM (what spot instances, Kubernetes, Slurm and `kill` send first) stops the study as the first
    Ctrl-C does: Tune's SIGINT handler, in place while the study runs, ends it gracefully (trials saved, the
    experiment resumable) and the --resume command is printed. A second SIGTERM ends the driver at once.

    Where the SIGTERM went to every process (a machine shutting down, Slurm's scancel, `kill -TERM -PGID`), a local
    Ray's processes end with it. Then either Ray's own core worker ends the driver at once (exit 1) as its raylet
    goes, or Tune's graceful stop waits on the gone GCS until Ray's reconnect timeout (60 s, then exit 1): past most
    grace periods before the SIGKILL. So the --resume command is printed at the study's start and again in the
    first SIGTERM's line (where Python runs its handler before Ray's core worker ends the process), and a thread
    watches Ray (ray_alive: its GCS takes connections); once Ray is gone (RayGone), stop_now() says so
    and the driver exits 130 (Tune has saved the experiment by then: its save follows the signal within a second,
    and what a kill at any moment leaves is resumable)."""
    received = []
    finished = threading.Event()

    def watch_ray() -> None:
        gone = RayGone()
        while not finished.wait(WATCH_EVERY_S):
            if gone.seen(ray_alive()) and not finished.is_set():
                _exit_now(stop_now)

    def on_sigterm(signum, frame):
        received.append(signum)
        if len(received) > 1:
            print("[ray_cifar] second SIGTERM: stopping now", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        print(f"\n[ray_cifar] SIGTERM: stopping the study gracefully (send it again to stop at once); it continues "
              f"with: {resume_command}", flush=True)
        threading.Thread(target=watch_ray, name="ray_cifar-watch-ray", daemon=True).start()
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(signal.SIGINT, frame)  # Tune's: stop after the current step, save the experiment
        else:
            raise KeyboardInterrupt  # before Tune runs: nothing started yet to stop gracefully

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        finished.set()
        signal.signal(signal.SIGTERM, previous)


def finish_study(cfg: Config, output: str, keys: list[str]) -> int:
    """Rank trials by tune.metric/mode, evaluate the best (tune.test all: every finished trial) on test
    once, write trials.parquet, the table."""
    from . import trial

    with open(os.path.join(output, TRIALS_STATE)) as f:
        trials = _table_rows(cfg, json.load(f))
    best = trials[0] if trials and trials[0].get("best_metric") is not None else None
    if best is not None and not best.get("best_checkpoint"):
        # Never another trial's test figure in its place: the best is the best by validation alone.
        print(f"[ray_cifar] best trial {best['trial_id']}: the checkpoint of its best epoch ({best['best_epoch']}) "
              f"is not known (its report died with a driver): not evaluated on test", flush=True)
        best = None
    try:
        # The test split, once per trial, for the trial chosen by validation alone (tune.test best), or
        # for every finished trial at its best validation epoch (all): chosen before any test figure exists.
        todo = test_evaluated(cfg, trials, best)
        found = trial.evaluate_checkpoints([t["best_checkpoint"] for t in todo], "test", cfg.train.use_gpu)
        for t, test in zip(todo, found):
            t.update(_test_figures(t, test))
    finally:
        _write_table(trials, os.path.join(output, "trials.parquet"))
        ResultsLog(output).compact()
    best_column = f"best_{cfg.tune.metric}"  # best_metric under its own name; val_acc beside another metric
    extra = ["best_val_acc"] if cfg.tune.metric != "val_acc" else []
    exploits = ["exploits"] if cfg.tune.scheduler in ("pbt", "pb2") else []  # as trials.parquet and the report
    columns = ["trial_id", *keys, "status", "epochs", *exploits, best_column, "best_epoch", *extra, "test_acc"]
    print("\n" + format_table([{**t, best_column: t["best_metric"]} for t in trials[:CONSOLE_TRIALS]], columns))
    if len(trials) > CONSOLE_TRIALS:
        print(f"... and {len(trials) - CONSOLE_TRIALS} trial(s) ranked below these: every trial is in "
              f"{output}/trials.parquet and the report")
    if best is not None and best["test_acc"] is not None:
        print(f"\n[ray_cifar] best trial {best['trial_id']} by {cfg.tune.metric} ({cfg.tune.mode}): "
              f"{best['best_metric']:.4f} at epoch {best['best_epoch']}; test_acc {best['test_acc']:.4f} "
              f"(evaluated once)")
    failed = [t for t in trials if t["status"] == FAILED]
    for t in failed:
        print(f"[ray_cifar] trial {t['trial_id']} FAILED: {t['error']}")
    print(f"[ray_cifar] results: {output}/results.parquet, {output}/trials.parquet; "
          f"TensorBoard: tensorboard --logdir {output}/tensorboard", flush=True)
    with open(os.path.join(output, FINISHED), "w") as f:
        # The test figures too: a damaged trials.parquet is rebuilt from trials.json and these, not evaluated again.
        # Before the report, which reads it: without it, a study's trials.parquet is one stopped in its test phase.
        json.dump({"finished": time.time(), "failed": [t["trial_id"] for t in failed],
                   "test": {t["trial_id"]: {"test_acc": t["test_acc"], "test_loss": t["test_loss"]}
                            for t in trials if t["test_acc"] is not None}}, f)
    write_study_report(output)
    return 1 if failed else 0


def _table_rows(cfg: Config, recorded: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """trials.parquet's rows from trials.json's summaries, best first, without test figures yet (JUDGED is the
    scheduler's own)."""
    summaries = [{"trial_id": tid, **{k: v for k, v in t.items() if k != JUDGED}} for tid, t in recorded.items()]
    trials = rank_trials(summaries, cfg.tune.metric, cfg.tune.mode)
    for t in trials:
        t.update(test_acc=None, test_loss=None)
    return trials


def _write_table(trials: list[dict[str, Any]], path: str) -> None:
    run_provenance = provenance()  # a git subprocess: once, not once per trial
    write_rows([{**t, **run_provenance} for t in trials], path)


def _test_figures(t: dict[str, Any], test: dict[str, float] | Exception) -> dict[str, Any]:
    if isinstance(test, Exception):  # the trials' results matter more than one test figure
        print(f"[ray_cifar] test evaluation of {t['trial_id']} failed: {test}", flush=True)
        return {}
    return {"test_acc": test["test_acc"], "test_loss": test["test_loss"]}


def test_evaluated(cfg: Config, trials: list[dict[str, Any]], best: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The trials whose best checkpoint the test split evaluates: the best one (tune.test best), or every
    finished trial with a checkpoint (all: completed, stopped and diverged; not failed), best first."""
    if cfg.tune.test == "all":
        todo = [t for t in trials if t.get("best_checkpoint") and t.get("status") != FAILED]
        print(f"[ray_cifar] tune.test=all: evaluating {len(todo)} trial(s) on the test split, each once at its "
              f"best {cfg.tune.metric} epoch (reported, never used to choose)", flush=True)
        return todo
    return [best] if best is not None else []


def finish_and_sync(cfg: Config, output: str, keys: list[str], remote: str | None) -> int:
    rc = finish_study(cfg, output, keys)
    attach_to_tracker(cfg, output, remote)
    if remote:
        storage.sync_up(output, remote)
        storage.prune(output, remote, ResultsLog.PARTS)  # the parts compaction merged into results.parquet
        print(f"[ray_cifar] the study's files are copied to {remote}", flush=True)
    return rc


def repair_finished(cfg: Config, output: str) -> bool:
    """A finished study's damaged or missing files, rebuilt from what holds them too, and the report drawn again;
    whether anything was. --resume of a finished study said "already finished" and left them so, and the report
    sent the user back to --resume (or, of a study with no results.parquet, drew an empty report over a good one):
    - trials.json that will not read: set aside, and written again from trials.parquet (from the rows, where that
      will not read either: their statuses are then the rows' own, diverged or running);
    - results.parquet (or a part) that will not read, or none where trials.json counts epochs: the rows, from each
      trial's newest checkpoint that loads (the history of epoch metrics it carries);
    - trials.parquet that will not read, or none: from trials.json, ranked, with the test figures FINISHED keeps
      (a study finished by an older ray_cifar has none there: its trials.parquet comes back without them)."""
    repaired = []
    if read_trials_state(output) is None and _trials_json_from_table(output):
        repaired.append(TRIALS_STATE)
    recorded = read_trials_state(output)
    log = ResultsLog(output)
    try:
        lost_rows = not log.read() and any((t.get("epochs") or 0) > 0 for t in (recorded or {}).values())
        damaged = False
    except DamagedFile:
        lost_rows, damaged = False, True
    trials_json_damaged = recorded is None
    if damaged or lost_rows or trials_json_damaged:
        # Sets the damaged parts and trials.json aside, recovers the parts' rows, rebuilds trials.json from the rows.
        recorder = StudyRecorder(output, lambda config: {}, cfg.tune.metric, cfg.tune.mode, provenance(),
                                 tensorboard=False)
        if lost_rows:
            print(f"[ray_cifar] {output}/results.parquet is missing", flush=True)
            recorder.recover_rows()
        recorder.log.compact()
        repaired += (["results.parquet"] if damaged or lost_rows else []) + [TRIALS_STATE] * trials_json_damaged
    if _rebuild_trials_table(cfg, output):
        repaired.append("trials.parquet")
    if repaired:
        print(f"[ray_cifar] {output}: {', '.join(repaired)} rebuilt", flush=True)
        write_study_report(output)
    return bool(repaired)


def _trials_json_from_table(output: str) -> bool:
    """trials.json, damaged, set aside and written again from trials.parquet; whether that one reads."""
    path = os.path.join(output, TRIALS_STATE)
    try:
        table = read_rows(os.path.join(output, "trials.parquet"))
    except (FileNotFoundError, DamagedFile):
        return False
    own = ("test_acc", "test_loss", *provenance())  # what finish_study adds to trials.json's summaries
    os.replace(path, path + ".damaged")
    with open(path, "w") as f:
        json.dump({t["trial_id"]: {k: v for k, v in t.items() if k not in own} for t in table}, f)
    print(f"[ray_cifar] {path} is damaged; set aside as {TRIALS_STATE}.damaged and written again from "
          f"trials.parquet", flush=True)
    return True


def _rebuild_trials_table(cfg: Config, output: str) -> bool:
    """trials.parquet again where it will not read or is gone (see repair_finished); whether it was."""
    path = os.path.join(output, "trials.parquet")
    try:
        read_rows(path)
        return False
    except FileNotFoundError:
        print(f"[ray_cifar] {path} is missing", flush=True)
    except DamagedFile as e:
        os.replace(path, path + ".damaged")
        print(f"[ray_cifar] {e}; set aside as trials.parquet.damaged", flush=True)
    trials = _table_rows(cfg, read_trials_state(output) or {})
    try:
        with open(os.path.join(output, FINISHED)) as f:
            test = json.load(f).get("test")
    except (OSError, ValueError, AttributeError):
        test = None
    for t in trials:
        t.update((test or {}).get(t["trial_id"]) or {})
    if test is None:
        print(f"[ray_cifar] its test figures are not kept elsewhere (a study finished by an older ray_cifar): "
              f"trials.parquet comes back without them", flush=True)
    _write_table(trials, path)
    return True


def write_study_report(output: str) -> None:
    """OUTPUT/report.html and report.md; a report that cannot be drawn never fails the study."""
    try:
        from ..report import write_report  # here too: a report module that fails to import is a report not drawn

        print(f"[ray_cifar] report: {write_report([output])}", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"[ray_cifar] report not written ({type(e).__name__}: {e}); "
              f"run python -m ray_cifar.report {output} to retry", flush=True)
