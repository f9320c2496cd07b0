"""The search space (`tune.search_space`): which fields are searched, and setting a sampled value.

A key is a "section.field", a whole "section" (its values are dicts of that section's fields),
or "variants" (its values are dicts of any "section.field" keys: hand-picked whole runs).
Checking each value needs the registries: that is ray_cifar.validation's job.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any, Callable, Iterator

from .loading import apply_overrides, flatten, set_value
from .schema import METADATA, VARIANTS, Config, ConfigError


def _fields_per_value(key: str, spec: dict[str, Any]) -> list[list[str]]:
    """The 'section.field' names each value of one search-space entry sets: a field's one name; each dict of a
    grid or choice over a section or `variants`; none for a section searched otherwise."""
    kind, values = next(iter(spec.items()))
    if "." in key:
        return [[key]]
    if kind not in ("grid", "choice"):
        return []
    return [list(flatten(v)) if key == VARIANTS else [f"{key}.{k}" for k in v] for v in values]


def search_keys(search_space: dict[str, Any]) -> list[str]:
    """The searched fields as flat 'section.field' names (section keys expand to their fields)."""
    keys: list[str] = []
    for key, spec in search_space.items():
        for names in _fields_per_value(key, spec):
            keys += [k for k in names if k not in keys]
    return keys


def partly_searched(search_space: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """The searched fields that only some values of a grid or choice over a section or `variants` set (a variant
    that leaves train.epochs to the config): {key: (values that set it, values)}. The trials of the others get
    the config's value, a --set's included. A field some entry sets in every value (or searches itself) is not
    here."""
    every: set[str] = set()
    some: dict[str, tuple[int, int]] = {}
    for key, spec in search_space.items():
        named = _fields_per_value(key, spec)
        for k in set().union(*named):
            n = sum(k in names for names in named)
            if n == len(named):
                every.add(k)
            else:
                some.setdefault(k, (n, len(named)))
    return {k: v for k, v in some.items() if k not in every}


def apply_searched(cfg: Config, key: str, value: Any) -> None:
    """Set one search-space entry's value: a field, a section dict, or a variant (dict of fields)."""
    if key in METADATA:
        raise ConfigError(f"{key}: metadata, not a searchable field")
    if key != VARIANTS:
        set_value(cfg, key, value)
        return
    if not isinstance(value, dict):
        raise ConfigError(f"{VARIANTS}: expected a mapping of section.field keys, got {value!r}")
    for k, v in flatten(value).items():
        if k.split(".")[0] == "tune":
            raise ConfigError(f"{k}: the tune section cannot be part of a variant")
        if k in METADATA:
            raise ConfigError(f"{k}: metadata cannot be part of a variant")
        set_value(cfg, k, v)


# A trial's Tune config may carry, beside its sampled values, its PBT lineage (ray_cifar.tuning.pbt writes it on
# exploit) and choices that a model-based searcher only takes as text (ray_cifar.tuning.searchers encodes them).
LINEAGE = "pbt_lineage"
MODEL_BASED_SEARCHERS = ("optuna", "hyperopt", "bohb")  # tune.search values that draw trials from the results so far
ENCODED = "json:"


def encode_choice(value: Any) -> Any:
    """A choice as every model-based searcher can hold it: numbers and strings as they are, else (lists, dicts,
    booleans, None) JSON text."""
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return value
    return ENCODED + json.dumps(value, sort_keys=True)


def split_sampled(sampled: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the sampled values, decoded; the PBT lineage or {}) of a trial's Tune config."""
    values = {k: _decode(v) for k, v in sampled.items() if k != LINEAGE}
    return values, dict(sampled.get(LINEAGE) or {})


def _decode(value: Any) -> Any:
    if isinstance(value, str):
        return json.loads(value[len(ENCODED):]) if value.startswith(ENCODED) else str(value)
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return value.item()  # a searcher's numpy scalar (BOHB's), as the plain number a field takes
    return value


def sampled_config(base: dict[str, Any], sampled: dict[str, Any]) -> Config:
    """A trial's config, unchecked: the study's resolved config plus its sampled values, no search space."""
    cfg = Config()
    apply_overrides(cfg, base)
    for key, value in split_sampled(sampled)[0].items():
        apply_searched(cfg, key, value)
    cfg.tune.search_space = {}
    return cfg


RANGE_KINDS = ("uniform", "loguniform", "randint")


def map_searched(cfg: Config, fn: Callable[[str, Any], Any]) -> None:
    """Replace every grid/choice value of the search space by fn('section.field', value), in place, and both ends
    of a range (uniform, loguniform, randint of a flat key): --budget-scale and --smoke-test left ranges as they
    were (train.epochs: {randint: [50, 100]} ran 50-100 epochs in a smoke test). A range whose ends become one
    value is that value ({choice: [v]}).

    Flat keys, the fields inside section dicts and the keys inside variants are all visited;
    values that become equal are kept once.
    """
    def one(key: str, value: Any) -> Any:
        if key == VARIANTS and isinstance(value, dict):
            return {k: one(str(k), v) for k, v in value.items()}
        if "." not in key and isinstance(value, dict):
            return {k: fn(f"{key}.{k}", v) for k, v in value.items()}
        return fn(key, value)

    for key, spec in cfg.tune.search_space.items():
        if isinstance(spec, dict) and len(spec) == 1:
            kind, values = next(iter(spec.items()))
            if kind in ("grid", "choice") and isinstance(values, list):
                mapped = [one(key, v) for v in values]
                spec[kind] = [v for i, v in enumerate(mapped) if v not in mapped[:i]]
            elif kind in RANGE_KINDS and isinstance(values, list) and len(values) == 2 and "." in key:
                low, high = fn(key, values[0]), fn(key, values[1])
                if low < high:
                    spec[kind] = [low, high]
                else:
                    cfg.tune.search_space[key] = {"choice": [low]}


def grid_size(cfg: Config) -> int:
    """Trials per sample: the product of the grid lengths (choice and ranges draw one value per sample)."""
    return math.prod(len(values) for spec in cfg.tune.search_space.values()
                     for kind, values in spec.items() if kind == "grid")


def search_points(search_space: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every combination of the listed values of each key (grid and choice values, both ends of a range):
    what any trial of the study can be given, for checks before the study starts."""
    keys = list(search_space)
    listed = [next(iter(search_space[key].values())) for key in keys]
    for values in itertools.product(*listed):
        yield dict(zip(keys, values))


def trial_configs(cfg: Config) -> Iterator[tuple[dict[str, Any], Config]]:
    """(sampled values, trial config) for every trial the study can give (see search_points): sections,
    variants and flat keys alike; without a search space, ({}, cfg) itself."""
    if not cfg.tune.search_space:
        yield {}, cfg
        return
    base = cfg.to_dict()
    base["tune"]["search_space"] = {}
    for sampled in search_points(cfg.tune.search_space):
        yield sampled, sampled_config(base, sampled)


# Fields whose new value can take effect in a running training state from the next epoch: the optimizer's
# (checkpoint.restore keeps them over the donor's), the loss's, the model's dropout (no weights), and the
# augmentation strengths (the loader is built from the config). Architecture, batch size, schedule shape
# and length are not: the donor's state would not fit them.
PBT_MUTABLE = frozenset({
    "optim.lr", "optim.weight_decay", "optim.momentum", "optim.lookahead_alpha", "train.label_smoothing",
    "model.dropout", "data.flip_p", "data.crop_padding", "data.erasing_p", "data.cutout_size", "data.cutout_p",
    "data.mixup_alpha", "data.mixup_p", "data.cutmix_alpha", "data.cutmix_p", "data.jitter_brightness",
    "data.jitter_contrast", "data.jitter_saturation", "data.jitter_hue", "data.rotation_degrees", "data.autoaugment",
})


def pbt_mutated_keys(cfg: Config) -> list[str]:
    """tune.pbt_mutate, or every mutable searched field; ConfigError (one line) for what cannot be perturbed."""
    space = cfg.tune.search_space
    if cfg.tune.pbt_mutate is None:
        keys = [k for k in space if k in PBT_MUTABLE]
        if not keys:
            raise ConfigError(f"tune.scheduler: {cfg.tune.scheduler} needs a searched field it can perturb "
                              f"(one of {', '.join(sorted(PBT_MUTABLE))}) in tune.search_space, or tune.pbt_mutate")
        return keys
    for key in cfg.tune.pbt_mutate:
        if key not in space:
            raise ConfigError(f"tune.pbt_mutate: {key!r} is not a key of tune.search_space (its entry gives the "
                              f"values explored)")
        if key not in PBT_MUTABLE:
            raise ConfigError(f"tune.pbt_mutate: {key!r} cannot change in a running training state (the donor's "
                              f"weights, optimizer and schedule would not fit it); perturbable: "
                              f"{', '.join(sorted(PBT_MUTABLE))}")
    if not cfg.tune.pbt_mutate:
        raise ConfigError("tune.pbt_mutate: empty; null perturbs every mutable searched field")
    return list(cfg.tune.pbt_mutate)
