"""One trial: `train.num_workers` ranks, checkpointed every epoch, resumed from the latest checkpoint.

Ray 2.60 runs Train V2, where `Tuner(TorchTrainer(...))` is gone: a study is a Tune
*function* trainable (`tune_trial`). A DDP trial (several ranks) builds a TorchTrainer and
calls fit(); TuneReportCallback forwards rank 0's per-epoch metrics (and the checkpoint's
location, as a URI on a bucket) to Tune. A one-rank trial trains in the Tune trial process itself
(`train_in_trial_process`): starting a Train controller and a worker process was most of a
short trial's start-up. Both paths run the same `run_rank`.

Fault tolerance, from the inside out:
- every epoch rank 0 reports a full training state (ray_cifar.checkpoint); Ray keeps the
  latest and the best by tune.metric (CheckpointConfig with a score attribute), and
  CheckpointStore does the same for a one-rank trial, in the same folder;
- a dead rank of a DDP trial: Train restarts the worker group (train.max_failures) and every
  rank starts from `ray.train.get_checkpoint()`, the latest state, at the next epoch;
- a failed trial (a one-rank trial's dead rank among them): Tune runs `tune_trial` again
  (tune.max_failures); its TorchTrainer, or its CheckpointStore, named after the trial id
  under the study's storage, finds its own latest checkpoint;
- a dead driver: `Tuner.restore` (ray_cifar.tuning.study) runs unfinished trials' `tune_trial` again,
  which resumes the same way.

Population based training (ray_cifar.tuning.pbt): an exploit restarts the trial with a new config that
carries its lineage (generation n, the donor's trial id and generation). Generation n trains in a
run of its own, `trial-<id>-g<n>` (so Train's resume, and CheckpointStore, never reload the
trial's pre-exploit state), which starts from a copy of the donor's latest checkpoint
(`trial-<id>-g<n>.donor/state.pt`, taken once: the donor keeps training and deletes old epochs,
and deleted once generation n has a checkpoint of its own); a retry or `--resume` of generation n
finds that run's own latest checkpoint first.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import posixpath
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow.fs as pafs
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from .. import checkpoint, engine, storage
from ..checkpoint_store import (CheckpointStore, checkpoint_folder_names, copy_latest_state, has_checkpoint, load_state_at,
                                newest_loadable_state, remove_state_at)
from ..config import Config, split_sampled
from ..data.loader import make_splits
from ..data.source import load_cifar10
from ..loop import build_model, evaluate_split, run_training
from ..data.pipelines import train_loader_for
from ..validation import config_from_dict, trial_config
from .cluster import runs_in_trial_process


def _latest_state(run_without_snapshot: str | None = None) -> dict | None:
    """The state to resume from: Ray Train's latest checkpoint, or when that one is damaged the newest
    older one of the run that loads (its folder: storage_path/trial-<id>/checkpoint_<time>). Where Ray Train's
    list of the run's checkpoints was set aside as damaged (`run_without_snapshot`, the run's folder), Train
    knows none: the newest in that folder that loads."""
    found = ray.train.get_checkpoint()
    warn = print if ray.train.get_context().get_world_rank() == 0 else (lambda msg: None)
    if found is None:
        loaded = newest_loadable_state(run_without_snapshot, warn) if run_without_snapshot else None
        return {**loaded[1], "loaded_from": loaded[0]} if loaded else None
    fs, latest = found.filesystem, found.path.rstrip("/")
    run_folder = posixpath.dirname(latest)
    names = [latest] + [posixpath.join(run_folder, n) for n in checkpoint_folder_names(fs, run_folder)
                        if posixpath.join(run_folder, n) != latest]
    loaded = checkpoint.newest_loadable(((p, functools.partial(_load_ray_checkpoint, fs, p)) for p in names), warn)
    return {**loaded[1], "loaded_from": storage.location_in(fs, loaded[0])} if loaded else None


# Ray Train 2.60 keeps the list of a run's reported checkpoints in this file of the run's folder and rewrites it in
# place after each report: a driver killed mid-write (its Train controller goes with it) can leave it empty, and a
# resumed run's controller then fails on it (CheckpointManagerInitializationError), failing the trial for good.
RUN_SNAPSHOT = "checkpoint_manager_snapshot.json"


def set_aside_damaged_run_snapshot(run: str, warn=print) -> bool:
    """Move a run's damaged (not JSON) Ray Train snapshot aside as NAME.damaged, with one line; whether it was."""
    fs, path = storage.filesystem(run)
    file = posixpath.join(path, RUN_SNAPSHOT)
    if fs.get_file_info(file).type != pafs.FileType.File:  # none yet: the run's first start
        return False
    try:
        with fs.open_input_stream(file) as f:
            json.loads(f.read().decode("utf-8"))
        return False
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        fs.move(file, f"{file}.damaged")
        warn(f"[ray_cifar] warning: Ray Train's list of the checkpoints of {run} ({RUN_SNAPSHOT}) was damaged (a "
             f"kill while Ray wrote it?); set aside as {RUN_SNAPSHOT}.damaged: the trial goes on from its newest "
             f"checkpoint that loads")
        return True


def _load_ray_checkpoint(fs, path: str) -> dict:
    with ray.train.Checkpoint(path, filesystem=fs).as_directory() as directory:
        return checkpoint.load_state(directory)


def adopted_state(location: str | None) -> dict | None:
    """The donor's training state copied for this generation (None without one), as this trial's start:
    its model, optimizer, schedule, scaler, epoch and step; not the donor's history of rows or best epoch."""
    state = load_state_at(location) if location else None
    if state is not None:
        state.update(history=[], best={"value": None, "epoch": None})
    return state


def own_or_adopted(own: Callable[[], dict | None], donor: str | None) -> Callable[[], dict | None]:
    return lambda: own() or adopted_state(donor)


def _rank_nodes(world_size: int) -> str:
    """The Ray node of every rank, in rank order (short ids), so a row shows where its ranks ran."""
    node = ray.get_runtime_context().get_node_id()[:12]
    if world_size == 1:
        return node
    nodes: list[Any] = [None] * world_size
    dist.all_gather_object(nodes, node)  # once per run, before the first step
    return ",".join(nodes)


def _quiet_report_logs() -> None:
    """Ray Train 2.60 logs every report (its whole metrics dict) at INFO from every rank, and rank 0's every
    checkpoint ("Checkpoint successfully created at: ...", a line an epoch beside the epoch's own; the rows keep
    its path). Rank 0 already prints one line an epoch, so keep the rest for warnings."""
    try:
        from ray.train.v2._internal.execution import context, storage as train_storage
    except ImportError:  # another Ray version: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)  # (Ray names that logger by its file)
    logging.getLogger(train_storage.__name__).setLevel(logging.WARNING)


class PhaseClock:
    """Wall-clock laps of a trial's start-up on one rank, reported once as `timing_<phase>_seconds` columns.

    Laps count from the Tune trial function's start (`started`, time.time() in the trial's driver
    process), so the first lap also holds the Train controller and worker-group start."""

    def __init__(self, started: float | None):
        self.started = started
        self.last = started
        self.laps: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.time()
        if self.last is not None:
            self.laps[phase] = now - self.last
        self.last = now

    def columns(self, startup_seconds: float, loop_setup: float | None) -> dict[str, float]:
        """The laps, the loop's own setup (model, DDP, pipeline build), and the rest of the start-up:
        the first step (warm-up, DDP's first all-reduce)."""
        laps = dict(self.laps)
        if loop_setup is not None:
            laps["loop_setup"] = loop_setup
        laps["first_step"] = startup_seconds - sum(laps.values())
        return {"timing_trial_started_at": self.started,
                **{f"timing_{phase}_seconds": seconds for phase, seconds in laps.items()}}


@dataclass
class Rank:
    """Where one rank runs and how its results leave: a Ray Train worker, or the Tune trial process itself."""

    rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    latest_state: Callable[[], dict | None]
    # (metrics, checkpoint folder on rank 0 else None, its epoch, the best epoch so far): every rank, every epoch.
    report: Callable[[dict, str | None, int, int | None], None]


def run_rank(cfg: Config, where: Rank, clock: PhaseClock, started: float | None,
             columns: dict[str, Any] | None = None) -> None:
    """One rank of a trial, resumed from the latest checkpoint if there is one: the same on both paths.
    `columns` go into every epoch's metrics (PBT's lineage)."""
    rank, world_size, device = where.rank, where.world_size, where.device
    log = print if rank == 0 else (lambda msg: None)
    capped = engine.cap_gpu_memory(device, cfg.train.gpus_per_worker)  # before the data goes to the GPU
    if capped:
        log(f"[ray_cifar] packed: {capped}")
    resume = where.latest_state()
    clock.lap("resume_read")
    dataset = load_cifar10(cfg.data.path, cfg.data.cache_dir, log=log)  # decoded once, cached per node
    clock.lap("data_load")
    splits = make_splits(dataset, cfg.data, device)
    clock.lap("splits")
    extra = {"nodes": _rank_nodes(world_size), **(columns or {})}  # resumed_from_epoch: the loop's, per epoch
    clock.lap("rank_nodes")
    first = {"report": True}

    def report(metrics: dict, state) -> None:
        # ended_at: the checkpoint's history keeps it (a row recovered from there takes its time); Tune gets none.
        metrics.update(extra, ended_at=time.time())
        if first.pop("report", False):
            # Startup: from the trial's start (Tune trial function) to the end of the first epoch
            # minus that epoch's own work, i.e. to the first trained step.
            if started is not None:
                metrics["startup_seconds"] = time.time() - started - metrics["epoch_seconds"] - metrics["eval_seconds"]
                metrics.update(clock.columns(metrics["startup_seconds"], metrics.get("setup_seconds")))
            if resume is not None:
                # Epochs the checkpoint has seen: lets the driver recover rows it never received. The last one's
                # checkpoint is the one resumed from (the driver may never have heard of it: it can be the best).
                history = metrics["history"] = [dict(h) for h in resume["history"]]
                if resume.get("loaded_from") and history and history[-1]["epoch"] == resume["epoch"]:
                    history[-1]["checkpoint_path"] = resume["loaded_from"]
        metrics.pop("setup_seconds", None)
        with tempfile.TemporaryDirectory() as tmp:
            saved, epoch, best_epoch = None, int(metrics["epoch"]), None
            if rank == 0:
                save_start = time.perf_counter()
                full = state()
                checkpoint.save_state(full, tmp)
                metrics["timing_checkpoint_save_seconds"] = time.perf_counter() - save_start
                saved, best_epoch = tmp, full["best"]["epoch"]
            metrics.pop("ended_at")
            where.report(metrics, saved, epoch, best_epoch)

    loader = train_loader_for(cfg, splits.train, device, rank, world_size, log=log)
    clock.lap("pipeline_build")
    run_training(cfg, loader, splits.val, device, rank, world_size, on_epoch=report,
                 local_world_size=where.local_world_size, log=log, resume=resume)


def _train_report(metrics: dict, directory: str | None, epoch: int, best_epoch: int | None,
                  after_checkpoint: Callable[[], None] = lambda: None) -> None:
    # A barrier: every rank calls it each epoch; Ray keeps the latest and the best checkpoint.
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if directory else None)
    if directory:  # rank 0, its checkpoint persisted (report uploads it before it returns)
        after_checkpoint()


def _once(action: Callable[[], None]) -> Callable[[], None]:
    done = []

    def run() -> None:
        if not done:
            done.append(True)
            action()

    return run


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """What each DDP rank of a TorchTrainer runs. Ray Train has already set up the process group."""
    _quiet_report_logs()
    clock = PhaseClock(loop_config.get("started"))
    clock.lap("worker_group")  # Tune trial start -> this rank runs: Train controller, workers, process group
    ctx = ray.train.get_context()
    donor = loop_config.get("donor")
    # The generation's first checkpoint of its own replaces its donor's copy (a retry resumes from its own).
    drop_donor_copy = _once(lambda: remove_state_at(donor) if donor else None)
    report = functools.partial(_train_report, after_checkpoint=drop_donor_copy)
    latest = functools.partial(_latest_state, loop_config.get("run_without_snapshot"))
    where = Rank(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_world_size(),
                 ray.train.torch.get_device(),  # the rank's own (visible) GPU, or cpu
                 own_or_adopted(latest, donor), report)
    run_rank(config_from_dict(loop_config["config"]), where, clock, loop_config.get("started"),
             loop_config.get("columns"))


def train_in_trial_process(cfg: Config, storage_path: str, name: str, started: float, donor: str | None = None,
                           columns: dict[str, Any] | None = None) -> None:
    """A one-rank trial, trained right here in its Tune trial process: no Train controller, no worker
    processes to start (most of a short trial's start-up), the same loop, checkpoints and resume.

    Its checkpoints go to the folder a TorchTrainer run of the trial would use (CheckpointStore keeps
    the latest and the best), so a Tune retry or `--resume` continues from the latest finished epoch."""
    from ray import tune

    store = CheckpointStore(storage.join(storage_path, name))

    # The generation's first checkpoint of its own replaces its donor's copy (a retry resumes from its own).
    drop_donor_copy = _once(lambda: remove_state_at(donor) if donor else None)

    def report(metrics: dict, directory: str | None, epoch: int, best_epoch: int | None) -> None:
        metrics["checkpoint_path"] = store.save(directory, epoch, best_epoch)
        drop_donor_copy()
        tune.report(metrics)

    device = ray_gpu() if cfg.train.use_gpu else torch.device("cpu")
    if device.type == "cuda" and device.index:  # (what Ray Train does for a rank: torch's default device)
        torch.cuda.set_device(device)
    clock = PhaseClock(started)
    run_rank(cfg, Rank(0, 1, 1, device, own_or_adopted(store.latest, donor), report), clock, started, columns)


def ray_gpu() -> torch.device:
    """The GPU Ray gave this process (a one-rank trial's, a test evaluation's). Ray narrows its
    CUDA_VISIBLE_DEVICES to it (so cuda:0), unless told not to (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1):
    then the GPU's place among those visible, as Ray Train finds a rank's; cuda:0 would put every trial of the
    node, packed ones too, on its first GPU. Outside Ray (a process of its own): cuda:0."""
    if not ray.is_initialized():  # (ray.get_gpu_ids() would start a local Ray to answer)
        return torch.device("cuda", 0)
    ids = [str(i) for i in ray.get_gpu_ids()]
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d and d != "NoDevFiles"]
    if not ids:
        return torch.device("cuda", 0)
    if not visible:
        return torch.device("cuda", int(ids[0]))
    if ids[0] not in visible:
        raise RuntimeError(f"Ray gave this trial GPU {ids[0]}, which CUDA_VISIBLE_DEVICES={','.join(visible)} hides")
    return torch.device("cuda", visible.index(ids[0]))


def make_trainer(cfg: Config, storage_path: str, name: str, callbacks: list | None = None,
                 started: float | None = None, donor: str | None = None,
                 columns: dict[str, Any] | None = None, run_without_snapshot: str | None = None) -> TorchTrainer:
    use_gpu = bool(cfg.train.use_gpu)
    # Each rank's GPU (train.gpus_per_worker: 1 here in practice, since a share of a GPU is only allowed
    # for one rank, and a one-rank trial trains in its Tune process without a TorchTrainer).
    gpus = {"GPU": cfg.train.gpus_per_worker} if use_gpu else {}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "started": started, "donor": donor, "columns": columns,
                           "run_without_snapshot": run_without_snapshot},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker, **gpus},
                                     placement_strategy=cfg.train.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=name, storage_path=storage_path, callbacks=callbacks or [],
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            # Keeps the best two by the study's metric and, beside them, always the latest (to resume from):
            # at least one older state to fall back on when the latest is damaged.
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=cfg.tune.metric,
                                               checkpoint_score_order=cfg.tune.mode)),
    )


def trainer_name(trial_id: str, generation: int = 0) -> str:
    """A trial's TorchTrainer run name: stable across Tune retries and `--resume` (trial ids are kept);
    a PBT trial's generation n > 0 (after its n-th exploit) is a run of its own."""
    return f"trial-{trial_id}" + (f"-g{generation}" if generation else "")


def donor_location(storage_path: str, trial_id: str, generation: int) -> str:
    return storage.join(storage_path, f"{trainer_name(trial_id, generation)}.donor")


def copy_donor_state(storage_path: str, trial_id: str, lineage: dict[str, Any], epochs: int | None = None) -> bool:
    """Copy the donor's latest checkpoint with epochs left (before `epochs`, the run's last) as the start of
    the trial's generation lineage["generation"] (ray_cifar.tuning.pbt, in the driver, when it decides the
    exploit). False if the donor has none."""
    source = storage.join(storage_path, trainer_name(lineage["parent"], lineage.get("parent_generation", 0)))
    return copy_latest_state(source, donor_location(storage_path, trial_id, lineage["generation"]),
                             before_epoch=epochs)


def donor_copy(storage_path: str, name: str, lineage: dict[str, Any]) -> str | None:
    """Where this generation's starting state is: the copy of the donor's latest checkpoint made when the exploit
    was decided (made here if it is missing). None for generation 0, for a generation that has a checkpoint of
    its own (its first one deletes the copy), or when neither the donor nor this trial's previous generation
    has a checkpoint."""
    if not lineage.get("generation") or has_checkpoint(storage.join(storage_path, name)):
        return None  # generation 0, or one with a checkpoint of its own: it resumes from that
    location = storage.join(storage_path, f"{name}.donor")
    if load_state_at(location) is not None:
        return location  # copied by the driver, or by an earlier attempt of this generation
    sources = [trainer_name(lineage["parent"], lineage.get("parent_generation", 0)),
               # A donor without a checkpoint (cannot happen with checkpoints every epoch, but a store can be
               # damaged): this trial goes on from its own last state, with the new values.
               trainer_name(lineage["trial_id"], lineage["generation"] - 1)]
    for source in sources:
        if copy_latest_state(storage.join(storage_path, source), location):
            return location
    return None


def lineage_columns(cfg: Config, lineage: dict[str, Any]) -> dict[str, Any] | None:
    """pbt_generation and pbt_parent (the donor's trial id; empty before the first exploit), for PBT studies only."""
    if cfg.tune.scheduler not in ("pbt", "pb2"):
        return None
    return {"pbt_generation": int(lineage.get("generation", 0)), "pbt_parent": lineage.get("parent", "")}


def tune_trial(sampled: dict[str, Any], base_config: dict[str, Any], storage_path: str) -> None:
    """The Tune function trainable: this trial's config -> one TorchTrainer run (resumed if it ran before)."""
    from ray import tune

    started = time.time()
    cfg = trial_config(base_config, sampled)
    trial_id = tune.get_context().get_trial_id()
    lineage = split_sampled(sampled)[1]
    name = trainer_name(trial_id, int(lineage.get("generation", 0)))
    donor, columns = donor_copy(storage_path, name, {**lineage, "trial_id": trial_id}), lineage_columns(cfg, lineage)
    if runs_in_trial_process(cfg.train.num_workers):
        train_in_trial_process(cfg, storage_path, name, started, donor, columns)
        return
    run = storage.join(storage_path, name)
    make_trainer(cfg, storage_path, name=name, callbacks=[_ReportCheckpointLocation()], started=started, donor=donor,
                 columns=columns, run_without_snapshot=run if set_aside_damaged_run_snapshot(run) else None).fit()


class _ReportCheckpointLocation(TuneReportCallback):
    """Ray's TuneReportCallback, with the checkpoint as a location the driver can open: Checkpoint.path is a path
    inside the run's filesystem (`bucket/study/ray/trial-x/checkpoint_...` on a bucket, no scheme), which the test
    evaluation, PBT's donor copy and the recovery of rows would read as a local path."""

    def after_report(self, run_context, metrics, checkpoint):
        if checkpoint is not None:
            located = storage.location_in(checkpoint.filesystem, checkpoint.path)
            metrics = [{**metrics[0], "checkpoint_path": located}, *metrics[1:]]
        super().after_report(run_context, metrics, None)


def _evaluate(checkpoint_path: str, split_name: str) -> dict[str, float]:
    found = ray.train.Checkpoint(checkpoint_path)
    with found.as_directory() as directory:
        state = checkpoint.load_state(directory)
    cfg = config_from_dict(state["config"])
    device = ray_gpu() if torch.cuda.is_available() else torch.device("cpu")
    model = build_model(cfg, device)
    model.load_state_dict(state["model"])
    splits = make_splits(load_cifar10(cfg.data.path, cfg.data.cache_dir, log=lambda m: None), cfg.data, device)
    return evaluate_split(cfg, model, getattr(splits, split_name), device, prefix=split_name)


def evaluate_checkpoints(checkpoint_paths: list[str], split_name: str, use_gpu: bool) -> list[dict[str, float] | Exception]:
    """evaluate_checkpoint for several checkpoints (tune.test all), each result or the exception it raised,
    in order. With GPUs every evaluation is submitted at once, so Ray runs them side by side on the free
    GPUs; on CPU they run one after another in this process (the cores are the limit either way)."""
    if not use_gpu:
        out: list[dict[str, float] | Exception] = []
        for path in checkpoint_paths:
            try:
                out.append(evaluate_checkpoint(path, split_name, use_gpu))
            except Exception as e:  # noqa: BLE001 - one damaged checkpoint must not cost the others
                out.append(e)
        return out
    task = ray.remote(_evaluate).options(num_gpus=1, num_cpus=1)
    pending = [task.remote(path, split_name) for path in checkpoint_paths]
    results: list[dict[str, float] | Exception] = []
    for ref in pending:
        try:
            results.append(ray.get(ref))
        except Exception as e:  # noqa: BLE001
            results.append(e)
    return results


def evaluate_checkpoint(checkpoint_path: str, split_name: str, use_gpu: bool) -> dict[str, float]:
    """Evaluate a trial checkpoint on a split: as a Ray task on a GPU when the study used GPUs (the
    driver's machine may have none); on CPU right here, where a fresh Ray worker process would spend
    longer starting (new Python, torch, the dataset) than the evaluation takes."""
    if not use_gpu:
        return _evaluate(checkpoint_path, split_name)
    task = ray.remote(_evaluate).options(num_gpus=1, num_cpus=1)
    return ray.get(task.remote(checkpoint_path, split_name))
