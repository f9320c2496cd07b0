"""Generated input for the config loader, `--set` and the search-space language (STYLE habit 15).

Every input either loads as a Config or raises one ConfigError whose message is one line; any other
exception is a bug in the loader. Seeded and bounded (derandomize, max_examples) so that make test
runs the same few thousand inputs in a few seconds.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_cifar.config import SEARCH_KINDS, SECTIONS, Config, ConfigError
from ray_cifar.validation import load_config

def fuzz(examples: int):
    """Seeded (derandomize: the same inputs every run) and bounded; 2,000 inputs over the four tests."""
    return settings(derandomize=True, deadline=None, database=None, max_examples=examples,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

FIELDS = [f"{section}.{f.name}" for section in SECTIONS for f in dataclasses.fields(type(getattr(Config(), section)))]
names = st.one_of(st.sampled_from(FIELDS), st.sampled_from(list(SECTIONS)), st.text(max_size=12),
                  st.sampled_from(["variants", "extends", "tune.search_space", "published"]))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(["auto", "resnet", "sgd", "max", "min", "1e-3", "[1, 2]"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(names, inner, max_size=4)), max_leaves=12)
specs = st.dictionaries(names, st.one_of(st.dictionaries(st.one_of(st.sampled_from(sorted(SEARCH_KINDS)), st.text(max_size=8)),
                                                         values, min_size=1, max_size=2), values), max_size=3)


STUDY_FILE = os.path.join(tempfile.mkdtemp(prefix="ray_cifar-fuzz-"), "study.yaml")


def loads_or_one_line_error(path=None, sets=()) -> None:
    try:
        assert isinstance(load_config(path, list(sets)), Config)
    except ConfigError as e:
        message = str(e)
        assert message and "\n" not in message and "\r" not in message, message


@fuzz(400)
@given(document=st.one_of(st.dictionaries(names, values, max_size=5), values))
def test_yaml_config_files(document):
    with open(STUDY_FILE, "w") as f:
        yaml.safe_dump(document, f)
    loads_or_one_line_error(STUDY_FILE)


@fuzz(600)
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_yaml_text_that_may_not_parse(text):
    with open(STUDY_FILE, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(text)
    loads_or_one_line_error(STUDY_FILE)


@fuzz(600)
@given(key=names, raw=st.one_of(st.text(max_size=40), values.map(lambda v: yaml.safe_dump(v, default_flow_style=True))))
def test_set_values(key, raw):
    loads_or_one_line_error(sets=[f"{key}={raw}"])


@fuzz(400)
@given(space=specs)
def test_search_space_specs(space):
    loads_or_one_line_error(sets=["tune.search_space=" + yaml.safe_dump(space, default_flow_style=True)])


@pytest.mark.parametrize("assignment", ["train.epochs", "=5", "train.epochs=", "tune.search_space=[", "model.widths={a: }"])
def test_set_edge_cases(assignment):
    loads_or_one_line_error(sets=[assignment])
