"""Stage-2 localization heads: a per-pixel MLP of 1x1 convolutions on the fused 1024-channel features."""
from __future__ import annotations

import torch
import torch.nn as nn

from utils.config import ConfigError

__all__ = ["HEADS", "LocalizationHead", "build_head"]

# Hidden widths of each head. "catnet" is the head of the released CATNet-protocol weights; "casiav2" adds the
# 128->64 layer of the CASIAv2-protocol weights (docs/MPC_SPEC.md §4, §9.14).
HEADS: dict[str, tuple[int, ...]] = {
    "catnet": (512, 256, 128),
    "casiav2": (512, 256, 128, 64),
}


class LocalizationHead(nn.Module):
    """BN, ReLU, then [1x1 conv, BN, ReLU] per hidden width, then a 1x1 conv to one logit.

    The layers live in ``classifier`` (an ``nn.Sequential``) so that the parameter names equal the official
    ``decoder.classifier.{0,2,3,5,...}``.
    """

    def __init__(self, in_channels: int, hidden: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = [nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True)]
        width = in_channels
        for out in hidden:
            layers += [nn.Conv2d(width, out, kernel_size=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            width = out
        layers.append(nn.Conv2d(width, 1, kernel_size=1))
        self.classifier = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


def build_head(name: str, in_channels: int = 1024) -> LocalizationHead:
    if name not in HEADS:
        raise ConfigError(f"unknown head {name!r}; choose from {sorted(HEADS)}")
    return LocalizationHead(in_channels, HEADS[name])
