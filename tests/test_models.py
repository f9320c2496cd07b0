"""Models: exact parameter counts of the studies' architectures, every registry entry's forward, dropout, max_params."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from ray_cifar.config import ConfigError, ModelConfig
from ray_cifar.validation import load_config
from ray_cifar.models import count_config_parameters, count_parameters, create_model, list_models

# (blocks, widths, stem width) -> parameters with 10 classes, as the studies publish them.
PUBLISHED_COUNTS = [
    ("resnet18", None, None, None, 11_173_962),
    ("resnet", [4, 5, 3], [64, 128, 256], None, 4_992_586),
    ("resnet", [1, 1, 1, 1], [64, 128, 256, 512], None, 4_903_242),
    ("resnet", [2, 2, 2, 2], [64, 128, 230, 270], None, 4_995_102),
    ("resnet", [3, 6, 4, 3], [32, 64, 128, 256], 32, 4_883_626),
]


@pytest.mark.parametrize("name, blocks, widths, stem, expected", PUBLISHED_COUNTS)
def test_parameter_counts_match_the_published_architectures(name, blocks, widths, stem, expected):
    cfg = ModelConfig(name=name, blocks=blocks, widths=widths, stem_width=stem)
    assert count_config_parameters(cfg) == expected  # meta device, as validation counts
    model = create_model(name, blocks=blocks, widths=widths, stem_width=stem)
    assert count_parameters(model) == expected  # and the real model agrees


def test_projection_shortcuts_are_1x1_convs_where_the_shape_changes():
    model = create_model("resnet", blocks=[1, 1], widths=[8, 16])
    first, second = model.stages[0][0], model.stages[1][0]
    assert isinstance(first.shortcut, nn.Identity)
    conv = second.shortcut[0]
    assert conv.kernel_size == (1, 1) and conv.stride == (2, 2) and conv.out_channels == 16


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("channels_last", [False, True])
def test_every_registry_entry_forwards_cifar_batches(name, channels_last):
    torch.manual_seed(0)
    model = create_model(name, widths=[8, 16, 32, 64], stem_width=8, num_classes=7)
    x = torch.randn(3, 3, 32, 32)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    model.eval()
    out = model(x)
    assert out.shape == (3, 7) and torch.isfinite(out).all()
    if channels_last:  # same numbers in either memory layout
        ref = create_model(name, widths=[8, 16, 32, 64], stem_width=8, num_classes=7)
        ref.load_state_dict(model.state_dict())
        assert torch.allclose(ref.eval()(x.contiguous()), out, atol=1e-5)


def test_dropout_p_before_the_classifier():
    model = create_model("resnet", blocks=[1], widths=[8], dropout=0.5)
    assert isinstance(model.dropout, nn.Dropout) and model.dropout.p == 0.5
    features = {}
    model.fc.register_forward_pre_hook(lambda m, args: features.__setitem__("x", args[0]))
    x = torch.rand(64, 3, 32, 32)
    model.train()
    model(x)
    zeros = (features["x"] == 0).float().mean().item()
    assert 0.35 < zeros < 0.65  # about half of the pooled features dropped (pooled ReLU outputs are > 0)
    model.eval()
    a, b = model(x), model(x)
    assert torch.equal(a, b) and (features["x"] != 0).float().mean() > 0.9
    assert isinstance(create_model("resnet", blocks=[1], widths=[8]).dropout, nn.Identity)


def test_dropout_is_validated():
    with pytest.raises(ConfigError, match="model.dropout"):
        load_config(None, ["model.dropout=1.0"])


def test_max_params_is_a_config_error_naming_the_count_and_fast():
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"model.max_params: the model has 11,173,962 parameters"):
        load_config(None, ["model.name=resnet18", "model.max_params=5000000"])
    assert time.perf_counter() - start < 5
    cfg = load_config(None, ["model.name=resnet", "model.blocks=[4,5,3]", "model.widths=[64,128,256]",
                             "model.max_params=5000000"])
    assert cfg.model.max_params == 5_000_000


def test_max_params_checks_every_searched_architecture():
    grid = '{grid: [{blocks: [1,1,1,1], widths: [64,128,256,512]}, {blocks: [2,2,2,2], widths: [64,128,256,512]}]}'
    with pytest.raises(ConfigError, match="tune.search_space.model.*11,173,962"):
        load_config(None, ["model.name=resnet", "model.blocks=[1,1,1,1]", "model.max_params=5000000",
                           f"tune.search_space={{model: {grid}}}"])


def test_a_model_is_described_by_its_name_and_what_the_config_changed_of_it():
    """A log line said "resnet18: 5,266 parameters" of a two-stage, 8-channel network."""
    from ray_cifar.config import ModelConfig
    from ray_cifar.models import describe

    assert describe(ModelConfig()) == "resnet18"
    assert describe(ModelConfig(blocks=[2, 2, 2, 2], widths=[64, 128, 256, 512])) == "resnet18"  # its own, written out
    assert describe(ModelConfig(blocks=[1, 1], widths=[8, 16], stem_width=8)) == \
        "resnet18 (blocks [1, 1], widths [8, 16], stem 8)"
    assert describe(ModelConfig(name="resnet", widths=[32, 64, 128, 256])) == "resnet (widths [32, 64, 128, 256])"
