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

import json
import os
import zlib
from typing import Any, Callable

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandForBOHB, TrialScheduler

from ..results import ResultsLog
from .recorder import STOPPED, TRIALS_STATE


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


class SavingFIFO(FIFOScheduler):
    """FIFOScheduler that saves the experiment whenever a trial is added (see save_experiment)."""

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        save_experiment(tune_controller, trial)


def recorded_stops(output: str) -> set[str]:
    """Trials the scheduler stopped before a restore. A driver that dies between the decision and the
    trial's end leaves them unfinished, and Tune resumes them: they are stopped again at once."""
    path = os.path.join(output, TRIALS_STATE)
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        return {tid for tid, summary in json.load(f).items() if summary.get("status") == STOPPED}


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
        self._rebuilt = False
        self._stopped_before: set[str] = set()

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

    def rebuild_rungs(self, rows: list[dict[str, Any]]) -> None:
        """Feed recorded (trial, time, metric) rows to the rungs, oldest first; decisions are discarded."""
        rows = [r for r in rows if r.get(self._metric) is not None and r.get(self._time_attr) is not None]
        for row in sorted(rows, key=lambda r: (r.get("time") or 0, r["epoch"])):
            self.bracket_of(row["trial_id"]).on_result(_Recorded(row["trial_id"]), row[self._time_attr],
                                                       self._metric_op * row[self._metric])

    def on_trial_add(self, tune_controller, trial) -> None:
        if not self._rebuilt:
            self._rebuilt = True
            self.rebuild_rungs(ResultsLog(self.output).read())
            self._stopped_before = self._recorded_stops()
        super().on_trial_add(tune_controller, trial)  # checks metric/mode, draws a bracket at random ...
        self._trial_info[trial.trial_id] = self.bracket_of(trial.trial_id)  # ... replaced by the trial id's
        save_experiment(tune_controller, trial)

    def _recorded_stops(self) -> set[str]:
        return recorded_stops(self.output)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if trial.trial_id in self._stopped_before:
            self._stopped_before.discard(trial.trial_id)
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
        state["_rebuilt"] = False  # a restored copy rebuilds from disk
        return state


class _NotingStops:
    """Tune's controller as HyperBand sees it, telling `on_stop` of every paused trial HyperBand stops."""

    def __init__(self, controller, on_stop: Callable[[str], None]):
        self._controller, self._on_stop = controller, on_stop

    def stop_trial(self, trial):
        last = trial.last_result or {}
        if last.get("epoch", 0) < (last.get("epochs") or float("inf")):  # not a trial already at its end
            self._on_stop(trial.trial_id)
        return self._controller.stop_trial(trial)

    def __getattr__(self, name):
        return getattr(self._controller, name)


class BOHBHyperBand(HyperBandForBOHB):
    """HyperBandForBOHB(time_attr="epoch", ...) that tells the recorder which trials it stopped.

    HyperBand pauses a trial at a rung and starts it again if it is promoted: the trial function
    runs again and resumes its own latest checkpoint. After `Tuner.restore` its brackets start empty
    (as Ray's ASHA rungs do) and the restored trials fill new ones; a trial it had stopped before the
    driver died is stopped again at its first result."""

    def __init__(self, output: str, on_stop: Callable[[str], None] | None = None, **hyperband_args: Any):
        super().__init__(time_attr="epoch", **hyperband_args)
        self.output, self.on_stop = output, on_stop
        self._stopped_before: set[str] | None = None

    def on_trial_add(self, tune_controller, trial) -> None:
        if self._stopped_before is None:
            self._stopped_before = recorded_stops(self.output)
        super().on_trial_add(tune_controller, trial)
        save_experiment(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if trial.trial_id in (self._stopped_before or set()):
            self._stopped_before.discard(trial.trial_id)
            return TrialScheduler.STOP
        decision = super().on_trial_result(tune_controller, trial, result)
        last_epoch = min(self._max_t_attr, result.get("epochs") or self._max_t_attr)
        if decision == TrialScheduler.STOP and result.get("epoch", last_epoch) < last_epoch and self.on_stop:
            self.on_stop(trial.trial_id)
        return decision

    def _process_bracket(self, tune_controller, bracket) -> str:
        controller = _NotingStops(tune_controller, self.on_stop) if self.on_stop else tune_controller
        return super()._process_bracket(controller, bracket)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_stopped_before"] = None  # a restored copy reads them from disk
        return state


def create_scheduler(name: str, output: str, on_stop: Callable[[str], None], max_t: int, grace_period: int,
                     reduction_factor: float, brackets: int = 1, time_attr: str = "epoch",
                     search: str = "grid") -> TrialScheduler:
    if search == "bohb":  # BOHB's searcher needs its HyperBand: it learns from the budgets the brackets give
        return BOHBHyperBand(output, on_stop=on_stop, max_t=max_t, reduction_factor=reduction_factor)
    if name == "fifo":
        return SavingFIFO()
    return RestorableASHA(output, on_stop=on_stop, time_attr=time_attr, max_t=max_t, grace_period=grace_period,
                          reduction_factor=reduction_factor, brackets=brackets)
