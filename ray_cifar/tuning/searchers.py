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


def create_search_alg(cfg: Config, max_concurrent: int | None = None):
    """The search algorithm of tune.search: for grid and random, Tune's own generator (RestorableVariants) with
    its limit of MAX_CONCURRENT trials at once; else the searcher, which Tune wraps in its limiter (Tuner's
    max_concurrent_trials: model_based_limit). Metric, mode and the space come from the Tuner. Each is seeded by
    train.seed: a random or PBT study drew other values (and its replicates other seeds) at every run."""
    search = cfg.tune.search
    if search not in MODEL_BASED:
        from .variants import RestorableVariants

        return RestorableVariants(max_concurrent=max_concurrent or 0, random_state=cfg.train.seed)
    try:
        from .restorable_searchers import RestorableBOHB, RestorableHyperOpt, RestorableOptuna

        if search == "hyperopt":
            return RestorableHyperOpt(random_state_seed=cfg.train.seed)
        return (RestorableOptuna if search == "optuna" else RestorableBOHB)(seed=cfg.train.seed)
    except (ImportError, AssertionError) as e:  # Ray's searchers assert their package is there
        raise ConfigError(f"tune.search: {search} needs {_PACKAGES[search]} ({e}): "
                          f"pip install 'ray_cifar[search]'") from None


def model_based_limit(cfg: Config, max_concurrent: int | None) -> int | None:
    """Tuner's max_concurrent_trials: a model-based searcher's limit (Tune wraps it in a ConcurrencyLimiter). A grid
    or random generator holds its own (create_search_alg); Tune would only warn that it ignores this one."""
    return max_concurrent if cfg.tune.search in MODEL_BASED else None


def base_searcher(search_alg):
    """The searcher inside Tune's wrappers (SearchGenerator, ConcurrencyLimiter): the one that holds the model."""
    while hasattr(search_alg, "searcher"):
        search_alg = search_alg.searcher
    return search_alg


def follow_restored_trial(tune_controller, trial) -> None:
    """Make Tune's search algorithm agree with Tune's trials; the schedulers call it as each trial is added. A new
    trial is already known everywhere (nothing changes); after a restore the search algorithm's state may not be.

    Tune writes the trial list and the search algorithm's state one after the other, and copies them into the
    output folder on threads, file by file, so a dead driver can leave either one the newer. Tune's trial list is
    what the study goes on from, so as each trial is added back:
    - the trial count is Tune's (else one trial too many, or too few, for tune.num_samples);
    - a grid or random generator skips the trials Tune already has (else it makes one again, under the same id);
    - the concurrency limit counts Tune's unfinished trials only: not a trial that ended since the save, nor one
      made after Tune's list was written (a slot held by a trial that never ends again stops the study from
      making new ones: a study of one trial at a time waited for ever);
    - a model-based searcher adopts a trial it never saw (see restorable_searchers), and is told of the end of
      a trial that ended since, with its last result. Tune adds the restored trials back newest result first;
      Optuna and HyperOpt, which draw a lost suggestion again, adopt them in creation order;
    - a grid or random generator (RestorableVariants) learns which trials Tune has, so that it makes again one
      it made after Tune's list was written (else lost with the driver: a grid point never run)."""
    from ray.tune.experiment import Trial
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchGenerator
    from ray.tune.utils import flatten_dict

    alg = getattr(tune_controller, "search_alg", None)
    if not isinstance(alg, (BasicVariantGenerator, SearchGenerator)):
        return
    known = {t.trial_id for t in tune_controller.get_trials()}  # (Tune adds a trial before telling the scheduler)
    ended = trial.status in (Trial.TERMINATED, Trial.ERROR)
    if isinstance(alg, BasicVariantGenerator):
        _follow(alg._live_trials, known, trial.trial_id, ended)
        _skip_made(alg, known)
        getattr(alg, "hold", lambda _: None)(known)  # RestorableVariants: which trials Tune has
        return
    # Restored trials are added one by one, before any new one is made: this count ends at the restored ones.
    alg._counter = len(known)
    limiter = alg.searcher if isinstance(alg.searcher, ConcurrencyLimiter) else None
    if limiter is not None:
        _follow(limiter.live_trials, known, trial.trial_id, ended)
        limiter.num_unfinished_live_trials = len(limiter.live_trials)
    end = (flatten_dict(trial.last_result or {}), trial.status == Trial.ERROR) if ended else None
    getattr(base_searcher(alg), "restored", lambda *_: None)(trial.trial_id, trial.config, creation_order(trial), end)


def _follow(live: set[str], known: set[str], trial_id: str, ended: bool) -> None:
    """A concurrency limit's running trials: TRIAL_ID in or out, and none that Tune does not have. (While the
    restored trials are being added, one not added yet is dropped here and put back when it is.)"""
    live.intersection_update(known)
    (live.discard if ended else live.add)(trial_id)


def creation_order(trial) -> tuple[int, str]:
    """Tune's experiment tag starts with the trial's number in creation order ("3_optim.lr=..."), kept on restore."""
    head = str(getattr(trial, "experiment_tag", "")).split("_", 1)[0]
    return (int(head) if head.isdigit() else 10**9, trial.trial_id)


def _skip_made(generator, known: set[str]) -> None:
    """Move a grid or random generator's trial iterators past the trial ids Tune already has (an iterator names
    its trials PREFIX00000, PREFIX00001, ... in order)."""
    from .variants import trial_id

    for iterator in generator._iterators:
        while trial_id(iterator, iterator.counter) in known:
            try:
                next(iterator)
            except StopIteration:
                break
