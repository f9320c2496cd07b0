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
run again, and the searcher goes on suggesting from what it had seen.
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
        if search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            return OptunaSearch(seed=cfg.train.seed)
        if search == "hyperopt":
            from ray.tune.search.hyperopt import HyperOptSearch

            return HyperOptSearch(random_state_seed=cfg.train.seed)
        from ray.tune.search.bohb import TuneBOHB

        return TuneBOHB(seed=cfg.train.seed)
    except (ImportError, AssertionError) as e:  # Ray's searchers assert their package is there
        raise ConfigError(f"tune.search: {search} needs {_PACKAGES[search]} ({e}): "
                          f"pip install 'ray_cifar[search]'") from None
