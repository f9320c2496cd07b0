"""The config package: schema, loading, presets, search space and field docs; no registries, no torch.

    schema   the dataclasses (one per section, every field with its unit), ConfigError, constants
    loading  type coercion, set_value / apply_overrides, YAML files with `extends`, --set, flatten
    presets  --smoke-test and --budget-scale
    search   the search space: searched keys, applying a sampled value, grid size; PBT's mutable fields
    docs     field docs for --help-config

Checks that need the model/optimizer registries, and the functions that return a checked
config (`load_config`, `trial_config`, `config_from_dict`), live above the registries in
ray_cifar.validation. Nothing imported here may import a registry (ray_cifar.models, optim,
augment import the schema, and so this package).
"""

from .docs import describe, field_docs
from .loading import (EXTENDS, RESOLVED_BEGIN, RESOLVED_END, apply_overrides, cut_short, flatten, load_yaml, parse_set,
                      read_config_chain, set_value, yaml_problem)
from .presets import LENGTH_KEYS, SMOKE_OVERRIDES, apply_budget_scale, apply_smoke
from .schema import (METADATA, PUBLISHED_METRICS, SEARCH_KINDS, SECTIONS, VARIANTS, Config, ConfigError, DataConfig,
                     ModelConfig, OptimConfig, ScheduleConfig, TrainConfig, TuneConfig, improves)
from .search import (LINEAGE, MODEL_BASED_SEARCHERS, PBT_MUTABLE, apply_searched, encode_choice, grid_size,
                     map_searched, partly_searched, pbt_mutated_keys, sampled_config, search_keys, search_points,
                     split_sampled, trial_configs)

__all__ = [
    "EXTENDS", "LENGTH_KEYS", "LINEAGE", "METADATA", "MODEL_BASED_SEARCHERS", "PBT_MUTABLE", "PUBLISHED_METRICS",
    "SEARCH_KINDS", "SECTIONS", "SMOKE_OVERRIDES", "VARIANTS", "Config", "ConfigError", "DataConfig", "ModelConfig", "OptimConfig", "ScheduleConfig", "TrainConfig",
    "TuneConfig", "apply_budget_scale", "apply_overrides", "apply_searched", "apply_smoke", "describe", "field_docs",
    "RESOLVED_BEGIN", "RESOLVED_END", "cut_short", "flatten", "grid_size", "improves", "load_yaml", "map_searched", "parse_set", "read_config_chain", "sampled_config", "search_keys",
    "search_points", "set_value", "trial_configs", "encode_choice", "partly_searched", "pbt_mutated_keys",
    "split_sampled", "yaml_problem",
]
