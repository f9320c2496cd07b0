"""PB2 on ray_cifar's own checkpoints: RestorablePB2 (ray_cifar.tuning.pbt says what is added to Ray's).

A module of its own so that only a PB2 study pays for importing Ray's PB2, which imports scikit-learn and
SciPy (~1 s of every driver's start, when the search extra is installed)."""

from __future__ import annotations

from typing import Any, Callable

from ray.tune.experiment import Trial
from ray.tune.schedulers.pb2 import PB2

from ..config import LINEAGE
from .lineage import Lineage


class RestorablePB2(Lineage, PB2):
    """PB2(time_attr="epoch") (a GP bandit picks the explored values within `hyperparam_bounds`), the same way.

    PB2's model learns from its data: at each decision epoch a trial's values and score, and at each exploit the
    new values starting from the donor's score. Ray's restore brings back an empty table; here each trial's
    entries are rebuilt from the recorded rows (the values each epoch ran with are in them) once every trial is
    back, and an exploit not yet reported from the trial's config."""

    label = "pb2"

    def __init__(self, output: str, limits: dict[str, tuple[float, float]], storage_path: str | None = None,
                 all_at_once: bool = False, record: Callable[[Any, dict], None] | None = None, **pb2_args: Any):
        super().__init__(time_attr="epoch", log_config=False, **pb2_args)
        self._setup(output, limits, storage_path, all_at_once, record)

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        first = not self._rebuilt
        super().on_trial_add(tune_controller, trial)
        if first and self._rows:  # a restore: the table is built once every trial is back (choose_trial_to_run)
            self._data_pending = True

    def choose_trial_to_run(self, tune_controller, *args, **kwargs):
        if self._data_pending:  # Tune adds every restored trial before it first asks
            self._data_pending = False
            self.rebuild_data(list(self._trial_state))
        return super().choose_trial_to_run(tune_controller, *args, **kwargs)

    def rebuild_data(self, trials: list[Trial]) -> None:
        import pandas as pd

        columns = ["Trial", "Time", *self._hyperparam_bounds_flat, "Reward"]
        names = {t.trial_id: str(t) for t in trials}
        entries = [[names.get(tid, tid), *rest] for tid, *rest in self.recorded_entries(trials)]
        self.data = pd.concat([self.data, pd.DataFrame(entries, columns=columns)]).reset_index(drop=True)
        self.data.Trial = self.data.Trial.astype("str")

    def recorded_entries(self, trials: list[Trial]) -> list[list[Any]]:
        """PB2's data entries (trial id, Time, values..., Reward) from the recorded rows, in the order PB2 made
        them: at each decision epoch (a multiple of the interval, before the last epoch) the values the epoch
        ran with and the trial's score; at each exploit the new values (from the next generation's first row,
        or the trial's config when it has none yet), at the time and score of the donor's latest entry that
        follows one with the same values (what PB2's `_explore` reads; none without one)."""
        names, events = list(self._hyperparam_bounds_flat), []

        def decision(row) -> bool:
            return row["epoch"] % self._perturbation_interval == 0 and row["epoch"] < (row.get("epochs") or 10**9)

        for tid, rows in self._rows.items():
            for before, row in zip([None, *rows], rows):
                values = [row[n] for n in names]
                if before is not None and (row.get("pbt_generation") or 0) > (before.get("pbt_generation") or 0):
                    # decided at the trial's previous row, right after that row's own entry
                    events.append((before.get("time") or 0, 1, tid, row.get("pbt_parent") or "", values))
                if decision(row):
                    events.append((row.get("time") or 0, 0, tid, row["epoch"], values + [self._metric_op * row[self._metric]]))
        for trial in trials:  # an exploit decided at the trial's last row, its new generation not yet reported
            lineage, rows = trial.config.get(LINEAGE) or {}, self._rows.get(trial.trial_id)
            if rows and int(lineage.get("generation", 0)) > (rows[-1].get("pbt_generation") or 0):
                events.append((rows[-1].get("time") or 0, 1, trial.trial_id, lineage.get("parent", ""),
                               [trial.config[n] for n in names]))
        entries: list[list[Any]] = []
        for _, kind, tid, what, values in sorted(events, key=lambda e: e[:2]):
            if kind == 0:
                entries.append([tid, what, *values])
                continue
            donor = [e for e in entries if e[0] == what]
            followed = [e for i, e in enumerate(donor) if any(p[2:-1] == e[2:-1] and p[1] < e[1] for p in donor[:i])]
            if followed:
                last = max(followed, key=lambda e: e[1])
                entries.append([tid, last[1], *values, last[-1]])
        return entries
