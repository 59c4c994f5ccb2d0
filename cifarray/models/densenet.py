"""DenseNet for 32x32 images (Huang et al., 2017), sized for a 100k-parameter budget.

Layout: 3x3 stem conv -> dense blocks (each layer BN -> ReLU -> [1x1 conv to 4k ->
BN -> ReLU ->] 3x3 conv to k new channels, concatenated to its input) joined by
transitions (BN -> ReLU -> 1x1 conv to floor(theta * c) -> 2x2 average pool) ->
BN -> ReLU -> global average pool -> linear. No training code lives here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn

from cifarray.config import opt
from cifarray.errors import UserError
from cifarray.models.budget import CLASSIFIER_BUDGET

MAX_BLOCKS = 6  # each transition halves 32x32; after a 6th block the map would be 1x1


@dataclass(frozen=True)
class DenseNetConfig:
    """Defaults: the paper model (99,735 parameters)."""

    growth_rate: int = opt(8, "DenseNet growth rate k: channels each layer adds")
    blocks: tuple[int, ...] = opt((5, 5, 5, 5), "layers per dense block")
    init_channels: int | None = opt(31, "stem channels (paper reconstruction: 31; none = 2k, as in the DenseNet "
                                        "paper)")
    bottleneck: bool = opt(True, "1x1 bottleneck convs to 4k before each 3x3 conv (DenseNet-BC)")
    compression: float = opt(0.5, "transition compression theta: transitions keep floor(theta * channels)")
    dropout: float = opt(0.0, "dropout after each conv inside the blocks")
    num_classes: int = 100
    in_channels: int = 3
    budget: ClassVar[int] = CLASSIFIER_BUDGET  # trainable parameters allowed by default

    def param_count(self) -> int:
        return param_count(self)

    def over_budget(self, count: int, budget: int) -> str:
        return (f"DenseNet (growth rate {self.growth_rate}, blocks {','.join(map(str, self.blocks))}) has {count:,} "
                f"trainable parameters, over the budget of {budget:,}; lower --growth-rate or use fewer layers in "
                "--blocks (or raise --param-budget)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
        if self.growth_rate < 1:
            raise UserError(f"growth rate must be >= 1, got {self.growth_rate}")
        if not 1 <= len(self.blocks) <= MAX_BLOCKS or min(self.blocks) < 1:
            raise UserError(f"blocks must be 1..{MAX_BLOCKS} dense blocks of >= 1 layer each, got {self.blocks}")
        if self.init_channels is not None and self.init_channels < 1:
            raise UserError(f"init channels must be >= 1, got {self.init_channels}")
        if not 0 < self.compression <= 1:
            raise UserError(f"compression must be in (0, 1], got {self.compression}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def stem_channels(self) -> int:
        return self.init_channels if self.init_channels is not None else 2 * self.growth_rate


def _transition_out(c: int, theta: float) -> int:
    return max(1, math.floor(theta * c + 1e-9))  # 1e-9: 0.5 * 56 must not floor to 27


def param_count(cfg: DenseNetConfig) -> int:
    """Exact trainable parameters of `DenseNet(cfg)`, without building it (a few microseconds)."""
    k = cfg.growth_rate
    c = cfg.stem_channels
    total = 9 * cfg.in_channels * c  # stem conv, no bias (BN follows)
    for i, layers in enumerate(cfg.blocks):
        # Layer j sees c + j*k channels: sum over j of (BN 2 + conv weights per input channel) ...
        inputs = layers * c + k * layers * (layers - 1) // 2
        if cfg.bottleneck:
            total += inputs * (2 + 4 * k) + layers * (2 * 4 * k + 9 * 4 * k * k)
        else:
            total += inputs * (2 + 9 * k)
        c += layers * k
        if i < len(cfg.blocks) - 1:
            out = _transition_out(c, cfg.compression)
            total += 2 * c + c * out
            c = out
    return total + 2 * c + c * cfg.num_classes + cfg.num_classes


class _DenseLayer(nn.Module):
    def __init__(self, cin: int, k: int, bottleneck: bool, dropout: float):
        super().__init__()
        parts: list[nn.Module] = [nn.BatchNorm2d(cin), nn.ReLU(inplace=True)]
        if bottleneck:
            parts += [nn.Conv2d(cin, 4 * k, 1, bias=False), nn.BatchNorm2d(4 * k), nn.ReLU(inplace=True)]
            cin = 4 * k
        parts.append(nn.Conv2d(cin, k, 3, padding=1, bias=False))
        if dropout:
            parts.append(nn.Dropout(dropout))
        self.body = nn.Sequential(*parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


class DenseNet(nn.Module):
    def __init__(self, cfg: DenseNetConfig = DenseNetConfig()):
        super().__init__()
        self.config = cfg
        k, c = cfg.growth_rate, cfg.stem_channels
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, c, 3, padding=1, bias=False)]
        for i, n in enumerate(cfg.blocks):
            for _ in range(n):
                layers.append(_DenseLayer(c, k, cfg.bottleneck, cfg.dropout))
                c += k
            if i < len(cfg.blocks) - 1:
                out = _transition_out(c, cfg.compression)
                layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, out, 1, bias=False),
                           nn.AvgPool2d(2)]
                c = out
        layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, cfg.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


PRESETS = {
    # The paper's growth rate 8 and 4 blocks x 5 layers. It does not state the rest; DenseNet-BC
    # (bottleneck, theta = 0.5) with a 31-channel stem is the one member of this family with its
    # exact count, 99,735 parameters, so this is our reconstruction of it.
    "paper": DenseNetConfig(growth_rate=8, blocks=(5, 5, 5, 5), init_channels=31, bottleneck=True, compression=0.5),
}


def preset(name: str, **overrides) -> DenseNetConfig:
    if name not in PRESETS:
        raise UserError(f"unknown DenseNet preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
