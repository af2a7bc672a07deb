"""Layers every backbone shares."""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["Projection"]


class Projection(nn.Module):
    """MPC's per-branch output projection: 1x1 conv (no bias), BN (eps 1e-3, momentum 0.03), ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3, momentum=0.03)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))
