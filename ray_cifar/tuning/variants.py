"""Tune's grid/random generator, able to make again a trial that Tune's restored trial list lacks.

Tune saves the trial list (experiment_state) and the generator's state (basic-variant-state) one after the
other and copies them into the output folder on threads, file by file. A driver that dies in between can leave
the generator's state the newer: it has made a trial that Tune's list does not hold. Tune's own generator then
never makes it again (its iterators are past it), and for a grid that point is never run. RestorableVariants
keeps what each trial was made from (its values and spec, in the saved state) and, after a restore, makes such a
trial again, under its own id, before any new one: the trial's checkpoints and recorded rows are found by that id,
so a trial that had already trained goes on from its last checkpoint. `searchers.follow_restored_trial` tells it
which trials Tune holds. (The other way round, a trial list newer than the generator, is `_skip_made` there.)

Imported only where a study runs (it subclasses Ray's classes).
"""

from __future__ import annotations

from typing import Any

from ray.tune.search import BasicVariantGenerator
from ray.tune.search.basic_variant import _TrialIterator


def trial_id(iterator: _TrialIterator, number: int) -> str:
    """The id Tune's trial iterator gives its trial NUMBER (_TrialIterator.create_trial's)."""
    return f"{iterator.uuid_prefix}{number:05d}"


class _RecordingIterator(_TrialIterator):
    """A trial iterator that keeps, by trial number, what it made each trial from."""

    made: dict[int, tuple[Any, Any]]  # set when RestorableVariants makes a Tune iterator one of these

    def create_trial(self, resolved_vars, spec):
        self.made[self.counter] = (resolved_vars, spec)
        return super().create_trial(resolved_vars, spec)

    def remake(self, number: int):
        """Trial NUMBER again, as it was made (same id, values and spec); the iterator's place is kept."""
        resolved_vars, spec = self.made[number]
        counter, self.counter = self.counter, number
        try:
            return super().create_trial(resolved_vars, spec)
        finally:
            self.counter = counter


class RestorableVariants(BasicVariantGenerator):
    """BasicVariantGenerator whose restored copy makes again, first, each trial it had made that Tune's restored
    list lacks (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._held: set[str] = set()  # the trials Tune's list holds (hold)

    def add_configurations(self, experiments) -> None:
        super().add_configurations(experiments)
        for iterator in self._iterators:
            if type(iterator) is _TrialIterator:
                iterator.__class__ = _RecordingIterator  # (the chain Tune iterates holds these same objects)
                iterator.made = {}

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        self._held = set()  # the trials Tune holds: told again, one by one, as Tune adds them back (hold)

    def hold(self, trial_ids: set[str]) -> None:
        """TRIAL_IDS are in Tune's list (searchers.follow_restored_trial, as each trial is added)."""
        self._held.update(trial_ids)

    def _lost(self) -> list[tuple[_RecordingIterator, int]]:
        """Trials made but not in Tune's list, oldest first. Only once Tune has added every restored trial (it asks
        for a new trial after that) does this list mean lost; before, it may name one still to be added back."""
        return [(it, number) for it in self._iterators if isinstance(it, _RecordingIterator)
                for number in sorted(it.made) if trial_id(it, number) not in self._held]

    def next_trial(self):
        lost = self._lost()
        if not lost:
            trial = super().next_trial()
            if trial is not None:  # Tune adds it next: a fresh study needs no word from follow_restored_trial
                self.hold({trial.trial_id})
            return trial
        if self.max_concurrent > 0 and len(self._live_trials) >= self.max_concurrent:
            return None
        iterator, number = lost[0]
        trial = iterator.remake(number)
        self._live_trials.add(trial.trial_id)
        self.hold({trial.trial_id})
        print(f"[ray_cifar] note: trial {trial.trial_id} was made after Tune's last saved trial list (the driver "
              f"died between Tune's files): made again with its own values", flush=True)
        return trial

    def is_finished(self) -> bool:
        return super().is_finished() and not self._lost()
