"""Experiment trackers (tune.tracking: mlflow | wandb): one tracker run per trial, fed by the study's recorder.

    tracker = create_tracker(cfg.tune.tracking, output, study="asha-1", uri=cfg.tune.tracking_uri,
                             project=cfg.tune.tracking_project)   # None for tune.tracking=none
    tracker.log_epochs(trial_id, params, rows)            # rows: the recorder's epoch rows; step = epoch
    tracker.end_trial(trial_id, params, "completed")      # completed | stopped | diverged | failed | lost
    tracker.attach_study(["OUTPUT/trials.parquet", "OUTPUT/report.html", "OUTPUT/figures", ...])
                                                          # also puts each trial's end figures on its run

Each trial gets one run, grouped under the study (MLflow: child runs of a study run in the experiment
tune.tracking_project, default the output folder's name; W&B: the group named after the output folder in
the project tune.tracking_project, default "ray_cifar"), with the trial's searched values and seed as
params and every epoch's metrics at step = epoch. A run is found again by its trial id after `--resume`,
a retry or a new driver, and continues after the last step it holds: no step is logged twice.

A PBT or PB2 member's searched values change at each exploit, but params are its first values (MLflow's are
write-once): its rows (those with a pbt_generation) also log every numeric searched value as a metric under the
same key at step = epoch, the values in force at that epoch, and the donor as the latest `pbt_parent` and, per
generation, the donor and values (MLflow: tags; W&B: the run's summary). At the study's end, attach_study puts
each trial's end figures from trials.parquet (best_<tune.metric>, best_epoch, test_acc/test_loss where
evaluated, ...) on its run (MLflow: metrics at step = best_epoch; W&B: the run's summary), and the study's fixed
config (OUTPUT/config.yaml, as section.field) is the study run's params (W&B: its config).

Why not Ray Tune's MLflowLoggerCallback / WandbLoggerCallback: both log at step = Tune's
training_iteration, which restarts at 1 each time a trial function runs again (a retry, a restore);
both log every result Tune passes on, including the epochs a resumed trial reports again; and after
Tuner.restore their unpickled copies have forgotten their runs (MLflow opens a second run per trial;
W&B calls wandb.init with the trial's id and resume=False). The recorder knows which (trial, epoch)
rows are new, so the trackers here are driven by it, on the driver.

mlflow and wandb are optional (`pip install 'ray_cifar[tracking]'`) and imported only by a study that
tracks: `import mlflow` alone takes ~3 s, `import wandb` ~1 s.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import struct
import time
from typing import Any, Iterable

from ..config import ConfigError

TRACKERS = ("none", "mlflow", "wandb")
EXTRA = "ray_cifar[tracking]"
TRIAL_TAG, STUDY_TAG, STATUS_TAG = "ray_cifar.trial_id", "ray_cifar.study", "ray_cifar.status"
MLFLOW_DB = "mlflow.db"  # the default store: OUTPUT/mlflow.db (sqlite), artifacts in OUTPUT/mlflow-artifacts
MLFLOW_ARTIFACTS = "mlflow-artifacts"
WANDB_PROJECT = "ray_cifar"
# Columns of an epoch row that are not metrics: keys, text, and the run's provenance.
NOT_METRICS = {"trial_id", "epoch", "time", "diverged", "checkpoint_path", "data_pipeline", "amp", "device"}


def require(module: str):
    """Import mlflow or wandb, or a one-line ConfigError naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"tune.tracking={module} needs the {module} package: pip install '{EXTRA}' "
                          f"({type(e).__name__}: {e})") from None


def check_installed(tracking: str) -> None:
    """Before Ray starts: the tracker's package imports (the study imports it at its first row anyway)."""
    if tracking in REGISTRY:
        require(tracking)


def epoch_metrics(row: dict[str, Any], params: dict[str, Any]) -> dict[str, float]:
    """The numeric measurements of one epoch row (not its params, keys or provenance)."""
    return {k: float(v) for k, v in row.items()
            if k not in NOT_METRICS and k not in params and isinstance(v, (int, float)) and not isinstance(v, bool)
            and v is not None}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def searched_metrics(row: dict[str, Any], params: dict[str, Any]) -> dict[str, float]:
    """A PBT/PB2 member's numeric searched values in force at this epoch (they change at each exploit), as metrics
    under the same keys; {} for the rows of other studies, whose values are their params throughout."""
    if row.get("pbt_generation") is None:
        return {}
    return {k: float(v) for k, v in row.items() if (k in params or "." in k) and _number(v)}


def lineage(row: dict[str, Any], params: dict[str, Any]) -> dict[str, Any] | None:
    """A PBT/PB2 row's generation, donor (empty before the first exploit) and every searched value in force."""
    if row.get("pbt_generation") is None:
        return None
    values = {k: v for k, v in row.items() if (k in params or "." in k) and k not in NOT_METRICS}
    return {"pbt_generation": int(row["pbt_generation"]), "pbt_parent": row.get("pbt_parent") or "", "values": values}


def end_figures(trial: dict[str, Any], metric: str | None) -> dict[str, float]:
    """A trials.parquet row's end figures: best_<tune.metric> (best_metric when not known), best_epoch,
    best_val_acc, test_acc and test_loss (where the test split evaluated it), exploits (PBT); the known ones."""
    figures = {f"best_{metric}" if metric else "best_metric": trial.get("best_metric"),
               **{k: trial.get(k) for k in ("best_epoch", "best_val_acc", "test_acc", "test_loss", "exploits")}}
    return {k: float(v) for k, v in figures.items() if _number(v)}


def study_config(output: str) -> dict[str, Any] | None:
    """The study's fixed config, OUTPUT/config.yaml flattened to section.field (lists and mappings as JSON text),
    without the searched fields (their values are each trial's); None without a config.yaml."""
    import yaml

    try:
        with open(os.path.join(output, "config.yaml")) as f:
            resolved = yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(resolved, dict):
        return None
    searched = set(((resolved.get("tune") or {}).get("search_space") or {}))
    flat: dict[str, Any] = {}
    for section, fields in resolved.items():
        for key, value in (fields.items() if isinstance(fields, dict) else [(None, fields)]):
            name = f"{section}.{key}" if key is not None else str(section)
            if name not in searched:
                flat[name] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return flat


def trials_table(paths: list[str]) -> list[dict[str, Any]]:
    """The rows of the trials.parquet among PATHS (the study's end figures), [] without one."""
    from ..results import read_rows

    for path in paths:
        if os.path.basename(path) == "trials.parquet" and os.path.isfile(path):
            return read_rows(path)
    return []


def study_name(output: str, remote: str | None = None) -> str:
    """The study's name in a tracker: the output folder's (or output URI's) last part."""
    return os.path.basename(os.path.normpath(remote.rstrip("/") if remote else output)) or "study"


class Tracker:
    """One tracker run per trial. Subclasses implement _open (find or create a trial's run, return the
    last step it holds), _log, _end and attach_study."""

    def __init__(self, output: str, study: str, uri: str | None, project: str | None):
        self.output, self.study, self.uri, self.project = output, study, uri, project
        self.last_step: dict[str, int] = {}  # trial_id -> the last epoch the trial's run holds
        self.runs: dict[str, Any] = {}  # trial_id -> its open run (id or object)

    def _ensure_open(self, trial_id: str, params: dict[str, Any]) -> None:
        if trial_id not in self.runs:
            # What this driver logged itself counts too: a run just finished may not be on disk yet.
            self.last_step[trial_id] = max(self.last_step.get(trial_id, 0), self._open(trial_id, params))

    def log_epochs(self, trial_id: str, params: dict[str, Any], rows: Iterable[dict[str, Any]]) -> int:
        """Log rows as steps (step = epoch) after the last step the trial's run already holds; returns how many."""
        self._ensure_open(trial_id, params)
        new = sorted((r for r in rows if r["epoch"] > self.last_step[trial_id]), key=lambda r: r["epoch"])
        for row in new:
            self._log(trial_id, row["epoch"], {**epoch_metrics(row, params), **searched_metrics(row, params)},
                      lineage(row, params))
            self.last_step[trial_id] = row["epoch"]
        return len(new)

    def end_trial(self, trial_id: str, params: dict[str, Any], status: str) -> None:
        self._ensure_open(trial_id, params)
        self._end(trial_id, status)

    def _open(self, trial_id: str, params: dict[str, Any]) -> int:
        raise NotImplementedError

    def _log(self, trial_id: str, step: int, metrics: dict[str, float], lineage: dict[str, Any] | None) -> None:
        raise NotImplementedError

    def _end(self, trial_id: str, status: str) -> None:
        raise NotImplementedError

    def attach_study(self, paths: list[str]) -> None:
        """The study's files on its study run, and the end figures of trials.parquet (among PATHS) on each
        trial's run."""
        config = study_config(self.output) or {}
        metric = config.get("tune.metric")
        try:
            self.log_trial_summaries(trials_table(paths), metric if isinstance(metric, str) else None)
        finally:  # the study's files attached even where the end figures failed (the failure is still raised)
            self._attach(paths, config)

    def log_trial_summaries(self, trials: list[dict[str, Any]], metric: str | None = None) -> None:
        """Each trial's end figures (trials.parquet's rows: end_figures) on its run; trials without a run are
        left out. METRIC: tune.metric, naming best_metric best_<metric>."""
        raise NotImplementedError

    def _attach(self, paths: list[str], config: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class MLflowTracker(Tracker):
    """MLflow through its client: the experiment `project` (default: the study's name), a study run named
    after the study with trials.parquet and the report as artifacts, and each trial a child run of it."""

    END = {"completed": "FINISHED", "stopped": "FINISHED", "diverged": "FINISHED", "failed": "FAILED", "lost": "KILLED"}

    def __init__(self, output: str, study: str, uri: str | None, project: str | None):
        super().__init__(output, study, uri, project)
        mlflow = require("mlflow")
        if uri is None:
            uri = f"sqlite:///{os.path.abspath(os.path.join(output, MLFLOW_DB))}"
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        name = project or study
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            self.experiment_id = experiment.experiment_id
        else:
            # A store on this machine (the default, or a sqlite or file URI given) keeps its artifacts under OUTPUT,
            # not in the ./mlruns of whatever folder the driver was started from (where a given sqlite URI's went).
            # A tracking server decides where its own go.
            local = self.uri is None or self.uri.startswith(("sqlite:", "file:")) or "://" not in self.uri
            location = "file://" + os.path.abspath(os.path.join(output, MLFLOW_ARTIFACTS)) if local else None
            self.experiment_id = self.client.create_experiment(name, artifact_location=location)
        self.study_run = self._find_or_create(STUDY_TAG, study, {STUDY_TAG: study, "ray_cifar.kind": "study"},
                                              run_name=study)
        self._log_study_params(study_config(output) or {})

    def _log_study_params(self, config: dict[str, Any]) -> None:
        """The study's fixed config as the study run's params: the ones it does not hold yet (write-once)."""
        from mlflow.entities import Param

        held = self.client.get_run(self.study_run).data.params
        todo = [Param(k, str(v)[:6000]) for k, v in config.items() if k not in held]
        for at in range(0, len(todo), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.study_run, params=todo[at:at + 100])

    def _find_or_create(self, tag: str, value: str, tags: dict[str, str], run_name: str) -> str:
        kind = "study" if tag == STUDY_TAG else "trial"
        found = self.client.search_runs([self.experiment_id], max_results=1, filter_string=(
            f"tags.`{tag}` = '{value}' and tags.`{STUDY_TAG}` = '{self.study}' and tags.`ray_cifar.kind` = '{kind}'"))
        if found:
            run_id = found[0].info.run_id
            if found[0].info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")  # a retried trial, reopened
            return run_id
        return self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id

    def _open(self, trial_id: str, params: dict[str, Any]) -> int:
        from mlflow.entities import Param

        run_id = self._find_or_create(TRIAL_TAG, trial_id, {
            TRIAL_TAG: trial_id, STUDY_TAG: self.study, "ray_cifar.kind": "trial",
            "mlflow.parentRunId": self.study_run}, run_name=trial_id)
        self.runs[trial_id] = run_id
        run = self.client.get_run(run_id)
        if not run.data.params:  # params are write-once in MLflow: log them on the run's first opening only
            self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        # The "epoch" metric is logged in the same batch as the epoch's metrics: its latest value is the last step.
        return int(run.data.metrics.get("epoch", 0))

    def _log(self, trial_id: str, step: int, metrics: dict[str, float], lineage: dict[str, Any] | None) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in {**metrics, "epoch": float(step)}.items()]
        tags = []
        if lineage is not None:  # a PBT member: its latest generation and donor, and each generation's
            generation, parent = lineage["pbt_generation"], lineage["pbt_parent"]
            tags = [RunTag("ray_cifar.pbt_generation", str(generation)), RunTag("ray_cifar.pbt_parent", parent),
                    RunTag(f"ray_cifar.pbt_generation.{generation}",
                           json.dumps({"pbt_parent": parent, **lineage["values"]}, default=str)[:8000])]
        self.client.log_batch(self.runs[trial_id], metrics=batch, tags=tags)  # one write: metrics and tags

    def _end(self, trial_id: str, status: str) -> None:
        run_id = self.runs.pop(trial_id)
        self.client.set_tag(run_id, STATUS_TAG, status)
        self.client.set_terminated(run_id, status=self.END.get(status, "FINISHED"))

    def log_trial_summaries(self, trials: list[dict[str, Any]], metric: str | None = None) -> None:
        from mlflow.entities import Metric

        runs = self.client.search_runs([self.experiment_id], max_results=50000, filter_string=(
            f"tags.`{STUDY_TAG}` = '{self.study}' and tags.`ray_cifar.kind` = 'trial'"))
        by_trial = {r.data.tags.get(TRIAL_TAG): r for r in runs}
        now = int(time.time() * 1000)
        for trial in trials:
            run = by_trial.get(trial.get("trial_id"))
            if run is None:
                continue
            # At step = best_epoch: the test figures are of that epoch's checkpoint. Logged once: a figure the run
            # already holds is not logged again (a second attach).
            step = int(trial.get("best_epoch") or 0)
            batch = [Metric(k, v, now, step) for k, v in end_figures(trial, metric).items()
                     if run.data.metrics.get(k) != v]
            if batch:
                self.client.log_batch(run.info.run_id, metrics=batch)

    def _attach(self, paths: list[str], config: dict[str, Any]) -> None:
        self._log_study_params(config)
        for path in paths:
            if os.path.isdir(path):  # figures/: the report's images, beside it as it links them
                self.client.log_artifacts(self.study_run, path, artifact_path=os.path.basename(path))
            elif os.path.exists(path):
                self.client.log_artifact(self.study_run, path)
        self.client.set_terminated(self.study_run, status="FINISHED")


class WandbTracker(Tracker):
    """W&B: the project `project` (default "ray_cifar"), the group named after the study, one run per trial
    (id <study>-<trial_id>, resumed by that id), and a study run (job_type "study") that logs trials.parquet
    and the report as an artifact. Offline (files under OUTPUT/wandb, `wandb sync` uploads them) unless
    WANDB_MODE or WANDB_API_KEY is set.

    W&B writes a run's records to its file every 15 s (and at finish): a killed driver loses the steps it
    logged since, and the resumed driver, reading the earlier files, logs them again from the rows."""

    def __init__(self, output: str, study: str, uri: str | None, project: str | None):
        super().__init__(output, study, uri, project)
        self.wandb = require("wandb")
        configured = os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY")
        self.mode = None if configured else "offline"

    def run_id(self, name: str) -> str:
        return re.sub(r"[^A-Za-z0-9_-]", "-", f"{self.study}-{name}")[:120]

    def _init(self, name: str, **kwargs):
        if self.mode == "offline":
            # W&B names an offline run's folder by the second it starts: a run reopened within the second it was
            # last started writes into that folder, over its file.
            started = [os.path.basename(os.path.dirname(f)) for f in offline_runs(self.output, self.run_id(name))]
            if any(f.startswith(time.strftime("offline-run-%Y%m%d_%H%M%S-")) for f in started):
                time.sleep(1.05 - time.time() % 1)
        return self.wandb.init(project=self.project or WANDB_PROJECT, group=self.study, name=name,
                               id=self.run_id(name), dir=self.output, mode=self.mode, resume="allow",
                               reinit="create_new", settings=self.wandb.Settings(silent=True, console="off"),
                               **kwargs)

    def _open(self, trial_id: str, params: dict[str, Any]) -> int:
        before = offline_last_step(self.output, self.run_id(trial_id)) if self.mode == "offline" else 0
        run = self._init(trial_id, job_type="trial", config=params, tags=[self.study])
        self.runs[trial_id] = run
        # Online, W&B knows the resumed run's last step; offline, each start is a new run folder (`wandb sync`
        # joins them by id) and the last step is read back from the earlier folders' .wandb files.
        return max(before, int(getattr(run, "starting_step", 0) or 0) - 1, 0)

    def _log(self, trial_id: str, step: int, metrics: dict[str, float], lineage: dict[str, Any] | None) -> None:
        run = self.runs[trial_id]
        run.log({**metrics, "epoch": step}, step=step)
        if lineage is not None:  # a PBT member: its latest generation and donor, and each generation's
            generation, parent = lineage["pbt_generation"], lineage["pbt_parent"]
            run.summary.update({"pbt_generation": generation, "pbt_parent": parent,
                                f"pbt_generation_{generation}": {"pbt_parent": parent, **lineage["values"]}})

    def _end(self, trial_id: str, status: str) -> None:
        run = self.runs.pop(trial_id)
        run.summary["status"] = status
        run.finish(exit_code=1 if status in ("failed", "lost") else 0)  # returns before the run's file is complete

    def log_trial_summaries(self, trials: list[dict[str, Any]], metric: str | None = None) -> None:
        for trial in trials:
            trial_id = trial.get("trial_id")
            if not trial_id or (self.mode == "offline" and not offline_runs(self.output, self.run_id(trial_id))):
                continue
            # Reopened (resume="allow"), with its params again: an offline start's file is read on its own.
            params = {k: v for k, v in trial.items() if "." in k}
            run = self._init(trial_id, job_type="trial", config=params, tags=[self.study])
            run.summary.update({**end_figures(trial, metric), "status": trial.get("status")})
            run.finish(exit_code=1 if trial.get("status") in ("failed", "lost") else 0)

    def _attach(self, paths: list[str], config: dict[str, Any]) -> None:
        run = self._init("study", job_type="study", config=config)
        artifact = self.wandb.Artifact(self.run_id("results"), type="study-results")
        for path in paths:
            if os.path.isdir(path):  # figures/: the report's images, beside it as it links them
                artifact.add_dir(path, name=os.path.basename(path))
            elif os.path.exists(path):
                artifact.add_file(path)
        run.log_artifact(artifact)
        run.finish()

    def close(self) -> None:
        for run in self.runs.values():
            run.finish(exit_code=1)  # the driver is stopping with trials unfinished; --resume reopens them
        self.runs.clear()


REGISTRY = {"mlflow": MLflowTracker, "wandb": WandbTracker}


def create_tracker(tracking: str, output: str, study: str, uri: str | None = None,
                   project: str | None = None) -> Tracker | None:
    if tracking == "none":
        return None
    if tracking not in REGISTRY:
        raise ConfigError(f"tune.tracking={tracking!r}: expected one of {', '.join(TRACKERS)}")
    return REGISTRY[tracking](output, study, uri, project)


# -- W&B's offline run files ---------------------------------------------------------------------------
# A .wandb file is W&B's record log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB-log
# blocks of 32 KiB holding records (crc32, length, type: full | first | middle | last), each record a
# wandb.proto Record. The SDK no longer ships a Python reader; this one is what `wandb sync` reads.

_BLOCK, _HEADER = 32768, struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: str):
    """Every Record (wandb.proto.wandb_internal_pb2.Record) in a .wandb file; a torn tail (a killed driver) ends it."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file")
    pos, pending = 7, b""
    while pos + _HEADER.size <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER.size:  # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = _HEADER.unpack_from(data, pos)
        chunk = data[pos + _HEADER.size:pos + _HEADER.size + length]
        pos += _HEADER.size + length
        if len(chunk) < length or kind == 0:
            break
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(pending)
            except Exception:  # noqa: BLE001 - a torn record at the end of a killed run's file
                break
            yield record


def wandb_history(path: str) -> list[dict[str, Any]]:
    """The logged steps of one .wandb file: [{"_step": n, key: value, ...}, ...] in order."""
    steps = []
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            steps.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return steps


def offline_runs(output: str, run_id: str) -> list[str]:
    """The .wandb files of every offline start of run `run_id` under OUTPUT/wandb, oldest first."""
    return sorted(glob.glob(os.path.join(output, "wandb", f"offline-run-*-{run_id}", f"run-{run_id}.wandb")))


def offline_last_step(output: str, run_id: str) -> int:
    steps = [int(s["_step"]) for path in offline_runs(output, run_id) for s in wandb_history(path) if "_step" in s]
    return max(steps, default=0)
