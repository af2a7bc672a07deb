"""MPC's two models: the stage-1 contrastive encoder and the stage-2 localization model."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Stage1Model", "Stage2Model", "fuse_scales"]


def fuse_scales(maps: list[torch.Tensor]) -> torch.Tensor:
    """Upsample every map to the first (finest) map's size (bilinear, align_corners=True) and concatenate."""
    size = maps[0].shape[-2:]
    resized = [maps[0]] + [F.interpolate(m, size=size, mode="bilinear", align_corners=True) for m in maps[1:]]
    return torch.cat(resized, dim=1)


class Stage1Model(nn.Module):
    """Backbone returning its 4 scale maps, L2-normalised per pixel along channels when ``normalize``."""

    def __init__(self, encoder: nn.Module, normalize: bool = True):
        super().__init__()
        self.encoder = encoder
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = self.encoder(x)
        if self.normalize:
            maps = [F.normalize(m, dim=1) for m in maps]
        return maps


class Stage2Model(nn.Module):
    """Backbone + localization head: logits (B, 1, H/4, W/4) from the fused, un-normalised scale maps."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 4 scale maps upsampled to 1/4 and concatenated: (B, 4*256, H/4, W/4)."""
        return fuse_scales(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.features(x))
