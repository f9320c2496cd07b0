"""How trials get their values (tune.search): Tune's grid/random generator, or a model-based searcher.

    grid      every grid point x num_samples; choices and ranges drawn at random (Tune's default)
    random    every entry drawn at random (a grid is a choice), num_samples trials
    optuna    Optuna's TPE        \\
    hyperopt  HyperOpt's TPE       > the next trial's values from the results so far; num_samples trials
    bohb      BOHB (TuneBOHB)     /  with its own scheduler, HyperBandForBOHB (ray_cifar.tuning.scheduler)

The search-space language maps onto each: grid and choice become one categorical dimension (a
value that is not a number or a string, e.g. a section's dict or a variant, travels as JSON text,
decoded by `config.split_sampled`), uniform / loguniform / randint become ranges. What a
model-based searcher cannot mean is refused in one line by ray_cifar.validation: searching
train.seed (it would tune the seed; replicates are a grid study's num_samples), or PBT with it.

After a dead driver, Tune's `Tuner.restore` puts the searcher's own state back (each searcher
saves it into the experiment folder with Tune's experiment state); the finished trials are not
run again, and the searcher goes on suggesting from what it had seen. Those files are written and
copied one by one, so a driver that dies in between leaves them saying different things:
`follow_restored_trial` makes the search algorithm agree with the trials Tune restored.
"""

from __future__ import annotations

from typing import Any

from ..config import MODEL_BASED_SEARCHERS as MODEL_BASED
from ..config import Config, ConfigError, encode_choice

_PACKAGES = {"optuna": "optuna", "hyperopt": "hyperopt", "bohb": "hpbandster and ConfigSpace"}


def param_space(space: dict[str, Any], search: str = "grid") -> dict[str, Any]:
    """Tune's param_space of a search space under tune.search: a grid stays a grid only for `grid`; elsewhere
    it is a choice."""
    from ray import tune

    choice = ((lambda v: tune.choice([encode_choice(x) for x in v])) if search in MODEL_BASED else tune.choice)
    makers = {"grid": tune.grid_search if search == "grid" else choice, "choice": choice,
              "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
              "randint": lambda v: tune.randint(v[0], v[1] + 1)}
    return {key: makers[kind](values) for key, spec in space.items() for kind, values in spec.items()}


def create_search_alg(cfg: Config):
    """The searcher of tune.search (None for grid and random: Tune's own generator), seeded by train.seed.
    Metric, mode and the space come from the Tuner; tune.max_concurrent_trials wraps it in Tune's limiter."""
    search = cfg.tune.search
    if search not in MODEL_BASED:
        return None
    try:
        if search == "hyperopt":
            from ray.tune.search.hyperopt import HyperOptSearch

            return HyperOptSearch(random_state_seed=cfg.train.seed)
        from .restorable_searchers import RestorableBOHB, RestorableOptuna

        return (RestorableOptuna if search == "optuna" else RestorableBOHB)(seed=cfg.train.seed)
    except (ImportError, AssertionError) as e:  # Ray's searchers assert their package is there
        raise ConfigError(f"tune.search: {search} needs {_PACKAGES[search]} ({e}): "
                          f"pip install 'ray_cifar[search]'") from None


def base_searcher(search_alg):
    """The searcher inside Tune's wrappers (SearchGenerator, ConcurrencyLimiter): the one that holds the model."""
    while hasattr(search_alg, "searcher"):
        search_alg = search_alg.searcher
    return search_alg


def follow_restored_trial(tune_controller, trial) -> None:
    """Make Tune's search algorithm agree with TRIAL as Tune holds it; the schedulers call it as each trial is
    added. A new trial is already known everywhere (nothing changes); a restored one may not be.

    Tune writes the trial list and the search algorithm's state one after the other, and copies them into the
    output folder on threads, file by file, so a dead driver can leave either one the newer. Tune's trial list
    is what the study goes on from; where the search algorithm's saved state is older:
    - its trial count is raised to Tune's (else it makes more trials than tune.num_samples);
    - a grid or random generator skips the trials Tune already has (else it makes one again, under the same id);
    - the concurrency limit counts the unfinished trials, not the ones that ended since (slots held forever by
      trials that will never end again would stop the study from making new ones);
    - a model-based searcher adopts a trial it never saw (see restorable_searchers), and is told of a trial
      that ended since, with its last result.
    Not mended: a saved state newer than Tune's list. A trial made after the list was written is lost with the
    driver (a grid point not run, or one trial fewer than tune.num_samples)."""
    from ray.tune.experiment import Trial
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchGenerator
    from ray.tune.utils import flatten_dict

    alg = getattr(tune_controller, "search_alg", None)
    if not isinstance(alg, (BasicVariantGenerator, SearchGenerator)):
        return
    trials = tune_controller.get_trials()
    ended = trial.status in (Trial.TERMINATED, Trial.ERROR)
    if isinstance(alg, BasicVariantGenerator):
        (alg._live_trials.discard if ended else alg._live_trials.add)(trial.trial_id)
        _skip_made(alg, {t.trial_id for t in trials})
        return
    alg._counter = max(alg._counter, len(trials))
    limiter = alg.searcher if isinstance(alg.searcher, ConcurrencyLimiter) else None
    base = limiter.searcher if limiter is not None else alg.searcher
    adopted = bool(getattr(base, "adopt", lambda *_: False)(trial.trial_id, trial.config))
    was_live = limiter is not None and trial.trial_id in limiter.live_trials
    if limiter is not None and ended and was_live:
        limiter.live_trials.discard(trial.trial_id)
        limiter.num_unfinished_live_trials -= 1
    elif limiter is not None and not ended and not was_live:
        limiter.live_trials.add(trial.trial_id)
        limiter.num_unfinished_live_trials += 1
    if ended and (was_live or adopted):  # it ended after the searcher's state was saved: tell it now
        base.on_trial_complete(trial.trial_id, result=flatten_dict(trial.last_result or {}),
                               error=trial.status == Trial.ERROR)


def _skip_made(generator, known: set[str]) -> None:
    """Move a grid or random generator's trial iterators past the trial ids Tune already has (an iterator names
    its trials PREFIX00000, PREFIX00001, ... in order)."""
    for iterator in generator._iterators:
        while f"{iterator.uuid_prefix}{iterator.counter:05d}" in known:
            try:
                next(iterator)
            except StopIteration:
                break
