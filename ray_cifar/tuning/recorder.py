"""The study's memory in the driver: every reported epoch as a Parquet row, and each trial's status.

`StudyRecorder` is a Ray Tune callback. Its state lives on disk, not in the object:
rows go to `ResultsLog` (one small part file per report, never a rewrite of everything),
trial summaries to OUTPUT/trials.json. `Tuner.restore` hands back an unpickled *copy* of
the callbacks, so the copy reads that state again in `setup()`; nothing reported before a
driver died is lost, and a (trial_id, epoch) pair is written once.

Status comes from Tune's own events, not from epoch counts:
  completed  the trial function returned (it trained to its end)
  stopped    the scheduler stopped it (`note_stopped`, called by ray_cifar.tuning.scheduler)
  diverged   it reported a non-finite train loss and ended itself
  failed     Tune gave up on it (after tune.max_failures retries); `error` is the exception's last line
  lost       made after Tune last saved its trial list, by a driver that then died, and not made again by a
             model-based search on --resume (it draws another in its place)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import posixpath
import signal
import time
from typing import Any, Callable

from ray.tune import Callback

from .. import storage
from ..config import improves
from ..results import (LINEAGE_COLUMNS, TRIALS_STATE, ResultsLog, epoch_row, rank_trials, read_trials_state, scored,
                       trial_value)

RUNNING, COMPLETED, STOPPED, DIVERGED, FAILED = "running", "completed", "stopped", "diverged", "failed"
# A trial with rows that Tune's saved state never held: its driver died after the trial was made and before Tune
# saved the trial list. Tune never runs it again; a model-based searcher draws another trial in its place (a grid or
# random study makes it again, same id: tuning.variants, and its next row makes it `running` again).
LOST = "lost"
LOST_ERROR = ("lost with a dead driver: made after Tune last saved its trials, so Tune never ran it again; its rows "
              "are kept")
# In trials.json (not trials.parquet): the newest epoch whose result a live driver passed to this recorder, after its
# scheduler had decided on it. Rows past it were recovered (from a checkpoint, after a dead driver): no scheduler
# decided on them, so a restored ASHA takes the decision its rebuilt rungs make (scheduler.RestorableASHA).
JUDGED = "judged_epoch"
PROGRESS_EVERY_SECONDS = 60.0
# Parts merged into results.parquet while the study runs, every this many. A read of the log (a --resume, the
# report, a tracker's first row of each trial) costs ~2 ms a part: 5,000 rows left as parts until the study's end
# took 9.7 s a read, 20,000 rows merged 0.13 s; merging 256 parts onto 20,000 rows takes 0.7 s (2-core machine).
COMPACT_EVERY_PARTS = 256
DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded")

# What stopped this driver's study for want of disk space (a line each); ray_cifar.tuning.study reads it after fit().
# Module state, not the callback's: Tuner.restore runs an unpickled copy of the callback.
FULL_DISK: list[str] = []


def ended_by_itself(trial) -> bool:
    """Whether Tune saw TRIAL end (its function returned, or its scheduler or stopper stopped it): Tune marks that
    last result done. A trial the experiment's stop ended unfinished has no such mark."""
    return bool((getattr(trial, "last_result", None) or {}).get("done"))


def stop_for_full_disk(message: str) -> None:
    """Stop the study as the first Ctrl-C does (Tune's SIGINT handler: trials end unfinished, the experiment
    is saved and resumable): retrying trials or writing more rows cannot succeed until space is freed."""
    if not FULL_DISK:
        os.kill(os.getpid(), signal.SIGINT)
    FULL_DISK.append(message)


class QuietFullDiskFailures(logging.Filter):
    """Tune and Ray log a failed trial task, a failed experiment-state save, an unhandled task error, each with
    its whole traceback; for a full disk the study says it in one line instead (the trial's traceback stays in
    its error.txt). So: records about a full disk, and once the study is stopping for one, its errors."""

    LOGGERS = ("ray.tune.execution.tune_controller", "ray.tune.execution.experiment_state", "ray.tune.tune",
               "ray._private.worker", "ray.train._internal.syncer")

    def filter(self, record: logging.LogRecord) -> bool:
        if FULL_DISK and record.levelno >= logging.WARNING:
            return False
        text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
        return not any(t in text for t in DISK_FULL_TEXT)

    @classmethod
    def install(cls) -> None:
        for name in cls.LOGGERS:
            logger = logging.getLogger(name)
            if not any(isinstance(f, cls) for f in logger.filters):
                logger.addFilter(cls())


def quiet_trial_boxes() -> None:
    """Tune prints a box of a trial's config when it starts and one of everything it reported when it ends: ~45
    lines a trial (899 of the 1,219 lines of a 24-trial study), with internals such as timing_trial_started_at. The
    recorder says each in one line instead (trial_started_line, trial_ended_line); Tune's status table and its
    error reports stay. Its "Current best trial" is left out of the table too: it ranks trials by their last result,
    and at a study's end named another trial than the study's best, ranked by each trial's best epoch (the progress
    line says that one). (The reporter is Ray's private class: where it is not, Tune's boxes stay.)"""
    try:
        from ray.tune.experimental import output
        from ray.tune.experimental.output import TuneReporterBase
    except ImportError:
        return
    TuneReporterBase.on_trial_start = lambda self, *args, **kwargs: None
    TuneReporterBase.on_trial_complete = lambda self, *args, **kwargs: None
    if hasattr(output, "_current_best_trial"):
        output._current_best_trial = lambda trials, metric, mode: (None, None)


def trial_started_line(trial_id: str, params: dict[str, Any], recorded_epochs: int = 0) -> str:
    values = ", ".join(f"{k}={v}" for k, v in params.items())
    how = f"goes on ({recorded_epochs} epoch(s) recorded)" if recorded_epochs else "started"
    return f"[ray_cifar] trial {trial_id} {how}" + (f": {values}" if values else "")


def trial_ended_line(summary: dict[str, Any], metric: str) -> str:
    """One line for a trial that ended: how, after how many epochs, and its best epoch by tune.metric."""
    how = {STOPPED: "stopped by its scheduler", DIVERGED: "diverged"}.get(summary["status"], summary["status"])
    best = summary.get("best_metric")
    figure = f"; best {metric} {best:.4f} at epoch {summary.get('best_epoch')}" if isinstance(best, float) else ""
    return f"[ray_cifar] trial {summary['trial_id']} {how} after {summary.get('epochs') or 0} epoch(s){figure}"


class NoTunerRestoreHint(logging.Filter):
    """Tune ends an interrupted experiment with "Resume experiment with: Tuner.restore(path=..., trainable=...)",
    which is not how a study goes on (its own line gives `python -m ray_cifar.tune --resume OUTPUT`): two ways
    to resume, one of them without ray_cifar's schedulers, recorder and checks."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore(" not in record.getMessage()

    @classmethod
    def install(cls) -> None:
        logger = logging.getLogger("ray.tune.tune")
        if not any(isinstance(f, cls) for f in logger.filters):
            logger.addFilter(cls())


def error_line(trial) -> str:
    """The last non-empty line of a failed trial's error (Tune's error file), or a pointer to the logs."""
    path = getattr(trial, "error_file", None)
    text = ""
    if path and os.path.exists(path):
        with open(path) as f:
            text = f.read()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:500] if lines else "failed (see Ray's logs under OUTPUT/ray)"


class StudyRecorder(Callback):
    """Records rows and statuses; prints the study's progress every minute.

    Args:
        output: the study's output folder (results, trials.json, tensorboard/).
        params: trial config (Tune's sampled dict) -> the searched fields as flat columns.
        metric, mode: what "best" means (tune.metric, tune.mode).
        provenance: columns added to every row (git SHA, versions).
        tensorboard: write per-trial TensorBoard scalars under OUTPUT/tensorboard/<trial_id> (step = epoch).
        mirror_to: a remote --output (s3://, gs://): each results part and trials.json is copied up to it as
            written (a head lost with its disk loses no recorded row), the rest of OUTPUT every minute (what changed).
        tracking: create_tracker's arguments ({"tracking": "mlflow", "study": ..., "uri": ..., "project": ...}):
            every new row also goes to the trial's tracker run; None: no tracker.
        storage_path: where one-rank trials keep their checkpoints (storage_path/trial-<id>): after a restore,
            epochs a trial checkpointed but never reported are recovered from there; None: not looked for (a
            study with DDP trials: a TorchTrainer resumes from the checkpoint Ray Train registered, which can be
            older than the newest on disk, and its first report carries that one's history; PBT: a member's
            generations are runs of their own, and its reports give their rows the lineage).
    """

    def __init__(self, output: str, params: Callable[[dict], dict[str, Any]], metric: str, mode: str,
                 provenance: dict[str, Any] | None = None, tensorboard: bool = True,
                 progress_every: float = PROGRESS_EVERY_SECONDS, mirror_to: str | None = None,
                 total_trials: int | None = None, tracking: dict[str, Any] | None = None,
                 compact_every: int | None = None, storage_path: str | None = None):
        self.output, self.params, self.metric, self.mode = output, params, metric, mode
        self.compact_every = compact_every or COMPACT_EVERY_PARTS
        self.tracking = tracking
        self.mirror_to, self.total_trials, self.storage_path = mirror_to, total_trials, storage_path
        self.provenance = provenance or {}
        self.tensorboard, self.progress_every = tensorboard, progress_every
        self._load()

    # -- state on disk -----------------------------------------------------------------

    def _load(self) -> None:
        # A damaged part is set aside (one warning) and its rows recovered from the trials' checkpoints.
        self.log = ResultsLog(self.output, set_aside_damaged=True)
        rows = self.log.read()
        self.seen: set[tuple[str, int]] = set()
        self.epochs_of: dict[str, set[int]] = {}  # seen by trial: a trial's recorded epochs without a scan of all
        for r in rows:
            self._saw(r["trial_id"], r["epoch"])
        self.trials, rebuilt = self._read_trials(rows)
        if self.log.damaged and self.recover_rows() and rebuilt:
            self.trials = _trials_from_rows(self.log.read(), self.metric, self.mode)  # with the recovered rows
        self.started = time.time()
        self.last_progress = self.started
        self.writers: dict[str, Any] = {}
        self.tracker = None  # made at the first row: a study that does not track never imports mlflow/wandb
        self.tracked: set[str] = set()  # trials whose tracker run this driver has caught up with the rows
        self.track_ended: set[str] = set()  # trials whose end this driver has told the tracker
        self.caught_up = False  # finished trials' rows recovered (once, at this driver's first step)
        self.unfinished_caught_up = False  # and unfinished trials' checkpointed but unreported epochs
        self.upload_failing = False  # a copy to mirror_to failed: warned once, retried with every later file
        self.synced: dict[str, tuple[int, int]] = {}  # what this driver copied to mirror_to, as storage.sync_up notes
        if rebuilt:
            # On disk at once: the next _load (Tune calls setup after unpickling this recorder) found the damaged
            # file set aside and none in its place, and the study went on without the trials before the restore.
            self._save_trials()

    def _read_trials(self, rows: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], bool]:
        """trials.json, and whether it was rebuilt: when damaged (set aside) or missing beside recorded rows, it is
        rebuilt from the rows (statuses follow from Tune's at the end)."""
        path = os.path.join(self.output, TRIALS_STATE)
        trials = read_trials_state(self.output)
        if trials and all("status" in t for t in trials.values()):
            return trials, False
        if trials == {} and not os.path.exists(path):
            if not rows:
                return {}, False  # a new study
            print(f"[ray_cifar] warning: {path} is missing; rebuilt from the results rows", flush=True)
            return _trials_from_rows(rows, self.metric, self.mode), True
        if trials == {}:
            return {}, False  # written before any trial reported
        os.replace(path, path + ".damaged")
        print(f"[ray_cifar] warning: {path} is damaged; set aside as {TRIALS_STATE}.damaged and rebuilt from "
              f"the results rows", flush=True)
        return _trials_from_rows(rows, self.metric, self.mode), True

    def recover_rows(self) -> int:
        """Rows of damaged parts, from each trial's newest loadable checkpoint (its history of epoch metrics): those
        of the epochs trials.json counts as recorded, which its summary (best epoch, checkpoints, ASHA's marks)
        already holds. An epoch after them was checkpointed but never reported: it comes as a result, the way the
        recorder and the scheduler take any (_recover_unfinished, the trial's own resume). Recovered here with the
        rest, it was a row the summary never had: the final table and trials.parquet named another best epoch than
        the rows (the test split evaluated another checkpoint), and ASHA stopped the trial at a rung the row passed.
        How many rows it recovered."""
        from ..checkpoint_store import newest_loadable_state

        recovered = []
        for trial_id, summary in self.trials.items():
            where = summary.get("latest_checkpoint") or summary.get("best_checkpoint")
            found = newest_loadable_state(posixpath.dirname(where.rstrip("/"))) if where else None
            params = searched_values(summary)
            for metrics in _history_of(found):
                if int(metrics["epoch"]) > (summary.get("epochs") or 0):
                    continue
                if (trial_id, int(metrics["epoch"])) not in self.seen:
                    self._saw(trial_id, int(metrics["epoch"]))
                    recovered.append(epoch_row(trial_id, params, metrics,
                                               {"time": metrics.get("ended_at") or time.time(), **self.provenance}))
        if recovered:
            self.log.append(recovered)
        print(f"[ray_cifar] recovered {len(recovered)} row(s) from checkpoints; the rows of epochs after a trial's "
              f"newest checkpoint come again when it resumes", flush=True)
        return len(recovered)

    def __getstate__(self):
        # Pickled into tuner.pkl: keep configuration only; the state is re-read from disk.
        return {k: v for k, v in self.__dict__.items() if k in
                ("output", "params", "metric", "mode", "provenance", "tensorboard", "progress_every",
                      "mirror_to", "tracking", "compact_every", "storage_path")}

    def __setstate__(self, state):
        # A tuner.pkl written by an older ray_cifar lacks newer settings: their defaults apply.
        self.__dict__.update({"tensorboard": True, "progress_every": PROGRESS_EVERY_SECONDS, "mirror_to": None,
                              "provenance": {}, "tracking": None, "compact_every": COMPACT_EVERY_PARTS,
                              "storage_path": None, **state})
        self._load()

    def setup(self, **info) -> None:
        self._load()  # a restored study starts from what the dead driver left on disk

    def _save_trials(self) -> None:
        path = os.path.join(self.output, TRIALS_STATE)
        tmp = f"{path}.tmp"
        try:
            with open(tmp, "w") as f:
                # dumps, not dump: json.dump streams through the pure-Python encoder, json.dumps runs the C one (a
                # 1,000-trial study: ~10 ms against ~3 ms, at every result the driver takes).
                f.write(json.dumps(self.trials))
            os.replace(tmp, path)  # the previous trials.json stays whole until the new one is
            self._upload(path)
        except OSError as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            if e.errno in storage.DISK_FULL:
                stop_for_full_disk(storage.disk_full_message(e, self.output))
                return
            raise

    def _upload(self, path: str | None) -> None:
        """Copy one file just written under OUTPUT to the remote --output (see _copy_up for a failure)."""
        if not self.mirror_to or path is None:
            return
        relative = os.path.relpath(path, self.output).replace(os.sep, "/")
        # Noted in self.synced: the minute's copy leaves it be.
        self._copy_up(relative, lambda: storage.upload(path, self.mirror_to, relative, self.synced))

    def _sync(self) -> None:
        """The minute's copy of OUTPUT to the remote --output: what changed since this driver's last copy (TensorBoard
        files, rows whose own copy failed)."""
        if self.mirror_to:
            self._copy_up(self.output, lambda: storage.sync_up(self.output, self.mirror_to, self.synced))

    def _copy_up(self, what: str, copy: Callable[[], None]) -> None:
        # A failure (the bucket unreachable) is one warning, not a failed study: every later copy retries it, and
        # the minute's copy of OUTPUT and the one at the end take what was missed.
        try:
            copy()
            self.upload_failing = False
        except (OSError, storage.StorageError) as e:
            if not self.upload_failing:
                print(f"[ray_cifar] warning: could not copy {what} to {self.mirror_to} ({str(e)[:300]}); "
                      f"retried with every later file and each minute", flush=True)
            self.upload_failing = True

    @contextlib.contextmanager
    def _full_disk_stops_study(self):
        try:
            yield
        except OSError as e:
            if e.errno not in storage.DISK_FULL and not any(t in str(e) for t in DISK_FULL_TEXT):
                raise
            stop_for_full_disk(storage.disk_full_message(e, self.output))

    # -- one trial -----------------------------------------------------------------------

    def _summary(self, trial) -> dict[str, Any]:
        summary = self.trials.setdefault(trial.trial_id, {"trial_id": trial.trial_id, "status": RUNNING})
        if "epochs" not in summary:  # first seen here (note_stopped may have made a bare entry)
            summary.update({**self.params(trial.config), "epochs": 0, "planned_epochs": None, "best_metric": None,
                            "best_epoch": None, "best_val_acc": None, "best_checkpoint": None,
                            "latest_checkpoint": None, "error": None, "startup_seconds": None})
            summary["status"] = summary.pop("status")  # keep the column order readable: status after params
        return summary

    def _saw(self, trial_id: str, epoch: int) -> None:
        self.seen.add((trial_id, epoch))
        self.epochs_of.setdefault(trial_id, set()).add(epoch)

    def _record(self, trial, metrics: dict[str, Any]) -> dict[str, Any] | None:
        """One epoch's metrics -> a row (None when this (trial, epoch) is already recorded)."""
        key = (trial.trial_id, int(metrics["epoch"]))
        if key in self.seen:
            return None
        self._saw(*key)
        summary = self._summary(trial)
        if summary["status"] == LOST:  # made again (a grid or random study's lost trial): it runs on
            summary.update(status=RUNNING, error=None)
        # The values the trial ran with: Tune puts the trial's config in each result; trial.config may
        # already hold the next values (PBT changes it on the result that leads to an exploit).
        row = epoch_row(trial.trial_id, self.params(metrics.get("config") or trial.config), metrics,
                        {"time": time.time(), **self.provenance})
        if row["epoch"] >= summary["epochs"]:  # the values it trained with last (PBT changes them on exploit)
            summary.update(self.params(metrics.get("config") or trial.config))
        summary["epochs"] = max(summary["epochs"], row["epoch"])
        summary["planned_epochs"] = metrics.get("epochs")
        if scored(metrics) and improves(metrics.get(self.metric), summary["best_metric"], self.mode):
            summary.update(best_metric=metrics[self.metric], best_epoch=row["epoch"],
                           best_val_acc=metrics.get("val_acc"), best_checkpoint=metrics.get("checkpoint_path"))
        if metrics.get("checkpoint_path"):
            summary["latest_checkpoint"] = metrics["checkpoint_path"]
        if metrics.get("startup_seconds") is not None and summary["startup_seconds"] is None:
            summary["startup_seconds"] = metrics["startup_seconds"]
        if metrics.get("diverged"):
            summary["status"] = DIVERGED
        if "pbt_generation" in metrics:  # PBT: a trial's generation is the number of exploits it made
            summary["exploits"] = max(summary.get("exploits") or 0, int(metrics["pbt_generation"]))
        self._tensorboard(trial.trial_id, row)
        return row

    def on_trial_result(self, iteration, trials, trial, result, **info):
        """A result from Tune (ITERATION: Tune's step; None for the rows this recorder recovers itself)."""
        self._take(trial, result, decided=iteration is not None)

    def record_now(self, trial, result: dict) -> None:
        """The result's row (and the history it carries) written now, by a scheduler as it decides on the result,
        with the decision's mark (JUDGED) in the same trials.json write; Tune's own call after it finds both there
        and writes nothing (no row twice, no second trials.json write or upload a result)."""
        self._take(trial, result, decided=True)

    def _take(self, trial, result: dict, decided: bool) -> None:
        """A result's rows and, where a scheduler DECIDED on it, its JUDGED mark; trials.json written if either is
        news."""
        if "epoch" not in result:
            return
        judged = decided and self._judged(trial, int(result["epoch"]))
        rows = []
        # After a resume the first report carries the checkpoint's history: rows of epochs the
        # trial finished (and checkpointed) whose reports died with the old driver.
        # The history is this run's own (a PBT generation starts its own), so the result's config and
        # lineage are theirs too.
        same_run = {k: result[k] for k in ("config", *LINEAGE_COLUMNS) if k in result}
        for old in result.get("history") or []:
            if old.get("epoch", result["epoch"]) < result["epoch"]:
                rows.append(self._record(trial, {**old, **same_run}))
        rows.append(self._record(trial, result))
        rows = [r for r in rows if r is not None]
        if rows:
            with self._full_disk_stops_study():
                self._upload(self.log.append(rows))  # the rows first: trials.json never names an epoch not there
                self._save_trials()
                if self.log.part_count() >= self.compact_every:
                    self._compact()
            self._track(trial, rows)
        elif judged:
            with self._full_disk_stops_study():
                self._save_trials()

    def _judged(self, trial, epoch: int) -> bool:
        """Note EPOCH as decided on by the scheduler (JUDGED); whether that is news."""
        summary = self._summary(trial)
        if epoch <= (summary.get(JUDGED) or 0):
            return False
        summary[JUDGED] = epoch
        return True

    def _compact(self) -> None:
        """Merge the parts into results.parquet (COMPACT_EVERY_PARTS). With a remote --output the merged file is
        copied up before the bucket's parts go: the bucket holds every row at each moment."""
        self._upload(self.log.compact())
        if self.mirror_to and not self.upload_failing:
            try:
                storage.prune(self.output, self.mirror_to, ResultsLog.PARTS)
            except OSError as e:  # left for the end of the study (its duplicates are dropped on read)
                print(f"[ray_cifar] warning: could not delete merged results parts at {self.mirror_to} "
                      f"({str(e)[:300]})", flush=True)

    def note_stopped(self, trial_id: str) -> None:
        """Called by the scheduler when it decides to stop a trial."""
        # Tune asks the scheduler before it passes the same result to callbacks, so the
        # trial's summary may not exist yet.
        summary = self.trials.setdefault(trial_id, {"trial_id": trial_id, "status": RUNNING})
        if summary["status"] == RUNNING:
            summary["status"] = STOPPED
            self._save_trials()

    def on_trial_start(self, iteration, trials, trial, **info):
        recorded = (self.trials.get(trial.trial_id) or {}).get("epochs") or 0  # a trial resumed after a stop
        print(trial_started_line(trial.trial_id, self.params(trial.config), recorded), flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        summary = self._summary(trial)
        if summary["status"] in (RUNNING, FAILED):
            # Short of the epochs it planned: its scheduler's budget ended it (tune.max_epochs below train.epochs;
            # BOHB's HyperBand at max_t, a max_steps trial of a large batch at 2 of its 15 epochs), though no
            # scheduler calls that a stop. Recorded `completed`, it read as a trial that ran its whole length.
            planned = summary.get("planned_epochs")
            short = bool(planned) and (summary.get("epochs") or 0) < planned
            summary.update(status=STOPPED if short else COMPLETED, error=None)
        self._close_writer(trial.trial_id)
        self._save_trials()
        self._track_end(trial)
        self._drop_spare_checkpoint(trial, summary)
        print(trial_ended_line(summary, self.metric), flush=True)

    def _drop_spare_checkpoint(self, trial, summary: dict[str, Any]) -> None:
        """A one-rank trial that ended keeps its latest and best checkpoints only (CheckpointStore.ended): the spare
        one before the latest was a third of such a study's disk, a model and its optimizer state a trial, that
        nothing reads once the trial has ended. (A DDP trial's Ray Train keeps only those two; PBT's members keep
        their generations as ray_cifar.tuning.lineage says.)"""
        from ..checkpoint_store import CheckpointStore
        from .trial import trainer_name

        if not self.storage_path or not ended_by_itself(trial):
            return
        try:
            CheckpointStore(storage.join(self.storage_path, trainer_name(trial.trial_id))).ended(
                summary.get("best_checkpoint"))
        except OSError as e:  # a bucket's hiccup: the spare stays, and nothing else is the worse for it
            print(f"[ray_cifar] warning: trial {trial.trial_id}: its spare checkpoint not deleted ({e})", flush=True)

    def _recover_finished(self, trials) -> None:
        """Rows of trials that finished before this driver started but never reached OUTPUT: a driver killed
        between a trial's last report and its row, or a head lost with its disk before the rows were copied to
        the remote --output. Tune never runs a finished trial again, so nothing else would bring them: its last
        result (in Tune's state) is the last row, and its newest checkpoint's history holds the epochs before."""
        from ..checkpoint_store import newest_loadable_state

        if self.caught_up:
            return
        self.caught_up = True
        for trial in trials:
            last = getattr(trial, "last_result", None) or {}
            if str(trial.status) not in ("TERMINATED", "ERROR") or "epoch" not in last:
                continue
            recorded = max(self.epochs_of.get(trial.trial_id, ()), default=0)
            if recorded >= int(last["epoch"]):
                continue
            history = []
            if recorded < int(last["epoch"]) - 1 and last.get("checkpoint_path"):
                history = _history_of(newest_loadable_state(posixpath.dirname(last["checkpoint_path"].rstrip("/"))))
            first, end = recorded + 1, int(last["epoch"])
            epochs = f"epochs {first}-{end}" if first < end else f"epoch {end}"
            print(f"[ray_cifar] trial {trial.trial_id} finished with {epochs} unrecorded: recovered from its last "
                  f"result{' and checkpoint' if history else ''}", flush=True)
            self.on_trial_result(None, trials, trial, {**last, "history": history})

    def _recover_unfinished(self, trials) -> None:
        """Rows of epochs a restored, unfinished trial finished and checkpointed whose reports died with the
        old driver (killed between a trial's checkpoint and its report), from its newest checkpoint's history.
        At this driver's first step, before its scheduler's first decision: BOHB's HyperBand, which rebuilds its
        brackets from the rows then, would otherwise take such a trial for one short of its milestone, let it
        resume, and judge it on its next epoch against the others' milestone epoch (and stop it past its
        milestone); ASHA, which rebuilds its rungs then too, would judge it at that rung on its next epoch's score.
        The trial's own next report would carry the same history (it resumes from the same newest loadable
        checkpoint); `seen` keeps each row once."""
        from ..checkpoint_store import CheckpointStore
        from .trial import trainer_name

        if self.unfinished_caught_up or not self.storage_path:
            return
        self.unfinished_caught_up = True
        for trial in trials:
            if str(trial.status) not in ("PENDING", "PAUSED"):
                continue
            # The store a one-rank trial resumes from. Its folder names give the epochs: a state is read (a whole
            # model, from a bucket too) only where the newest checkpointed epoch has no row.
            store = CheckpointStore(storage.join(self.storage_path, trainer_name(trial.trial_id)))
            recorded = max(self.epochs_of.get(trial.trial_id, ()), default=0)
            if max(store.epochs(), default=0) <= recorded:
                continue
            state = store.latest(warn=lambda message: None)  # a damaged one is the trial's to report, when it resumes
            history = [h for h in (state.get("history") or []) if "epoch" in h] if state else []
            if not history or all((trial.trial_id, int(h["epoch"])) in self.seen for h in history):
                continue
            print(f"[ray_cifar] trial {trial.trial_id}: epoch(s) up to {int(history[-1]['epoch'])} checkpointed but "
                  f"unrecorded: recovered from its checkpoint", flush=True)
            self.on_trial_result(None, trials, trial, {**history[-1], "checkpoint_path": state["loaded_from"],
                                                       "history": history[:-1]})

    def on_step_begin(self, iteration, trials, **info):
        self._recover_unfinished(trials)

    def on_experiment_end(self, trials, **info):
        self._recover_finished(trials)  # a study whose every trial had finished runs no step
        # A summary rebuilt from rows (trials.json was damaged) learns here how Tune ended its trial. TERMINATED alone
        # is not "finished": a Ctrl-C, SIGTERM or full disk stops every running trial as TERMINATED too, and such a
        # trial stays `running` (its --resume goes on with it). Tune marks the last result of a trial that ended
        # (returned, or stopped by its scheduler) done.
        changed = False
        for t in trials:
            summary = self.trials.get(t.trial_id)
            if summary is None or summary["status"] != RUNNING:
                continue
            if str(t.status) == "ERROR" or (str(t.status) == "TERMINATED" and ended_by_itself(t)):
                summary["status"] = COMPLETED if str(t.status) == "TERMINATED" else FAILED
                planned = (t.last_result or {}).get("epochs")
                if summary["status"] == COMPLETED and planned and (summary.get("epochs") or 0) < planned:
                    summary["status"] = STOPPED  # ended short of its epochs: its scheduler stopped it
                changed = True
        changed = self._mark_lost(trials) or changed
        if changed:
            self._save_trials()
        self._catch_up_tracker(trials)
        for trial_id in list(self.writers):  # trials stopped unfinished (Ctrl-C, SIGTERM, a full disk)
            self._close_writer(trial_id)
        if self.tracker is not None:
            self._tracker_call("close", self.tracker.close)

    def _mark_lost(self, trials) -> bool:
        """Trials recorded `running` that Tune does not know (LOST): without this, a finished study's table held
        one `running` for ever. Whether any was marked."""
        known = {t.trial_id for t in trials}
        lost = [tid for tid, summary in self.trials.items() if summary["status"] == RUNNING and tid not in known]
        for trial_id in lost:
            summary = self.trials[trial_id]
            summary.update(status=LOST, error=LOST_ERROR)
            print(f"[ray_cifar] trial {trial_id} ({summary.get('epochs') or 0} epoch(s) recorded): {LOST_ERROR}",
                  flush=True)
            self._end_tracker_run(trial_id, searched_values(summary), LOST)
        return bool(lost)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._stop_if_disk_full(trial, error_line(trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        error = error_line(trial)
        if self._stop_if_disk_full(trial, error):
            return  # not failed: resumed like any unfinished trial once space is freed
        self._summary(trial).update(status=FAILED, error=error)
        self._close_writer(trial.trial_id)
        self._save_trials()
        self._track_end(trial)

    # -- the experiment tracker (tune.tracking) ---------------------------------------------

    @property
    def tracks(self) -> bool:
        """Whether this study feeds an experiment tracker (tune.tracking other than none)."""
        return bool(self.tracking) and self.tracking["tracking"] != "none"

    def _tracker_call(self, what: str, call, *args) -> bool:
        """A tracker that fails (a server down) never stops the study: the rows are in results.parquet, and
        the trial's run catches up with them at its next row or --resume."""
        try:
            if self.tracker is None:
                from .tracking import create_tracker

                self.tracker = create_tracker(output=self.output, **self.tracking)
            if call is not None:
                call(*args)
            return True
        except Exception as e:  # noqa: BLE001
            print(f"[ray_cifar] tracking ({self.tracking['tracking']}) {what} failed: {type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}; the rows are safe in results.parquet", flush=True)
            return False

    def _track(self, trial, rows: list[dict[str, Any]]) -> None:
        if not self.tracks or not self._tracker_call("setup", None):
            return
        trial_id = trial.trial_id
        if trial_id not in self.tracked and self.epochs_of.get(trial_id, set()) != {r["epoch"] for r in rows}:
            # First row in this driver's life (a restored study, a tracker that failed before) and the trial has
            # rows recorded before these: every recorded row of the trial; the tracker skips the steps its run
            # already holds. (Read only then: a read of every row at each new trial's first row cost a study of
            # 30,000 rows 0.4 s a trial.)
            rows = [r for r in self.log.read() if r["trial_id"] == trial_id]
        ok = self._tracker_call("log", self.tracker.log_epochs, trial_id, self.params(trial.config), rows)
        if ok:
            self.tracked.add(trial_id)
        else:
            self.tracked.discard(trial_id)  # the next row sends the trial's recorded rows again

    def _track_end(self, trial) -> None:
        self._end_tracker_run(trial.trial_id, self.params(trial.config), self._summary(trial)["status"])

    def _end_tracker_run(self, trial_id: str, params: dict[str, Any], status: str) -> None:
        if not self.tracks or not self._tracker_call("setup", None):
            return
        self._tracker_call("end of trial", self.tracker.end_trial, trial_id, params, status)
        self.tracked.discard(trial_id)
        self.track_ended.add(trial_id)

    def _catch_up_tracker(self, trials) -> None:
        """Trials that ended before this driver's life: a driver killed between a trial's last row in Parquet and
        its tracker call (or before W&B flushed) lost those steps, and Tune never runs a finished trial again, so
        no later row would bring them. Each gets its recorded rows (the tracker skips the steps it holds) and its end."""
        if not self.tracks:
            return
        recorded: dict[str, list[dict[str, Any]]] = {}
        for r in self.log.read():  # once, not once a trial
            recorded.setdefault(r["trial_id"], []).append(r)
        for trial in trials:
            if (trial.trial_id in recorded and trial.trial_id not in self.track_ended
                    and self._summary(trial)["status"] != RUNNING):
                self.tracked.discard(trial.trial_id)
                self._track(trial, recorded[trial.trial_id])
                self._track_end(trial)

    def _stop_if_disk_full(self, trial, error: str) -> bool:
        if not any(text in error for text in DISK_FULL_TEXT):
            return False
        stop_for_full_disk(f"the disk is full: trial {trial.trial_id} could not write its checkpoint ({error[:300]})")
        return True

    # -- progress and TensorBoard ----------------------------------------------------------

    def on_step_end(self, iteration, trials, **info):
        self._recover_finished(trials)
        now = time.time()
        if now - self.last_progress >= self.progress_every:
            self.last_progress = now
            print(progress_line(trials, self.trials, now - self.started, getattr(self, "total_trials", None),
                                self.metric, self.mode), flush=True)
            self._sync()

    def _tensorboard(self, trial_id: str, row: dict[str, Any]) -> None:
        if not self.tensorboard:
            return
        try:
            if trial_id not in self.writers:
                from tensorboardX import SummaryWriter

                self.writers[trial_id] = SummaryWriter(os.path.join(self.output, "tensorboard", trial_id))
            writer = self.writers[trial_id]
            for key, value in row.items():
                # Not a diverged trial's NaN loss: tensorboardX printed "NaN or Inf found in input tensor." for it,
                # an unlabelled console line (the row keeps the value).
                if (isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("epoch", "time")
                        and math.isfinite(value)):
                    writer.add_scalar(key, value, global_step=row["epoch"])
            writer.flush()
        except OSError as e:  # TensorBoard's files are a view of the rows: only a full disk stops the study
            self._close_writer(trial_id)
            if e.errno in storage.DISK_FULL:
                stop_for_full_disk(storage.disk_full_message(e, self.output))

    def _close_writer(self, trial_id: str) -> None:
        writer = self.writers.pop(trial_id, None)
        if writer is None:
            return
        event_writers = [w.event_writer for w in (writer.all_writers or {}).values()]
        try:
            writer.close()
        except OSError:
            # A full disk: the event file loses its last scalars (the rows hold them). Marked closed, else
            # tensorboardX's exit hook flushes again and prints the same error as a traceback at exit.
            for events in event_writers:
                with contextlib.suppress(Exception):
                    events._worker.stop()
                events._closed = True


def searched_values(entry: dict[str, Any]) -> dict[str, Any]:
    """A trial summary's or row's values of the config ("section.field" keys: the searched ones and the seed)."""
    return {k: v for k, v in entry.items() if "." in k}


def _history_of(found: tuple[str, dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The epochs a checkpoint (checkpoint_store.newest_loadable_state's (folder, state)) has seen, its own epoch's
    entry with its folder as checkpoint_path, as that epoch's row has it."""
    if not found:
        return []
    history = [dict(h) for h in found[1].get("history") or []]
    if history and history[-1].get("epoch") == found[1].get("epoch"):
        history[-1]["checkpoint_path"] = found[0]
    return history


def _trials_from_rows(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, dict[str, Any]]:
    """Trial summaries as _summary/_record build them, from epoch rows alone (status: running until Tune says)."""
    from ..results import best_epoch

    by_trial: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_trial.setdefault(r["trial_id"], []).append(r)
    trials = {}
    for trial_id, trial_rows in by_trial.items():
        trial_rows.sort(key=lambda r: r["epoch"])
        best = best_epoch(trial_rows, metric, mode) or {}
        trials[trial_id] = {
            "trial_id": trial_id, **searched_values(trial_rows[-1]),
            "epochs": trial_rows[-1]["epoch"], "planned_epochs": None, "best_metric": best.get(metric),
            "best_epoch": best.get("epoch"), "best_val_acc": best.get("val_acc"),
            "best_checkpoint": best.get("checkpoint_path"), "latest_checkpoint": trial_rows[-1].get("checkpoint_path"),
            "error": None, "startup_seconds": trial_rows[0].get("startup_seconds"),
            "status": DIVERGED if any(r.get("diverged") for r in trial_rows) else RUNNING}
    return trials


def progress_line(trials: list, summaries: dict[str, dict[str, Any]], elapsed: float,
                  total_trials: int | None = None, metric: str | None = None, mode: str = "max") -> str:
    """trials done / running / pending, epochs done, elapsed, a rough time left, and (with `metric`) the best
    trial so far by its best epoch, as the study ranks trials.

    Tune creates trials lazily, a few at a time: with the study's `total_trials` the ones it has not
    created yet count as pending too (else the time left is far too short early in a study)."""
    status = [str(getattr(t, "status", "")) for t in trials]
    done = sum(s in ("TERMINATED", "ERROR") for s in status)
    running = sum(s == "RUNNING" for s in status)
    pending = sum(s in ("PENDING", "PAUSED") for s in status) + max(0, (total_trials or 0) - len(trials))
    epochs_done = sum(s["epochs"] for s in summaries.values())
    planned = sum((s["planned_epochs"] or s["epochs"]) if s["status"] == RUNNING else s["epochs"]
                  for s in summaries.values())
    per_epoch = elapsed / epochs_done if epochs_done else None
    # Upper bound: a pending trial, and a running one that has reported no epoch yet (no summary: "~0.0 min left"
    # was printed while it had its whole run ahead), runs as long as the longest any trial plans (a mean of the
    # epochs run, where ASHA had stopped trials early, was far below it).
    longest = max((s["planned_epochs"] or s["epochs"] or 0 for s in summaries.values()), default=0)
    unreported = sum(s == "RUNNING" and getattr(t, "trial_id", None) not in summaries for t, s in zip(trials, status))
    left_epochs = max(planned - epochs_done, 0) + (pending + unreported) * longest
    eta = f"~{left_epochs * per_epoch / 60:.1f} min left at most" if per_epoch else "time left unknown yet"
    best = rank_trials(list(summaries.values()), metric, mode)[:1] if metric else []  # as the final table ranks
    value = trial_value(best[0], metric) if best else None  # (None: no trial scored yet, or only a diverged NaN)
    so_far = "" if value is None else f"; best so far {best[0]['trial_id']}: {metric} {value:.4f} at epoch " \
                                      f"{best[0]['best_epoch']}"
    return (f"[ray_cifar] progress: {done} trial(s) done, {running} running, {pending} pending; "
            f"{epochs_done} epoch(s) done; {elapsed / 60:.1f} min elapsed; {eta}{so_far}")
