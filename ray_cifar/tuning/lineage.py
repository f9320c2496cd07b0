"""What ray_cifar's PBT and PB2 schedulers add to Ray's (ray_cifar.tuning.pbt says what and why): the mixin
`Lineage`, shared by RestorablePBT (.pbt) and RestorablePB2 (.pb2), and `clip`."""

from __future__ import annotations

import posixpath
import random
from typing import Any, Callable

from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from .. import storage
from ..checkpoint_store import keep_only, remove_state_at
from ..config import LINEAGE
from ..results import ResultsLog, best_epoch
from .scheduler import save_experiment, trial_added

SEED = "train.seed"


def clip(config: dict[str, Any], limits: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """The explored config with every ranged value inside [low, high] (integers stay integers)."""
    for key, (low, high) in limits.items():
        if key in config:
            value = min(max(config[key], low), high)
            config[key] = int(round(value)) if isinstance(config[key], int) else value
    return config


class Lineage:
    """What ray_cifar's PBT and PB2 add to Ray's (ray_cifar.tuning.pbt's docstring): mix in before the Ray class."""

    def _setup(self, output: str, limits: dict[str, tuple[float, float]], storage_path: str | None,
               all_at_once: bool, record: Callable[[Trial, dict], None] | None = None) -> None:
        """RECORD(trial, result): the study's recorder writing the result's row now (StudyRecorder.record_now)."""
        self.output, self.limits, self.storage_path, self.all_at_once = output, limits, storage_path, all_at_once
        self.record = record
        self._rebuilt, self._data_pending = False, False
        self._recorded: dict[str, dict[str, Any]] = {}
        self._rows: dict[str, list[dict[str, Any]]] = {}
        self._best: dict[str, dict[str, Any] | None] = {}  # each member's best row so far (all generations)
        self._dropped: dict[tuple[str, int], str] = {}  # (member, old generation): the checkpoint kept, "" none
        self._drop_failed = False
        self._waits: dict[Trial, int] = {}  # members waiting for a donor to reach their epoch (`_waiting`)

    # -- restore ------------------------------------------------------------------------------

    def _read_rows(self) -> None:
        """Each trial's recorded rows with a score, by epoch, and its latest one."""
        self._rows = {}
        for row in sorted(ResultsLog(self.output).read(), key=lambda r: r["epoch"]):
            if row.get(self._metric) is not None:
                self._rows.setdefault(row["trial_id"], []).append(row)
        self._recorded = {tid: rows[-1] for tid, rows in self._rows.items()}
        self._best = {tid: best_epoch(rows, self._metric, self._mode) for tid, rows in self._rows.items()}

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if not self._rebuilt:
            self._rebuilt = True
            self._read_rows()
        row = self._recorded.get(trial.trial_id)
        if row is not None:  # a restored study: the trial's last recorded epoch is its last result
            state = self._trial_state[trial]
            state.last_score = self._metric_op * row[self._metric]
            state.last_train_time = row["epoch"]
            state.last_perturbation_time = row["epoch"] // self._perturbation_interval * self._perturbation_interval
            state.last_result = {self._metric: row[self._metric], self._time_attr: row["epoch"]}
        trial_added(tune_controller, trial)

    def __getstate__(self):
        state = dict(self.__dict__)
        # A restored copy rebuilds from the rows (and looks at every old generation once more).
        state.update(_rebuilt=False, _rows={}, _recorded={}, _data_pending=False, _best={}, _dropped={})
        # A member that waited for a donor comes back paused or pending and simply runs on: its decision is lost.
        state.update(_waits={})
        return state

    # -- decisions ------------------------------------------------------------------------------

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        # The row on disk before the decision: an exploit saves Tune's state at once (the member's new generation),
        # and Tune hands the result to the recorder only after this returns. A driver killed in between resumed
        # the member as its new generation and its last epoch's row was lost for good (the generation's own
        # checkpoints hold no history of the one before; seen in a killed PBT test).
        if getattr(self, "record", None) is not None:  # (a scheduler pickled before it had one: none)
            self.record(trial, result)
        self._drop_old_generations(trial.trial_id, result)
        if result.get(self._metric) is not None and trial in self._trial_state:
            # Every member's latest score, not the one at its last decision epoch (Ray's): a member at its
            # decision epoch compares with the population as it is now.
            self._trial_state[trial].last_score = self._metric_op * result[self._metric]
        if result.get("epochs") is not None and result.get(self._time_attr, 0) >= result["epochs"]:
            decision = TrialScheduler.CONTINUE  # its last epoch: an exploit would restart a finished trial
        else:
            decision = super().on_trial_result(tune_controller, trial, result)
        # After Ray's decision on this result: the donor's state (epoch, decision epoch) is the one an exploit takes.
        self._judge_waiting(tune_controller, reporter=trial, result=result)
        if trial in self._waiting():
            return TrialScheduler.PAUSE  # even when every member runs at once: it trains nothing until judged
        if decision == TrialScheduler.PAUSE and self.all_at_once:
            # Ray pauses members while others wait, to share a cluster too small for the population; when
            # every member runs at once the only one waiting is an exploiting member restarting: no reason
            # to stop (and restart) the others.
            return TrialScheduler.CONTINUE
        return decision

    # -- disk -------------------------------------------------------------------------------------

    def _drop_old_generations(self, trial_id: str, result: dict) -> None:
        """Once a member's generation n has reported (so it has a checkpoint of its own: a trial saves before it
        reports), its generations before n are needed for one thing only: the checkpoint of the member's best
        epoch, which the test split may evaluate (the best row by tune.metric over all generations, as the study
        ranks it). The others' run folders go whole; the one holding the best keeps that checkpoint alone, until
        a later generation does better. No other member reads them: a donor copy is taken from the donor's
        current generation. A ResNet-18 state with momentum is ~90 MB, and without this every exploit left up to
        three behind. A failed delete is one warning line; the study goes on."""
        generation = int(result.get("pbt_generation") or 0)
        # A resumed run's first report carries the epochs its checkpoint has seen: rows of this generation too.
        rows = [{**r, "pbt_generation": generation} for r in result.get("history") or []]
        best = best_epoch([r for r in (self._best.get(trial_id), *rows, result) if r], self._metric, self._mode)
        self._best[trial_id] = best
        if self.storage_path is None or not generation or not result.get("checkpoint_path"):
            return
        from .trial import trainer_name

        best_generation = int(best.get("pbt_generation") or 0) if best else None
        for k in range(generation):
            keep = ""
            if k == best_generation:
                if not best.get("checkpoint_path"):
                    continue  # which of its checkpoints is the best is unknown: all stay
                keep = posixpath.basename(best["checkpoint_path"].rstrip("/"))
            if self._dropped.get((trial_id, k)) in ("", keep):  # gone already, or already down to `keep`
                continue
            location = storage.join(self.storage_path, trainer_name(trial_id, k))
            try:
                keep_only(location, keep or None)
                remove_state_at(location + ".donor")  # left by a generation that never saved (it always does)
            except OSError as e:
                if not self._drop_failed:
                    self._drop_failed = True
                    print(f"[ray_cifar] warning: {self.label}: could not delete {location} (an earlier generation "
                          f"of trial {trial_id}): {e}; old generations stay on disk", flush=True)
                continue
            self._dropped[(trial_id, k)] = keep

    def _checkpoint_or_exploit(self, trial: Trial, tune_controller, upper_quantile: list, lower_quantile: list) -> None:
        # No Tune checkpoint to schedule: every trial checkpoints every epoch in its own run folder.
        if trial not in lower_quantile:
            return
        epoch = self._trial_state[trial].last_train_time
        if self._exploit_a_donor(tune_controller, trial, epoch, upper_quantile):
            return
        # Ray has used up the trial's interval already: without a donor now, the decision would be lost for good.
        # Members that train side by side report an epoch in turn, so the weak one is often first to reach it:
        # it waits (paused) for a donor to come, and is judged again then (`_judge_waiting`).
        coming = self._donors_to_come(trial, epoch, upper_quantile)
        if coming:
            self._waiting()[trial] = epoch
            behind = ", ".join(f"{t.trial_id} is at epoch {self._last(t).get(self._time_attr, 0)}" for t in coming)
            print(f"[ray_cifar] {self.label}: trial {trial.trial_id} waits at epoch {epoch} for a donor to reach it "
                  f"({behind})", flush=True)

    def _exploit_a_donor(self, tune_controller, trial: Trial, epoch: int, upper_quantile: list,
                         now: dict[Trial, dict] | None = None) -> bool:
        """The trial copies a donor of the upper quantile that can give at EPOCH, if one can (True)."""
        donors = [t for t in upper_quantile if t is not trial and self._can_give(t, epoch, self._last(t, now))]
        random.shuffle(donors)
        for donor in donors:
            if self._copy_donor(trial, donor):
                self._exploit(tune_controller, trial, donor)
                return True
        return False

    def _can_give(self, donor: Trial, epoch: int, last: dict | None = None) -> bool:
        """A donor has reached the trial's epoch and has epochs left (copying a finished state trains nothing).
        LAST: the donor's latest result, when newer than `donor.last_result` (Tune sets that after the decision)."""
        last = (donor.last_result or {}) if last is None else last
        return last.get(self._time_attr, 0) >= epoch and last.get(self._time_attr, 0) < (last.get("epochs") or 1e9)

    # -- waiting for a donor ------------------------------------------------------------------------

    def _waiting(self) -> dict[Trial, int]:
        """The members waiting for a donor, each with the epoch it waits at (a scheduler pickled before members
        waited has none)."""
        if getattr(self, "_waits", None) is None:
            self._waits = {}
        return self._waits

    @staticmethod
    def _last(trial: Trial, now: dict[Trial, dict] | None = None) -> dict:
        """The trial's latest result: NOW's for the trial reporting it (Tune records it only after the decision)."""
        return (now or {}).get(trial) or trial.last_result or {}

    def _donors_to_come(self, trial: Trial, epoch: int, upper_quantile: list, now: dict[Trial, dict] | None = None,
                        gone: Trial | None = None) -> list[Trial]:
        """The members of the upper quantile that may still give at EPOCH: behind it, with epochs after it, and
        neither ended (GONE: ending now) nor waiting themselves (two members waiting on each other never run)."""
        out = []
        for t in upper_quantile:
            if t is trial or t is gone or t.is_finished() or t in self._waiting():
                continue
            last = self._last(t, now)
            if last.get(self._time_attr, 0) < epoch < (last.get("epochs") or 1e9):
                out.append(t)
        return out

    def _judge_waiting(self, tune_controller, reporter: Trial | None = None, result: dict | None = None,
                       gone: Trial | None = None) -> None:
        """Each waiting member once a member reaches its epoch (REPORTER's RESULT), or once no donor can come
        (GONE completed, failed or was removed): with the quantiles as they are now, it copies a donor that can
        give, or waits on while one may still come and it is in the lower quantile, or else goes on from its own
        checkpoint (Tune runs it again: `choose_trial_to_run`)."""
        waiting = self._waiting()
        if not waiting:
            return
        now = {reporter: result} if reporter is not None else {}
        lower, upper = self._quantiles()
        upper = [t for t in upper if t is not gone]
        for member, epoch in list(waiting.items()):
            if member is reporter or member is gone or member not in self._trial_state:
                continue
            reached = result is None or result.get(self._time_attr, 0) >= epoch
            coming = self._donors_to_come(member, epoch, upper, now, gone)
            if not reached and coming:
                continue  # judged when a member reaches its epoch, with the scores of then
            if member in lower and self._exploit_a_donor(tune_controller, member, epoch, upper, now):
                del waiting[member]
            elif member not in lower or not coming:
                del waiting[member]
                why = "no longer in the lower quantile" if member not in lower else "no donor can reach its epoch"
                print(f"[ray_cifar] {self.label}: trial {member.trial_id} goes on from epoch {epoch} without a donor "
                      f"({why})", flush=True)

    def choose_trial_to_run(self, tune_controller, *args, **kwargs):
        waiting = self._waiting()
        if not waiting:
            return super().choose_trial_to_run(tune_controller, *args, **kwargs)
        # Ray's choice (asynchronous: the paused or pending member furthest behind), a waiting member left out.
        candidates = [t for t in tune_controller.get_trials()
                      if t.status in (Trial.PENDING, Trial.PAUSED) and t not in waiting]
        return min(candidates, key=lambda t: self._trial_state[t].last_train_time, default=None)

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self._ended(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        super().on_trial_error(tune_controller, trial)
        self._ended(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        super().on_trial_remove(tune_controller, trial)
        self._ended(tune_controller, trial)

    def _ended(self, tune_controller, trial: Trial) -> None:
        # A member waiting on this one may have no donor left: no member waits forever.
        self._waiting().pop(trial, None)
        self._judge_waiting(tune_controller, gone=trial)

    def _copy_donor(self, trial: Trial, donor: Trial) -> bool:
        """The donor's latest checkpoint, copied now for the trial's next generation: the donor keeps training
        and deleting older epochs, and its state when the trial restarts may be its last (nothing to train).
        In the driver, synchronously: 0.9 s for a ResNet-18 state with Lookahead (128 MiB: read, verified,
        written) on a loaded 2-core machine. The generation's first checkpoint of its own deletes the copy."""
        if self.storage_path is None:  # unit tests of the decisions alone
            return True
        from .trial import copy_donor_state

        # The donor's results reach the driver late: on disk it may be epochs on, even at its end.
        return copy_donor_state(self.storage_path, trial.trial_id, self._lineage(trial, donor),
                                epochs=(donor.last_result or {}).get("epochs"))

    @staticmethod
    def _lineage(trial: Trial, donor: Trial) -> dict[str, Any]:
        return {"generation": int((trial.config.get(LINEAGE) or {}).get("generation", 0)) + 1,
                "parent": donor.trial_id,
                "parent_generation": int((donor.config.get(LINEAGE) or {}).get("generation", 0))}

    def _exploit(self, tune_controller, trial: Trial, trial_to_clone: Trial) -> None:
        state, donor_state = self._trial_state[trial], self._trial_state[trial_to_clone]
        new_config, _ = self._get_new_config(trial, trial_to_clone)
        new_config = clip(new_config, self.limits)
        if SEED in trial.config:
            new_config[SEED] = trial.config[SEED]
        new_config[LINEAGE] = self._lineage(trial, trial_to_clone)
        generation = new_config[LINEAGE]["generation"]
        changes = ", ".join(f"{k} {trial_to_clone.config.get(k)!r} -> {new_config.get(k)!r}"
                            for k in self._hyperparam_mutations)
        print(f"[ray_cifar] {self.label}: trial {trial.trial_id} ({self._metric} "
              f"{self._metric_op * state.last_score:.4f} at epoch {state.last_train_time}) copies "
              f"{trial_to_clone.trial_id} ({self._metric_op * donor_state.last_score:.4f}); generation {generation}: "
              f"{changes}", flush=True)
        tune_controller.pause_trial(trial, should_checkpoint=False)
        trial.set_config(new_config)
        self._num_perturbations += 1
        state.last_perturbation_time = donor_state.last_perturbation_time
        state.last_train_time = donor_state.last_train_time
        save_experiment(tune_controller, trial)  # the lineage on disk now: a driver that dies next resumes it
