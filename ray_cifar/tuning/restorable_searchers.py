"""Ray's Optuna, HyperOpt and BOHB searchers, able to take a trial from Tune's record that their saved state lacks.

Tune saves a study's state as several files: the trials (experiment_state) and the searcher's state
(search_gen_state, searcher-state) are written one after the other and copied to the output folder on
threads, file by file. A driver that dies in between leaves a newer trial list than searcher state:
the restored searcher has never heard of a trial Tune restores. Ray's OptunaSearch and TuneBOHB then fail the
whole study with a KeyError at that trial's first result; Ray's HyperOptSearch ignores the trial's result and
draws its values again for the next trial (the same point run twice). `restored` is how
`searchers.follow_restored_trial` hands them each trial Tune adds back, with the values Tune's record gives it:
they adopt a trial they lack and are told the end of one that ended since their save.

Optuna and HyperOpt adopt a trial by drawing its lost suggestion again, so those draws must come in the order
the trials were made. Tune adds a restored study's trials back newest result first (two trials made after the
save came back in the other order, and each draw had the other's values), so those two hold a trial they lack
until every trial made before it is theirs, then adopt it (_FollowsRestoreInOrder).

Imported only for a study that uses one of them (Ray's modules import Optuna, HyperOpt or BOHB's packages).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from ray.tune.search.bohb import TuneBOHB
from ray.tune.search.hyperopt import HyperOptSearch
from ray.tune.search.optuna import OptunaSearch
from ray.tune.utils import flatten_dict

logger = logging.getLogger(__name__)


def space_values(config: dict[str, Any], names) -> dict[str, Any] | None:
    """A trial's values for a searcher's space (NAMES: its flattened keys) from the trial's config as Tune holds
    it; None when one is missing."""
    flat = flatten_dict(config)
    return {name: flat[name] for name in names} if all(name in flat for name in names) else None


def _note(trial_id: str, searcher: str) -> None:
    print(f"[ray_cifar] note: trial {trial_id} was made after {searcher}'s last saved state (the driver died "
          f"between Tune's files); {searcher} takes it and its values from Tune's record", flush=True)


class _FollowsRestore:
    """`restored` at once: adopt the trial if the saved state lacks it, then tell its end if it ended since."""

    def restored(self, trial_id: str, config: dict[str, Any], order, end: tuple[dict, bool] | None) -> None:
        """Tune added TRIAL_ID back with CONFIG; ORDER: its place in creation order; END: (its last result, whether
        it errored) if it has ended."""
        self.adopt(trial_id, config)
        if end is not None and self._holds_open(trial_id):
            self.on_trial_complete(trial_id, result=end[0], error=end[1])


class _FollowsRestoreInOrder(_FollowsRestore):
    """`restored` in creation order for the trials the saved state lacks (see the module's text): such a trial is
    held until the searcher has made or adopted every trial before it, then adopted. The saved state made the
    first len(_made()) trials (Tune's trial list and the searcher's state are each a prefix of the trials made);
    creation order is Tune's (the number that starts a trial's experiment tag). A trial still held once Tune has
    added them all (no tag, or counts that disagree) is adopted at the searcher's next use. The held trials are
    part of the saved state (__dict__): a driver that dies in between loses none."""

    def restored(self, trial_id: str, config: dict[str, Any], order, end: tuple[dict, bool] | None) -> None:
        if trial_id in self._made():
            with self._following():
                super().restored(trial_id, config, order, end)
        else:
            self.__dict__.setdefault("_held", {})[trial_id] = (order, config, end)
        self._follow_held(only_next=True)

    @contextlib.contextmanager
    def _following(self):
        """Adopting a trial draws, and telling an end is a use: neither adopts the held trials meanwhile."""
        self._busy = True
        try:
            yield
        finally:
            del self._busy

    def _follow_held(self, only_next: bool = False) -> None:
        """Adopt the held trials in creation order; ONLY_NEXT: while each is the next one made."""
        held = self.__dict__.get("_held")
        if not held or self.__dict__.get("_busy"):
            return
        with self._following():
            for trial_id, (order, config, end) in sorted(held.items(), key=lambda item: item[1][0]):
                if only_next and order[0] != len(self._made()) + 1:
                    break
                del held[trial_id]
                super().restored(trial_id, config, order, end)

    def _holds(self, trial_id: str) -> bool:
        """Whether the searcher has TRIAL_ID to tell a result or an end to (HyperOpt: only until its end)."""
        return trial_id in self._made()

    def suggest(self, trial_id: str) -> dict | None:
        self._follow_held()
        return super().suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._follow_held()
        if self._holds(trial_id):
            super().on_trial_result(trial_id, result)
        else:
            logger.warning("%s holds no trial %s: its result is not told to it", type(self).__name__, trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._follow_held()
        if self._holds(trial_id):
            super().on_trial_complete(trial_id, result=result, error=error)
        else:
            logger.warning("%s holds no trial %s: its end is not told to it", type(self).__name__, trial_id)


class RestorableOptuna(_FollowsRestoreInOrder, OptunaSearch):
    """OptunaSearch whose restored copy can adopt a trial it never suggested, and that skips (one warning) a
    result of a trial it does not hold instead of failing the study."""

    def adopt(self, trial_id: str, config: dict[str, Any]) -> bool:
        """Take TRIAL_ID with CONFIG's values (Tune's trial config) into Optuna's study, as a running trial;
        False when it is already there. The lost suggestion is drawn again first: from the state saved just
        before it, Optuna draws the same values (what an uninterrupted study holds), and the next trial's
        draw is not a repeat of this one. Where the values differ the draw is told FAIL (TPE learns nothing
        from it) and the trial's own values are enqueued and asked for."""
        if trial_id in self._ot_trials or not isinstance(self._space, dict) or self._ot_study is None:
            return False
        values = space_values(config, self._space)
        if values is None:
            return False
        drawn = self._ot_study.ask(fixed_distributions=self._space)
        if drawn.params != values:
            from optuna.trial import TrialState

            self._ot_study.tell(drawn, state=TrialState.FAIL)
            self._ot_study.enqueue_trial(values)
            drawn = self._ot_study.ask(fixed_distributions=self._space)
        self._ot_trials[trial_id] = drawn
        _note(trial_id, "Optuna")
        return True

    def _made(self) -> dict:
        return self._ot_trials  # (every trial it made or adopted: Ray's keeps an ended one)

    def _holds_open(self, trial_id: str) -> bool:
        return trial_id in self._ot_trials and trial_id not in self._completed_trials


class _RemembersMade:
    """Every trial id a searcher suggested or adopted. (TuneBOHB and HyperOptSearch forget a trial when it ends, so
    an ended trial Tune restores would look like one they never made; their saved state is their __dict__, so this
    set is saved and restored with it.)"""

    def _made(self) -> set[str]:
        return self.__dict__.setdefault("_made_ids", set())

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        if config is not None:
            self._made().add(trial_id)
        return config


class RestorableHyperOpt(_FollowsRestoreInOrder, _RemembersMade, HyperOptSearch):
    """HyperOptSearch whose restored copy can adopt a trial it never suggested, as RestorableOptuna does: the lost
    suggestion is drawn again (from the state saved just before it, HyperOpt's TPE draws the same values) and
    held as the trial's, so TPE learns from the trial's result and does not draw its values for the next trial.
    Where the values differ, the draw is marked failed (TPE learns nothing from it) and a point with the trial's
    own values is added in its place."""

    def adopt(self, trial_id: str, config: dict[str, Any]) -> bool:
        if trial_id in self._made() or getattr(self, "domain", None) is None:
            return False
        values = space_values(config, self.domain.params)
        if values is None:
            return False
        import hyperopt
        from hyperopt.fmin import generate_trial

        drawn = self.suggest(trial_id)  # (which notes the trial as made)
        if space_values(drawn, self.domain.params) != values:
            self._get_hyperopt_trial(trial_id)["state"] = hyperopt.JOB_STATE_ERROR  # (Trials holds a copy)
            self._hpopt_trials.refresh()
            point = dict(values)
            self._convert_categories_to_indices(point)  # hyperopt holds a choice as its index
            doc = generate_trial(self._hpopt_trials.new_trial_ids(1)[0], point)
            self._hpopt_trials.insert_trial_docs([doc])
            self._hpopt_trials.refresh()
            self._live_trial_mapping[trial_id] = (doc["tid"], doc)
        _note(trial_id, "HyperOpt")
        return True

    def _holds(self, trial_id: str) -> bool:
        return trial_id in self._live_trial_mapping  # (Ray's forgets a trial when it ends)

    _holds_open = _holds


class RestorableBOHB(_FollowsRestore, _RemembersMade, TuneBOHB):
    """TuneBOHB whose restored copy can adopt a trial it never suggested (its values, for the model's
    observations at the trial's milestones), and that skips a trial it does not hold instead of failing."""

    def adopt(self, trial_id: str, config: dict[str, Any]) -> bool:
        if trial_id in self._made() or trial_id in self.trial_to_params or self._space is None:
            return False
        values = space_values(config, self._space.keys())
        if values is None:
            return False
        self.trial_to_params[trial_id] = values
        self._made().add(trial_id)
        _note(trial_id, "BOHB")
        return True

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.trial_to_params:
            super().on_trial_result(trial_id, result)
        else:
            logger.warning("BOHB holds no trial %s: its result is not told to the searcher", trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.trial_to_params.setdefault(trial_id, {})  # (Ray's deletes it unchecked)
        super().on_trial_complete(trial_id, result=result, error=error)

    def _holds_open(self, trial_id: str) -> bool:
        return trial_id in self.trial_to_params  # (Ray's forgets a trial when it ends)
