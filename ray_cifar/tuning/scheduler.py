"""ASHA that survives a driver restart and tells the recorder which trials it stopped.

Ray's `Tuner.restore` rebuilds the scheduler from tuner.pkl, written when the study
started, so its rungs come back empty and a resumed study would keep trials that the
uninterrupted one stops. `RestorableASHA` refills the rungs from the study's recorded
rows (ray_cifar.results) the first time it sees a trial, replaying the rows in the order
they arrived, so the resumed study makes the same decisions.

The knobs (tune.*): rungs at grace_period * reduction_factor^k below max_t, in epochs or,
with time_attr "steps", optimizer steps; at each rung a trial goes on only if it is in the
best 1/reduction_factor of the trials that reached that rung so far. With brackets > 1,
bracket b's first rung is grace_period * reduction_factor^b, and each trial joins one bracket
(chosen from its trial id, so a restored study puts it in the same one).
"""

from __future__ import annotations

import functools
import os
import zlib
from typing import Any, Callable

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandForBOHB, TrialScheduler

from ..milestones import first_milestone  # also the name a tuner.pkl saved before it moved there unpickles
from ..results import TRIALS_STATE, ResultsLog, read_trials_state
from .recorder import JUDGED, STOPPED
from .searchers import base_searcher, creation_order, follow_restored_trial


def save_experiment(tune_controller, trial=None) -> None:
    """Write Tune's experiment state (trials, their configs, the searcher's state) now, not at its next period.

    Called when a trial is added and when PBT changes a trial's config: a driver that dies before Tune's
    periodic save would otherwise resume without that trial (a searcher then suggests it again, and its
    recorded rows belong to a trial Tune no longer knows) or with the trial's old config."""
    controller = getattr(tune_controller, "_tune_controller", tune_controller)  # Tune hands schedulers a wrapper
    save = getattr(controller, "checkpoint", None)
    if not callable(save):
        return
    if trial is not None and hasattr(controller, "_mark_trial_to_checkpoint"):
        # Tune marks a new trial for its state file only after the scheduler's on_trial_add: mark it now, or
        # the searcher's state (which counted it) is saved without it.
        controller._mark_trial_to_checkpoint(trial)
    save(force=True, wait=True)


def trial_added(tune_controller, trial) -> None:
    """What every ray_cifar scheduler does as Tune adds a trial (a new one, or one a restore brings back): the
    search algorithm made to agree with Tune's trials (searchers.follow_restored_trial), then saved with them."""
    follow_restored_trial(tune_controller, trial)
    save_experiment(tune_controller, trial)


class SavingFIFO(FIFOScheduler):
    """FIFOScheduler that saves the experiment whenever a trial is added (see save_experiment)."""

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        trial_added(tune_controller, trial)


def recorded_trials(output: str) -> dict[str, dict[str, Any]]:
    """trials.json (the recorder's summaries; {} before the first, and where it will not read: the recorder, which
    reads it first, sets a damaged one aside and rebuilds it)."""
    return read_trials_state(output) or {}


def recorded_stops(output: str) -> set[str]:
    """Trials the scheduler stopped before a restore. A driver that dies between the decision and the
    trial's end leaves them unfinished, and Tune resumes them: they are stopped again at once."""
    return {tid for tid, summary in recorded_trials(output).items() if summary.get("status") == STOPPED}


class _Recorded:
    """A stand-in for a Tune Trial: the rungs only key on trial_id."""

    def __init__(self, trial_id: str):
        self.trial_id = trial_id


class RestorableASHA(ASHAScheduler):
    """ASHAScheduler plus rungs rebuilt from `output`'s rows, and a bracket per trial from its id.

    Args:
        output: the study's output folder, whose recorded rows rebuild the rungs after a restore.
        on_stop: called with a trial id whenever this scheduler stops that trial.
        time_attr: "epoch" or "steps" (optimizer steps so far, reported every epoch): the unit of
            max_t and grace_period.
        max_t, grace_period: in time_attr units; reduction_factor: keep the best 1/reduction_factor per
            rung; brackets: how many (bracket b starts at grace_period * reduction_factor^b).
    """

    def __init__(self, output: str, on_stop: Callable[[str], None] | None = None, time_attr: str = "epoch",
                 **asha_args: Any):
        super().__init__(time_attr=time_attr, **asha_args)
        self.output, self.on_stop = output, on_stop
        self._rebuilt = self._stops_read = False
        self._stopped_before: set[str] = set()
        self._stop_unrecorded: set[str] = set()  # stopped by the rebuilt rungs at a recovered row
        self._last_rows: dict[str, dict[str, Any]] = {}  # each trial's newest recorded row, read at the rebuild

    def bracket_of(self, trial_id: str):
        """The trial's bracket, with Ray's weights (brackets with more rungs more likely) but drawn from a
        hash of the trial id instead of numpy's global random state, so a restore draws the same one."""
        if len(self._brackets) == 1:
            return self._brackets[0]
        sizes = [len(b._rungs) for b in self._brackets]
        weights = [2.718281828459045 ** (n - max(sizes)) for n in sizes]
        u = zlib.crc32(str(trial_id).encode()) / 2**32 * sum(weights)
        for bracket, w in zip(self._brackets, weights):
            if u < w:
                return bracket
            u -= w
        return self._brackets[-1]

    def rebuild_rungs(self, rows: list[dict[str, Any]], judged: dict[str, int] | None = None) -> None:
        """Feed recorded (trial, time, metric) rows to the rungs, oldest first.

        JUDGED: each trial's newest epoch a live scheduler decided on (recorder.JUDGED). Its decisions stand: a STOP
        was recorded before the row was. A row past it was recovered from the trial's checkpoint after a dead driver
        (its report died with it; recovered rows are recorded at the new driver's first step, before this rebuild):
        no scheduler decided on it, so the rebuilt rungs do. A trial they stop there (before its own end) is
        stopped before it trains again (_stop_before_they_train) and recorded `stopped`. Without this a trial
        killed after each epoch's checkpoint trained on past every rung it met so (seen in a kill test: two trials
        2 epochs past a rung-1 stop)."""
        judged = judged or {}
        rows = [r for r in rows if r.get(self._metric) is not None and r.get(self._time_attr) is not None]
        stops = set()
        self._last_rows = {}  # (here too: a scheduler unpickled from a study started before it had none)
        for row in sorted(rows, key=lambda r: (r.get("time") or 0, r["epoch"])):
            tid = row["trial_id"]
            self._last_rows[tid] = row
            decision = self.bracket_of(tid).on_result(_Recorded(tid), row[self._time_attr],
                                                      self._metric_op * row[self._metric])
            if decision == TrialScheduler.STOP and row["epoch"] > judged.get(tid, 0) and not self._at_end(row):
                stops.add(tid)
        self._stop_unrecorded = stops - self._stopped_before

    def on_trial_add(self, tune_controller, trial) -> None:
        if not self._stops_read:
            self._stops_read = True
            self._stopped_before = self._recorded_stops()
        super().on_trial_add(tune_controller, trial)  # checks metric/mode, draws a bracket at random ...
        self._trial_info[trial.trial_id] = self.bracket_of(trial.trial_id)  # ... replaced by the trial id's
        trial_added(tune_controller, trial)

    def _rebuild_once(self) -> None:
        # At the first question or result, not when Tune adds the restored trials: the recorder's first step
        # (before Tune's first question) adds the rows of epochs a trial checkpointed but never reported, and
        # a trial whose milestone epoch is among them must meet that rung with that epoch's score, not be
        # judged there on the next epoch's.
        if not self._rebuilt:
            self._rebuilt = True
            self.rebuild_rungs(ResultsLog(self.output).read(),
                               {tid: t.get(JUDGED) or 0 for tid, t in recorded_trials(self.output).items()})

    def choose_trial_to_run(self, tune_controller):
        self._rebuild_once()
        self._stop_before_they_train(tune_controller)
        return super().choose_trial_to_run(tune_controller)

    def _stop_before_they_train(self, tune_controller) -> None:
        """Trials this scheduler had stopped (recorded `stopped`: the driver died before Tune ended them), or that
        the rebuilt rungs stop at a recovered row, which Tune brought back unfinished: stopped now, before they
        train. Stopped at their next result instead, each trained one epoch past its stop, and that epoch counted
        (a trial moved up the ranking on it: seen in a kill audit). Tune asks this before it starts any waiting
        trial, so a PENDING or PAUSED one has not trained since the restore."""
        if not (self._stopped_before or self._stop_unrecorded):
            return
        for trial in list(tune_controller.get_trials()):
            if str(trial.status) not in ("PENDING", "PAUSED"):
                continue
            if trial.trial_id in self._stop_unrecorded:
                self._stop_unrecorded.discard(trial.trial_id)
                if self.on_stop:
                    self.on_stop(trial.trial_id)
            elif trial.trial_id in self._stopped_before:
                self._stopped_before.discard(trial.trial_id)
            else:
                continue
            # The search algorithm learns how it ended first: Tune's stop of a waiting trial tells it no result, and
            # Optuna took that for PRUNED (it learns from COMPLETE trials only). A second end is ignored.
            result = {**(trial.last_result or {}), **self._last_rows.get(trial.trial_id, {})}
            tune_controller.search_alg.on_trial_complete(trial.trial_id, result=result)
            tune_controller.stop_trial(trial)
            save_experiment(tune_controller, trial)  # ended on disk too: a driver that dies next resumes it so

    def _recorded_stops(self) -> set[str]:
        return recorded_stops(self.output)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._rebuild_once()
        if trial.trial_id in self._stopped_before:
            self._stopped_before.discard(trial.trial_id)
            return TrialScheduler.STOP
        if trial.trial_id in self._stop_unrecorded:
            self._stop_unrecorded.discard(trial.trial_id)
            if self.on_stop:
                self.on_stop(trial.trial_id)
            return TrialScheduler.STOP
        decision = super().on_trial_result(tune_controller, trial, result)
        # ASHA also says STOP at max_t, where the trial ends anyway: only a stop before the trial's
        # own end is the scheduler's doing.
        if decision == TrialScheduler.STOP and not self._at_end(result) and self.on_stop:
            self.on_stop(trial.trial_id)
        return decision

    def _at_end(self, result: dict) -> bool:
        epoch, epochs = result.get("epoch"), result.get("epochs")
        if epoch is None or (epochs is not None and epoch >= epochs):
            return True
        return result.get(self._time_attr, 0) >= self._max_t

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_rebuilt"] = state["_stops_read"] = False  # a restored copy rebuilds from disk
        state["_stop_unrecorded"], state["_last_rows"] = set(), {}
        return state


class _NotingStops:
    """Tune's controller as HyperBand sees it, telling `on_stop` of every paused trial HyperBand stops, and
    saving the experiment after: Tune stores a trial's state only when it has a process to stop, so a paused
    trial stopped would stay PAUSED on disk (a resumed study then never counts as finished)."""

    def __init__(self, controller, on_stop: Callable[[str], None] | None,
                 recorded: dict[str, dict[str, Any]] | None = None):
        """RECORDED: each trial's last recorded row, which may be past Tune's last result (a trial's epochs
        checkpointed but never seen by the dead driver are recovered into the rows, not into Tune's state)."""
        self._controller, self._on_stop, self._recorded = controller, on_stop, recorded or {}

    def stop_trial(self, trial):
        last = max(trial.last_result or {}, self._recorded.get(trial.trial_id) or {}, key=lambda r: r.get("epoch", 0))
        if self._on_stop and last.get("epoch", 0) < (last.get("epochs") or float("inf")):  # not one at its end
            self._on_stop(trial.trial_id)
        stopped = self._controller.stop_trial(trial)
        save_experiment(self._controller, trial)
        return stopped

    def __getattr__(self, name):
        return getattr(self._controller, name)


class BOHBHyperBand(HyperBandForBOHB):
    """HyperBandForBOHB(time_attr="epoch", ...) that tells the recorder which trials it stopped, and whose
    brackets survive a driver restart.

    HyperBand pauses a trial at its bracket's milestone until the bracket's other trials reach it, then
    keeps the best 1/reduction_factor (promoted: the trial function runs again and resumes its own latest
    checkpoint) and stops the rest. A bracket not yet full is judged only once the searcher has made all its
    trials (Ray's also judges one whenever no trial runs: see `choose_trial_to_run`).

    Ray's `Tuner.restore` brings this scheduler back with empty brackets, re-adds the trials newest first (so
    they fill other brackets than before; the finished ones too, where they hold a place that never empties)
    and makes every unfinished trial PENDING, which Tune starts without asking the scheduler: a trial that
    waited at its milestone trains on past it. So after a restore every unfinished trial is held (PAUSED) until
    `rebuild`: the brackets are filled again in the trials' creation order (the number in Tune's experiment
    tag), as the first driver filled them, and replayed from the recorded rows (each milestone's halving with
    the metric at that epoch); then a trial that waits at a milestone stays paused, a promoted or unstarted one
    is unpaused, one the replay halves away is stopped (and recorded so). The searcher's bookkeeping (running /
    paused) follows. Assumes no trial ended early (failed, diverged) before its bracket was full, which would
    have let a later trial into that bracket.

    The searcher's state (its observations) is Tune's to save: it is saved right after each observation
    (a trial's result at a milestone). A trial writes its row before the driver sees the result, so a driver
    that dies in between loses that observation (the trial, paused at the milestone, never reports it again):
    the replay gives the searcher's model every milestone result of an unfinished trial that it lacks."""

    def __init__(self, output: str, on_stop: Callable[[str], None] | None = None, **hyperband_args: Any):
        super().__init__(time_attr="epoch", **hyperband_args)
        # Ray's first milestone of bracket s is int(max_t / eta^s), rounded down, and each next one eta times it,
        # capped at max_t: with max_t 45 and eta 3 the largest bracket's are 1, 3, 9, 27, so a study whose trials
        # all fit in it (24 of its 27 places) never trained one past epoch 27. Rounded up, every bracket ends at
        # max_t (2, 6, 18, 45), as HyperBand's budgets do. (A study restored from an older tuner.pkl keeps its own.)
        self._get_r0 = functools.partial(first_milestone, self._max_t_attr, self._eta)
        self.output, self.on_stop = output, on_stop
        self._stopped_before: set[str] | None = None
        self._held: list | None = None  # trials added since a restore, until rebuild places them
        self._save_next = False

    def on_trial_add(self, tune_controller, trial) -> None:
        if self._stopped_before is None:  # the first trial this driver sees: a restore if rows were recorded
            self._stopped_before = recorded_stops(self.output)
            if os.path.exists(os.path.join(self.output, TRIALS_STATE)) or ResultsLog(self.output).read():
                self._held = []
        if self._held is not None:
            if trial.status not in (Trial.TERMINATED, Trial.ERROR):
                trial.set_status(Trial.PAUSED)  # before Tune files it: a PENDING trial would start at once
            self._held.append(trial)
        else:
            super().on_trial_add(tune_controller, trial)
        trial_added(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller, allow_recurse: bool = True):
        if self._held is not None:  # Tune adds every restored trial before it first asks what to run
            self.rebuild(tune_controller, ResultsLog(self.output).read())
        if self._save_next:  # the searcher took the last result's observation after this scheduler's decision
            self._save_next = False
            save_experiment(tune_controller)
        if not tune_controller.search_alg.is_finished():
            # Ray judges a bracket whose trials are all paused whenever none runs, full or not (so that a search
            # that makes no more trials ends). While trials are still to come that moment is only the gap before
            # the searcher's next one (a step away, or the first step after a restore): judged there, a bracket
            # of three halved two of them and the brackets after it were filled with the wrong trials.
            return self._paused_or_pending_to_run()
        return super().choose_trial_to_run(tune_controller, allow_recurse)

    def _paused_or_pending_to_run(self):
        """Ray's choice when trials run (HyperBandForBOHB.choose_trial_to_run's first part): the first trial a
        bracket promoted, or a new one."""
        for band in self._hyperbands:
            for bracket in band:
                for trial in bracket.current_trials() if bracket is not None else ():
                    if trial.status == Trial.PENDING or (trial.status == Trial.PAUSED
                                                         and trial in bracket.trials_to_unpause):
                        return trial
        return None

    def rebuild(self, tune_controller, rows: list[dict[str, Any]]) -> None:
        """Brackets filled again in creation order and replayed from `rows` (see the class docstring)."""
        held, self._held = self._held or [], None
        self._hyperbands, self._state, self._trial_info = [[]], {"bracket": None, "band_idx": 0}, {}
        for trial in sorted(held, key=creation_order):
            super().on_trial_add(tune_controller, trial)
        by_trial: dict[str, list[dict[str, Any]]] = {}
        for row in sorted(rows, key=lambda r: r["epoch"]):
            if row.get(self._metric) is not None:
                by_trial.setdefault(row["trial_id"], []).append(row)
        searcher = base_searcher(getattr(tune_controller, "search_alg", None))  # TuneBOHB, not Tune's limiter
        if hasattr(searcher, "running"):  # as saved before the driver died: the replay adds the trials it unpauses
            searcher.running.clear()  # (the searcher makes no new trial while it counts max_concurrent running)
        controller = _NotingStops(tune_controller, self.on_stop, {tid: rs[-1] for tid, rs in by_trial.items()})
        reached: list[tuple[str, float, float]] = []  # (trial id, milestone, metric there)
        for band in self._hyperbands:
            for bracket in band:
                if bracket is not None:
                    self._replay(controller, bracket, by_trial, reached)
        _observe_missing(searcher, reached, {t.trial_id: t.config for t in held})
        for trial in held:
            if trial.status in (Trial.TERMINATED, Trial.ERROR) and hasattr(searcher, "paused"):
                searcher.paused.discard(trial.trial_id)  # (not running: cleared above, and the replay unpauses none)
            elif trial.status == Trial.PAUSED and hasattr(searcher, "on_pause") and not any(
                    trial in b.trials_to_unpause for band in self._hyperbands for b in band if b is not None):
                searcher.on_pause(trial.trial_id)

    def _replay(self, controller, bracket, by_trial: dict[str, list[dict[str, Any]]],
                milestones: list[tuple[str, float, float]]) -> None:
        def ended(t) -> bool:
            return t.status in (Trial.TERMINATED, Trial.ERROR)

        while True:
            for t in list(bracket._live_trials):
                reached = [r for r in by_trial.get(t.trial_id, []) if r["epoch"] <= bracket._cumul_r]
                if reached and bracket._get_result_time(bracket._live_trials[t]) < reached[-1]["epoch"]:
                    bracket.update_trial_stats(t, {self._time_attr: reached[-1]["epoch"],
                                                   self._metric: reached[-1][self._metric]})
                    if reached[-1]["epoch"] == bracket._cumul_r:
                        milestones.append((t.trial_id, bracket._cumul_r, reached[-1][self._metric]))
                if ended(t) and bracket._get_result_time(bracket._live_trials[t]) < bracket._cumul_r:
                    bracket.cleanup_trial(t)  # it ended before this milestone (Tune had removed it then)
            if bracket.finished() or not bracket.filled() or not bracket._live_trials or not bracket.cur_iter_done():
                break
            good, bad = bracket.successive_halving(self._metric, self._metric_op)
            bracket.is_being_processed = True  # as Ray marks a halved bracket: a stop below must not halve again
            for t in bad:
                bracket.cleanup_trial(t)
                if not ended(t):  # the first driver died before it stopped this one
                    controller.stop_trial(t)
        for t in list(bracket._live_trials):
            if ended(t):
                bracket.cleanup_trial(t)
            elif bracket.continue_trial(t):  # promoted, or not at its milestone yet: it runs
                self._unpause_trial(controller, t)
                bracket.trials_to_unpause.add(t)
            elif bracket.finished():  # at the last milestone: nothing left to train
                bracket.cleanup_trial(t)
                controller.stop_trial(t)
            # else: it waits at its milestone for the bracket's others, paused

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if trial.trial_id in (self._stopped_before or set()):
            self._stopped_before.discard(trial.trial_id)
            return TrialScheduler.STOP
        decision = super().on_trial_result(tune_controller, trial, result)
        if "budget" in result.get("hyperband_info", {}):
            self._save_next = True  # an observation for the searcher (see choose_trial_to_run)
        last_epoch = min(self._max_t_attr, result.get("epochs") or self._max_t_attr)
        if decision == TrialScheduler.STOP and result.get("epoch", last_epoch) < last_epoch and self.on_stop:
            self.on_stop(trial.trial_id)
        return decision

    def _process_bracket(self, tune_controller, bracket) -> str:
        controller = _NotingStops(tune_controller, self.on_stop)
        return super()._process_bracket(controller, bracket)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_stopped_before=None, _held=None, _save_next=False)  # a restored copy reads them from disk
        return state


def _observe_missing(searcher, milestones: list[tuple[str, float, float]],
                     configs: dict[str, dict[str, Any]]) -> None:
    """Give TuneBOHB's model (hpbandster's BOHB: configs and losses by budget) each milestone result it lacks,
    as Ray hands it one (TuneBOHB.on_trial_result with the budget): a trial waiting at its milestone when the
    driver died, or one whose observations came after the searcher's saved state (the driver died between
    Tune's files). The values: the searcher's, else the trial's config as Tune restored it (CONFIGS)."""
    model, params = getattr(searcher, "bohber", None), getattr(searcher, "trial_to_params", None)
    if model is None or params is None:
        return
    import ConfigSpace
    import numpy as np
    from ray.tune.search.bohb.bohb_search import _BOHBJobWrapper

    from .restorable_searchers import space_values  # (a BOHB study: imported already)

    for trial_id, budget, value in milestones:
        values = params.get(trial_id) or space_values(configs.get(trial_id) or {}, model.configspace.keys())
        if values is None:
            continue
        vector = ConfigSpace.Configuration(model.configspace, values).get_array()
        if not any(np.array_equal(vector, seen, equal_nan=True) for seen in model.configs.get(budget, [])):
            # (not searcher.on_trial_result: that also counts the trial running, which the rebuild decides)
            model.new_result(_BOHBJobWrapper(searcher._metric_op * value, budget, values))


def create_scheduler(name: str, output: str, on_stop: Callable[[str], None], max_t: int, grace_period: int,
                     reduction_factor: float, brackets: int = 1, time_attr: str = "epoch",
                     search: str = "grid") -> TrialScheduler:
    if search == "bohb":  # BOHB's searcher needs its HyperBand: it learns from the budgets the brackets give
        return BOHBHyperBand(output, on_stop=on_stop, max_t=max_t, reduction_factor=reduction_factor)
    if name == "fifo":
        return SavingFIFO()
    return RestorableASHA(output, on_stop=on_stop, time_attr=time_attr, max_t=max_t, grace_period=grace_period,
                          reduction_factor=reduction_factor, brackets=brackets)
