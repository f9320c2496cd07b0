"""CIFAR-form ResNets and the model registry.

CIFAR form: a 3x3 stride-1 stem and no max-pool (32x32 inputs are too small to
downsample early), stages of BasicBlocks, the first at stride 1 and each later one
at stride 2, 1x1 projection shortcuts where the shape changes, global average
pooling, optional dropout, one linear classifier. Registry entries only set architecture arguments
(as timm's do); `create_model(name, **overrides)` builds one.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch
from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; keyword arguments that are None keep the entry's default."""
    if name not in _MODELS:
        raise KeyError(f"unknown model '{name}' (allowed: {', '.join(list_models())})")
    return _MODELS[name](**{k: v for k, v in kwargs.items() if v is not None})


def entry_defaults(name: str) -> dict[str, Any]:
    """A registry entry's own architecture arguments: what a config field left null builds."""
    return {k: p.default for k, p in inspect.signature(_MODELS[name]).parameters.items()
            if p.default is not inspect.Parameter.empty}


def describe(cfg) -> str:
    """A ModelConfig's name, with the architecture where the config makes it another than the entry's own: a log
    line said "resnet18: 5,266 parameters" of a two-stage, 8-channel network."""
    own = entry_defaults(cfg.name)
    as_tuple = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    changed = [f"{label} {list(value) if isinstance(value, (list, tuple)) else value}"
               for field, label in (("blocks", "blocks"), ("widths", "widths"), ("stem_width", "stem"))
               if (value := getattr(cfg, field)) is not None and as_tuple(value) != as_tuple(own.get(field))]
    return f"{cfg.name} ({', '.join(changed)})" if changed else cfg.name


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def create_model_from_config(cfg) -> nn.Module:
    """Build the model a ModelConfig describes (on the current default device)."""
    return create_model(cfg.name, blocks=cfg.blocks, widths=cfg.widths, stem_width=cfg.stem_width,
                        num_classes=cfg.num_classes, norm=cfg.norm, dropout=cfg.dropout)


def count_config_parameters(cfg) -> int:
    """Parameters of the model a ModelConfig describes, built on the meta device (no memory, milliseconds)."""
    with torch.device("meta"):
        return count_parameters(create_model_from_config(cfg))


def norm_groups(channels: int) -> int:
    """GroupNorm's groups for a layer of `channels`: 8, or one a channel below 8 (channels must divide evenly)."""
    return min(8, channels)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        # GroupNorm normalises each image alone, so a DDP step equals a one-process step.
        return nn.GroupNorm(norm_groups(channels), channels)
    raise ValueError(f"unknown norm '{kind}'")


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = _norm(norm, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = _norm(norm, out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), _norm(norm, out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(
        self,
        blocks: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_width: int | None = None,
        num_classes: int = 10,
        norm: str = "batch",
        dropout: float = 0.0,
    ):
        super().__init__()
        if len(blocks) != len(widths):
            raise ValueError(f"blocks {tuple(blocks)} and widths {tuple(widths)} need one entry per stage")
        stem_width = stem_width or widths[0]
        self.stem = nn.Sequential(nn.Conv2d(3, stem_width, 3, 1, 1, bias=False), _norm(norm, stem_width), nn.ReLU())
        stages, in_ch = [], stem_width
        for i, (n, width) in enumerate(zip(blocks, widths)):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(in_ch if j == 0 else width, width, stride if j == 0 else 1, norm) for j in range(n)]
            stages.append(nn.Sequential(*stage))
            in_ch = width
        self.stages = nn.Sequential(*stages)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(self.dropout(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))


@register_model
def resnet(blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem_width=None, num_classes=10, norm="batch",
           dropout=0.0):
    """The configurable family: blocks and widths per stage, stem width."""
    return ResNet(blocks, widths, stem_width, num_classes, norm, dropout)


@register_model
def resnet18(blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem_width=64, num_classes=10, norm="batch",
             dropout=0.0):
    """ResNet-18, CIFAR form: 11,173,962 parameters with 10 classes."""
    return ResNet(blocks, widths, stem_width, num_classes, norm, dropout)
