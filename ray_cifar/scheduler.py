"""ASHA that survives a driver restart and tells the recorder which trials it stopped.

Ray's `Tuner.restore` rebuilds the scheduler from tuner.pkl, written when the study
started, so its rungs come back empty and a resumed study would keep trials that the
uninterrupted one stops. `RestorableASHA` refills the rungs from the study's recorded
rows (ray_cifar.results) the first time it sees a trial, replaying the rows in the order
they arrived, so the resumed study makes the same decisions.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from .recorder import STOPPED, TRIALS_STATE
from .results import ResultsLog


class _Recorded:
    """A stand-in for a Tune Trial: the rungs only key on trial_id."""

    def __init__(self, trial_id: str):
        self.trial_id = trial_id


class RestorableASHA(ASHAScheduler):
    """ASHAScheduler(time_attr="epoch", ...) plus rungs rebuilt from `output`'s rows.

    Args:
        output: the study's output folder, whose recorded rows rebuild the rungs after a restore.
        on_stop: called with a trial id whenever this scheduler stops that trial.
        max_t, grace_period: in epochs; reduction_factor: keep the best 1/reduction_factor per rung.
    """

    def __init__(self, output: str, on_stop: Callable[[str], None] | None = None, **asha_args: Any):
        super().__init__(time_attr="epoch", **asha_args)
        self.output, self.on_stop = output, on_stop
        self._rebuilt = False
        self._stopped_before: set[str] = set()

    def rebuild_rungs(self, rows: list[dict[str, Any]]) -> None:
        """Feed recorded (trial, epoch, metric) rows to the rungs, oldest first; decisions are discarded."""
        bracket = self._brackets[0]  # ray_cifar uses one bracket (ASHAScheduler's default)
        rows = [r for r in rows if r.get(self._metric) is not None]
        for row in sorted(rows, key=lambda r: (r.get("time") or 0, r["epoch"])):
            bracket.on_result(_Recorded(row["trial_id"]), row["epoch"], self._metric_op * row[self._metric])

    def on_trial_add(self, tune_controller, trial) -> None:
        if not self._rebuilt:
            self._rebuilt = True
            self.rebuild_rungs(ResultsLog(self.output).read())
            self._stopped_before = self._recorded_stops()
        super().on_trial_add(tune_controller, trial)

    def _recorded_stops(self) -> set[str]:
        """Trials this scheduler stopped before a restore. A driver that dies between the decision and
        the trial's end leaves them unfinished, and Tune resumes them: they are stopped again at once."""
        path = os.path.join(self.output, TRIALS_STATE)
        if not os.path.exists(path):
            return set()
        with open(path) as f:
            return {tid for tid, summary in json.load(f).items() if summary.get("status") == STOPPED}

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if trial.trial_id in self._stopped_before:
            self._stopped_before.discard(trial.trial_id)
            return TrialScheduler.STOP
        decision = super().on_trial_result(tune_controller, trial, result)
        # ASHA also says STOP at max_t, where the trial ends anyway: only a stop before the trial's
        # own last epoch is the scheduler's doing.
        last_epoch = min(self._max_t, result.get("epochs") or self._max_t)
        if decision == TrialScheduler.STOP and result.get("epoch", last_epoch) < last_epoch and self.on_stop:
            self.on_stop(trial.trial_id)
        return decision

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_rebuilt"] = False  # a restored copy rebuilds from disk
        return state


def create_scheduler(name: str, output: str, on_stop: Callable[[str], None], max_t: int, grace_period: int,
                     reduction_factor: float) -> TrialScheduler:
    if name == "fifo":
        return FIFOScheduler()
    return RestorableASHA(output, on_stop=on_stop, max_t=max_t, grace_period=grace_period,
                          reduction_factor=reduction_factor)
