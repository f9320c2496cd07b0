"""Population based training (PBT, PB2) on ray_cifar's own checkpoints, surviving a driver restart.

Ray's PopulationBasedTraining exploits through Tune checkpoints: it hands the donor's
checkpoint to the weak trial, which a function trainable reads back with `tune.get_checkpoint()`.
ray_cifar's trials keep their state in their own run folders instead (CheckpointStore for one
rank, Ray Train's run for DDP, which only forwards a checkpoint *path* to Tune), so here an
exploit is a new config and nothing else: the donor's values, explored, plus the lineage
(`pbt_lineage`: generation, donor trial id and generation). Tune pauses the trial and starts it
again with that config; the trial (ray_cifar.tuning.trial) trains generation n in a run of its own,
started from a copy of the donor's latest checkpoint, and `checkpoint.restore` keeps the new
values over the donor's (lr, weight decay, momentum; the loader and loss are built from them).

Decisions (Ray's): every `perturbation_interval` epochs a trial in the bottom `quantile` of the
population's latest scores copies one of the top `quantile`. Added here:
- a donor must have reached the trial's epoch (a trial never trains an epoch twice, so its rows
  stay one per epoch), and no decision at a trial's last epoch (nothing left to train);
- the trial keeps its own train.seed (its data order and augmentation draws stay its own);
- explored values stay inside their search-space entry (x 0.8 / x 1.2 clipped to the range);
- after `Tuner.restore`, each trial's latest score and decision epoch come back from the rows, and
  PB2's data (what its model learns from) too (Ray's scheduler state does not survive a restore; the
  lineage does, in the trials' configs);
- a member's earlier generations keep only the checkpoint of its best epoch, if one of them holds it
  (the test split may evaluate it): every exploit used to leave a run folder of up to three
  checkpoints behind (`_drop_old_generations`).
"""

from __future__ import annotations

import posixpath
import random
from typing import Any

from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler
from ray.tune.schedulers.pb2 import PB2

from .. import storage
from ..checkpoint_store import keep_only, remove_state_at
from ..config import LINEAGE, Config, ConfigError, pbt_mutated_keys as mutated_keys
from ..results import ResultsLog, best_epoch
from .scheduler import save_experiment

SEED = "train.seed"
RANGES = ("uniform", "loguniform", "randint")


def mutations(cfg: Config) -> dict[str, Any]:
    """PBT's hyperparam_mutations: a list for grid/choice entries (explore steps to a neighbour), a Tune
    domain for ranges (explore multiplies by 0.8 or 1.2, or resamples)."""
    makers = {"uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
              "randint": lambda v: tune.randint(v[0], v[1] + 1)}
    out = {}
    for key in mutated_keys(cfg):
        kind, values = next(iter(cfg.tune.search_space[key].items()))
        out[key] = list(values) if kind in ("grid", "choice") else makers[kind](values)
    return out


def bounds(cfg: Config) -> dict[str, tuple[float, float]]:
    """[low, high] of every perturbed range entry: explored values are clipped into it."""
    out = {}
    for key in mutated_keys(cfg):
        kind, values = next(iter(cfg.tune.search_space[key].items()))
        if kind in RANGES:
            out[key] = (values[0], values[1])
    return out


def pb2_bounds(cfg: Config) -> dict[str, list[float]]:
    """PB2's hyperparam_bounds: PB2 models values on a continuous range, so every perturbed entry must be one."""
    for key in mutated_keys(cfg):
        kind = next(iter(cfg.tune.search_space[key]))
        if kind not in RANGES:
            raise ConfigError(f"tune.search_space.{key}: PB2 perturbs ranges only ({', '.join(RANGES)}), not a "
                              f"{kind} list; use tune.scheduler pbt, or give {key} a range")
    return {key: list(b) for key, b in bounds(cfg).items()}


def clip(config: dict[str, Any], limits: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """The explored config with every ranged value inside [low, high] (integers stay integers)."""
    for key, (low, high) in limits.items():
        if key in config:
            value = min(max(config[key], low), high)
            config[key] = int(round(value)) if isinstance(config[key], int) else value
    return config


class _Lineage:
    """What ray_cifar's PBT and PB2 add to Ray's (see the module docstring): mix in before the Ray class."""

    def _setup(self, output: str, limits: dict[str, tuple[float, float]], storage_path: str | None,
               all_at_once: bool) -> None:
        self.output, self.limits, self.storage_path, self.all_at_once = output, limits, storage_path, all_at_once
        self._rebuilt, self._data_pending = False, False
        self._recorded: dict[str, dict[str, Any]] = {}
        self._rows: dict[str, list[dict[str, Any]]] = {}
        self._best: dict[str, dict[str, Any] | None] = {}  # each member's best row so far (all generations)
        self._dropped: dict[tuple[str, int], str] = {}  # (member, old generation): the checkpoint kept, "" none
        self._drop_failed = False

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
        save_experiment(tune_controller, trial)

    def __getstate__(self):
        state = dict(self.__dict__)
        # A restored copy rebuilds from the rows (and looks at every old generation once more).
        state.update(_rebuilt=False, _rows={}, _recorded={}, _data_pending=False, _best={}, _dropped={})
        return state

    # -- decisions ------------------------------------------------------------------------------

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        self._drop_old_generations(trial.trial_id, result)
        if result.get(self._metric) is not None and trial in self._trial_state:
            # Every member's latest score, not the one at its last decision epoch (Ray's): a member at its
            # decision epoch compares with the population as it is now.
            self._trial_state[trial].last_score = self._metric_op * result[self._metric]
        if result.get("epochs") is not None and result.get(self._time_attr, 0) >= result["epochs"]:
            return TrialScheduler.CONTINUE  # its last epoch: an exploit would restart a finished trial
        decision = super().on_trial_result(tune_controller, trial, result)
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
        donors = [t for t in upper_quantile if t is not trial and self._can_give(t, epoch)]
        random.shuffle(donors)
        for donor in donors:
            if self._copy_donor(trial, donor):
                self._exploit(tune_controller, trial, donor)
                return

    def _can_give(self, donor: Trial, epoch: int) -> bool:
        """A donor has reached the trial's epoch and has epochs left (copying a finished state trains nothing)."""
        last = donor.last_result or {}
        return last.get(self._time_attr, 0) >= epoch and last.get(self._time_attr, 0) < (last.get("epochs") or 1e9)

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


class RestorablePBT(_Lineage, PopulationBasedTraining):
    """PopulationBasedTraining(time_attr="epoch") over ray_cifar's checkpoints, restorable (module docstring).

    Args:
        output: the study's folder (its rows rebuild each trial's last score after a restore).
        hyperparam_mutations: `mutations(cfg)`; limits: `bounds(cfg)` (explored values are clipped into them).
        perturbation_interval: epochs; quantile_fraction, resample_probability: as Ray's.
    """

    label = "pbt"

    def __init__(self, output: str, limits: dict[str, tuple[float, float]], storage_path: str | None = None,
                 all_at_once: bool = False, **pbt_args: Any):
        super().__init__(time_attr="epoch", log_config=False, **pbt_args)
        self._setup(output, limits, storage_path, all_at_once)


class RestorablePB2(_Lineage, PB2):
    """PB2(time_attr="epoch") (a GP bandit picks the explored values within `hyperparam_bounds`), the same way.

    PB2's model learns from its data: at each decision epoch a trial's values and score, and at each exploit the
    new values starting from the donor's score. Ray's restore brings back an empty table; here each trial's
    entries are rebuilt from the recorded rows (the values each epoch ran with are in them) once every trial is
    back, and an exploit not yet reported from the trial's config."""

    label = "pb2"

    def __init__(self, output: str, limits: dict[str, tuple[float, float]], storage_path: str | None = None,
                 all_at_once: bool = False, **pb2_args: Any):
        super().__init__(time_attr="epoch", log_config=False, **pb2_args)
        self._setup(output, limits, storage_path, all_at_once)

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


def create_pbt(cfg: Config, output: str, storage_path: str | None = None, all_at_once: bool = False
               ) -> PopulationBasedTraining:
    """The scheduler of tune.scheduler pbt or pb2; metric and mode come from the TuneConfig. `storage_path`: the
    trials' run folders (None: decisions only, for tests); `all_at_once`: every member runs concurrently."""
    common = dict(perturbation_interval=cfg.tune.perturbation_interval, quantile_fraction=cfg.tune.pbt_quantile,
                  storage_path=storage_path, all_at_once=all_at_once)
    if cfg.tune.scheduler == "pb2":
        try:
            import sklearn  # noqa: F401 - PB2's Gaussian process
        except ImportError:
            raise ConfigError("tune.scheduler: pb2 needs scikit-learn: pip install 'ray_cifar[search]'") from None
        limits = pb2_bounds(cfg)
        return RestorablePB2(output, {k: tuple(v) for k, v in limits.items()}, hyperparam_bounds=limits, **common)
    return RestorablePBT(output, bounds(cfg), hyperparam_mutations=mutations(cfg),
                         resample_probability=cfg.tune.pbt_resample_p, **common)
