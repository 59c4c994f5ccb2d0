"""DCGAN for 32x32 images (Radford et al., 2016): 5 conv layers on each side.

Generator: z (z_dim x 1 x 1) -> four ConvTranspose(4, stride 2) + BN + ReLU layers
(1 -> 2 -> 4 -> 8 -> 16 pixels) -> ConvTranspose to 3 x 32 x 32 -> tanh.
Discriminator: five Conv(4, stride 2) layers 32 -> 16 -> 8 -> 4 -> 2 -> 1, LeakyReLU(0.2),
BN on the middle three, one logit out. The paper's sigmoid + BCE is applied in the
loss as BCEWithLogits (the same maths, numerically stable); the discriminator
returns logits so that a hinge loss can use them too. No training code lives here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from cifarray.config import opt
from cifarray.errors import UserError
from cifarray.models.budget import GAN_BUDGET


@dataclass(frozen=True)
class DCGANConfig:
    """Defaults: the `paper` preset (see PRESETS)."""

    z_dim: int = opt(128, "latent size")
    g_widths: tuple[int, ...] = opt((128, 64, 32, 16), "generator channels after layers 1-4 (layer 5 makes RGB)")
    d_widths: tuple[int, ...] = opt((16, 32, 64, 128), "discriminator channels after layers 1-4 (layer 5: 1 logit)")
    d_batchnorm: bool = opt(True, "batch norm in discriminator layers 2-4 (usually off with spectral norm)")
    spectral_norm: bool = opt(False, "spectral normalisation of every discriminator conv")
    budget: ClassVar[int] = GAN_BUDGET  # trainable parameters of generator + discriminator allowed by default

    def param_count(self) -> int:
        return param_count(self)

    def over_budget(self, count: int, budget: int) -> str:
        g, d = generator_params(self), discriminator_params(self)
        return (f"DCGAN has {count:,} trainable parameters (generator {g:,} + discriminator {d:,}), over the budget "
                f"of {budget:,}; narrow --g-widths/--d-widths (or raise --param-budget)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "g_widths", tuple(int(w) for w in self.g_widths))
        object.__setattr__(self, "d_widths", tuple(int(w) for w in self.d_widths))
        if self.z_dim < 1:
            raise UserError(f"z_dim must be >= 1, got {self.z_dim}")
        for name, widths in (("g_widths", self.g_widths), ("d_widths", self.d_widths)):
            if len(widths) != 4 or min(widths) < 1:
                raise UserError(f"{name} must be 4 positive channel counts (5 conv layers), got {widths}")


def generator_params(cfg: DCGANConfig) -> int:
    """Exact trainable parameters of `Generator(cfg)`."""
    chans = (cfg.z_dim, *cfg.g_widths)
    total = sum(cin * cout * 16 + 2 * cout for cin, cout in zip(chans[:-1], chans[1:]))  # conv + BN
    return total + chans[-1] * 3 * 16 + 3  # RGB layer with bias


def discriminator_params(cfg: DCGANConfig) -> int:
    """Exact trainable parameters of `Discriminator(cfg)`."""
    d = cfg.d_widths
    total = 3 * d[0] * 16 + d[0]  # first conv has a bias (no BN after it)
    for cin, cout in zip(d[:-1], d[1:]):
        total += cin * cout * 16 + (2 * cout if cfg.d_batchnorm else cout)  # BN, or conv bias without BN
    return total + d[-1] * 16 + 1


def param_count(cfg: DCGANConfig) -> int:
    return generator_params(cfg) + discriminator_params(cfg)


class Generator(nn.Module):
    def __init__(self, cfg: DCGANConfig = DCGANConfig()):
        super().__init__()
        self.config = cfg
        chans = (cfg.z_dim, *cfg.g_widths)
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(chans[-1], 3, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        _dcgan_init(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.shape[0], -1, 1, 1))


class Discriminator(nn.Module):
    def __init__(self, cfg: DCGANConfig = DCGANConfig()):
        super().__init__()
        self.config = cfg
        sn = _spectral_norm if cfg.spectral_norm else (lambda m: m)
        d = cfg.d_widths
        layers: list[nn.Module] = [sn(nn.Conv2d(3, d[0], 4, 2, 1)), nn.LeakyReLU(0.2, True)]
        for cin, cout in zip(d[:-1], d[1:]):
            layers.append(sn(nn.Conv2d(cin, cout, 4, 2, 1, bias=not cfg.d_batchnorm)))
            if cfg.d_batchnorm:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.LeakyReLU(0.2, True))
        layers.append(sn(nn.Conv2d(d[-1], 1, 4, 2, 1)))
        self.net = nn.Sequential(*layers)
        _dcgan_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(-1)  # logits


def _dcgan_init(module: nn.Module) -> None:
    # DCGAN's N(0, 0.02) weights and N(1, 0.02) BN scales.
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            w = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
            nn.init.normal_(w, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


PRESETS = {
    # 128-d latent, 5 conv layers a side, DCGAN's halving/doubling widths: G 435,427 + D 175,313
    # = 610,740 parameters, within 2.5 % of the paper's 595,840 (the paper does not list widths).
    "paper": DCGANConfig(z_dim=128, g_widths=(128, 64, 32, 16), d_widths=(16, 32, 64, 128)),
}


def preset(name: str, **overrides) -> DCGANConfig:
    if name not in PRESETS:
        raise UserError(f"unknown DCGAN preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)
