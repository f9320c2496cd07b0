"""A study's trials without Ray: its search space expanded into per-trial values exactly as Ray Tune does it.

`expand_trials(cfg.tune.search_space, cfg.tune.num_samples, seed)` returns, in Tune's order, the dicts Tune
hands each trial (the `sampled` of `ray_cifar.config.trial_config(base, sampled)`). Tune's rules, from
`ray.tune.search.variant_generator` (BasicVariantGenerator, the default search algorithm):

- num_samples passes over the whole grid; within a pass, the grid keys are sorted by name and the
  FIRST key varies fastest (a cross product; whole-section and `variants` grids are one key each);
- choice / uniform / loguniform / randint are drawn afresh for every grid point, in the search space's
  key order, from one numpy Generator for the whole study (Tune's `random_state`, here `seed`).

With the same seed, BasicVariantGenerator(random_state=seed) draws the same values (tested against
generate_variants in tests/test_studies.py). Pure: numpy only, no Ray.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import numpy as np

from ray_cifar.config import VARIANTS, flatten


def expand_trials(search_space: dict[str, Any], num_samples: int = 1, seed: int | None = None) -> list[dict[str, Any]]:
    """Every trial's searched values ({search-space key: value}), in the order Tune starts them."""
    rng = np.random.default_rng(seed)
    kinds = {key: next(iter(spec)) for key, spec in search_space.items()}  # one kind per key (config validates)
    grid_keys = sorted(k for k in search_space if kinds[k] == "grid")
    drawn_keys = [k for k in search_space if kinds[k] != "grid"]
    # itertools.product varies its LAST argument fastest; Tune varies the first sorted key fastest.
    grid_values = [search_space[k]["grid"] for k in reversed(grid_keys)]
    trials = []
    for _ in range(num_samples):
        for point in itertools.product(*grid_values):
            values = dict(zip(reversed(grid_keys), point))
            values.update({k: _draw(kinds[k], search_space[k][kinds[k]], rng) for k in drawn_keys})
            trials.append(copy.deepcopy({k: values[k] for k in search_space}))
    return trials


def searched_fields(sampled: dict[str, Any]) -> dict[str, Any]:
    """One trial's searched values as flat 'section.field' -> value (what its trial config must hold)."""
    fields: dict[str, Any] = {}
    for key, value in sampled.items():
        if key == VARIANTS:
            fields.update(flatten(value))
        elif "." not in key:  # a whole section: a dict of its fields
            fields.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            fields[key] = value
    return fields


def _draw(kind: str, values: list, rng: np.random.Generator) -> Any:
    # The same calls, in the same order, as ray.tune.search.sample's samplers, so a seed means the same draws.
    if kind == "choice":
        return values[int(rng.choice(np.arange(len(values)), size=1)[0])]
    if kind == "uniform":
        return float(rng.uniform(values[0], values[1], size=1)[0])
    if kind == "loguniform":
        return float(np.exp(rng.uniform(np.log(values[0]), np.log(values[1]), size=1))[0])
    if kind == "randint":  # [low, high] inclusive, as ray_cifar.tuning.study.to_param_space passes high + 1 to Tune
        return int(rng.integers(values[0], values[1] + 1, size=1)[0])
    raise ValueError(f"unknown search kind {kind!r}")
