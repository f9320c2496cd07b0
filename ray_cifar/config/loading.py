"""From text to a Config: type coercion, `section.field` assignment, YAML files with `extends`, `--set`.

No validation beyond types here (that needs the registries: ray_cifar.validation), so this
module imports only the schema.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import re
import types
import typing
from typing import Any

import yaml

from .schema import METADATA, SECTIONS, Config, ConfigError


class StudyLoader(yaml.SafeLoader):
    """YAML as people write study files. 5e-4 is a number: YAML 1.1 (PyYAML's) reads a float without a dot as a
    string, which a float field took but a search range refused (loguniform: [1e-4, 1e-1]) and a published
    `where` never matched. A key given twice in one mapping is an error: the later one silently won, so a second
    `train:` section dropped every field of the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges; the mapping's own keys override the merged ones, as YAML says
            key = self.construct_object(key_node, deep=True)
            try:
                line = first.get(key)
            except TypeError:
                continue  # an unhashable key: the constructor below says so
            if line is not None:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"found {key!r} twice (first on line {line}); give each key once", key_node.start_mark)
            first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


StudyLoader.add_implicit_resolver(  # YAML 1.2's floats with an exponent and no dot: 5e-4, 1E6, -2e+3
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_yaml(text: str | bytes | typing.IO) -> Any:
    """yaml.safe_load with StudyLoader: every study file, --set value and config.yaml is read through this."""
    return yaml.load(text, Loader=StudyLoader)  # noqa: S506 (a SafeLoader)


def _allowed(section: str) -> str:
    names = [f.name for f in dataclasses.fields(type(getattr(Config(), section)))]
    return ", ".join(names)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a field's type hint; returns the (lightly converted) value."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}")
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_hint)}, got {value!r}")
        return [_coerce(v, item_hint, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 5e6 reads as a float: a count written that way is still that count
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            # A quoted '5e-4', or a config.yaml written from one (StudyLoader reads the plain 5e-4 as a number).
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if math.isinf(value):  # NaN: each field's range check refuses it (no comparison holds)
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _hints(section_obj: Any) -> dict[str, Any]:
    return _class_hints(type(section_obj))


@functools.lru_cache(maxsize=None)
def _class_hints(cls: type) -> dict[str, Any]:
    # get_type_hints compiles every annotation string on each call: most of a config's load time, cached.
    return typing.get_type_hints(cls)


def is_integer_field(key: str) -> bool:
    """Whether `section.field` holds an integer (or null): a range drawn for it must draw integers."""
    section, _, name = key.partition(".")
    hint = _hints(getattr(Config(), section)).get(name) if section in SECTIONS else None
    return hint is int or (typing.get_origin(hint) in (typing.Union, types.UnionType) and int in typing.get_args(hint))


def set_value(cfg: Config, key: str, value: Any) -> None:
    """Set `section.field` (or a whole `section` from a dict) with type checking."""
    if key in METADATA:  # a top-level field beside the sections (published)
        setattr(cfg, key, _coerce(copy.deepcopy(value), typing.get_type_hints(Config)[key], key))
        return
    section, _, name = key.partition(".")
    if section not in SECTIONS:
        raise ConfigError(f"unknown key '{key}' (sections: {', '.join(SECTIONS)})")
    section_obj = getattr(cfg, section)
    if not name:
        if not isinstance(value, dict):
            raise ConfigError(f"{section}: expected a mapping of its fields, got {value!r}")
        for k, v in value.items():
            set_value(cfg, f"{section}.{k}", v)
        return
    hints = _hints(section_obj)
    if name not in hints:
        raise ConfigError(f"unknown key '{key}' (allowed in {section}: {_allowed(section)})")
    setattr(section_obj, name, _coerce(copy.deepcopy(value), hints[name], key))


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> None:
    """Apply a nested ({section: {field: v}}) or flat ({"section.field": v}) mapping."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(overrides).__name__}")
    for key, value in overrides.items():
        set_value(cfg, str(key), value)


def parse_set(assignment: str) -> tuple[str, Any]:
    """'train.epochs=5' -> ('train.epochs', 5); the value is read as YAML."""
    key, eq, raw = assignment.partition("=")
    if not eq or not key.strip():
        raise ConfigError(f"--set expects section.field=value, got '{assignment}'")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


EXTENDS = "extends"  # a study file's key naming the file it builds on (relative to it), e.g. x_asha.yaml -> x.yaml


# A resolved config.yaml (cli.write_config) begins and ends with these lines: one that begins so and does not end
# so was cut short, wherever the cut fell (it still parses, every field after the cut at its default).
RESOLVED_BEGIN = "# ray_cifar's resolved config: the defaults, the study file and --set, as run; its last line ends it\n"
RESOLVED_END = "# end of the resolved config\n"


def cut_short(resolved: dict[str, Any], text: str | None = None) -> str | None:
    """Why a resolved config (a study's config.yaml, written whole by ray_cifar; TEXT: the file's) reads as cut
    short, or None: its last line missing (RESOLVED_END), a section missing, or tune without its metric and mode
    (a file written before RESOLVED_END). Truncated, it still parsed, every missing field at its default: a study of
    val_loss (min) was ranked by val_acc (max) in its report, and one cut later in tune described with no ASHA
    knobs."""
    if text is not None and text.startswith(RESOLVED_BEGIN) and not text.endswith(RESOLVED_END):
        return f"its last line, {RESOLVED_END.strip()!r}, is missing: cut short?"
    missing = [s for s in SECTIONS if not isinstance(resolved.get(s), dict)]
    if missing:
        return f"it lacks the section(s) {', '.join(missing)} that every config.yaml has: cut short?"
    lacking = [k for k in ("metric", "mode") if k not in resolved["tune"]]
    if lacking:
        return f"its tune section lacks {' and '.join(lacking)}: cut short?"
    return None


def yaml_problem(error: Exception) -> str:
    """A YAML error in one line that says where: its problem at its line and column, and what the parser was in
    (its context, where it began). str() of the error puts the context first, on lines of its own: its first line
    alone said "while parsing a flow sequence", not what was wrong, nor where. Any other error: its first line."""
    problem, mark = getattr(error, "problem", None), getattr(error, "problem_mark", None)
    if not problem:
        return (str(error).strip().splitlines() or [type(error).__name__])[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and context_mark is not None:
        context += f" from line {context_mark.line + 1}, column {context_mark.column + 1}"
    return f"{where}{problem}" + (f" ({context})" if context else "")


def read_config_chain(path: str, _seen: tuple[str, ...] = ()) -> list[tuple[str, dict[str, Any]]]:
    """The YAML mappings to apply, base first, each with its file: `extends: other.yaml` puts other.yaml's chain
    before this file."""
    if os.path.abspath(path) in _seen:
        raise ConfigError(f"{EXTENDS}: {path} extends itself (via {' -> '.join(_seen)})")
    try:
        with open(path) as f:
            overrides = load_yaml(f) or {}
    except OSError as e:
        named = f" (named by {EXTENDS}: in {_seen[-1]})" if _seen else ""
        raise ConfigError(f"cannot read config file {path}{named}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {yaml_problem(e)}") from None
    if not isinstance(overrides, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(overrides).__name__}")
    parent = overrides.pop(EXTENDS, None)
    if parent is None:
        return [(path, overrides)]
    if not isinstance(parent, str):
        raise ConfigError(f"{EXTENDS}: expected a file name, got {parent!r}")
    parent_path = os.path.join(os.path.dirname(os.path.abspath(path)), parent)
    return read_config_chain(parent_path, _seen + (os.path.abspath(path),)) + [(path, overrides)]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{section: {field: v}} -> {"section.field": v}; the search space (and any list) stays one value."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "search_space":
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
