"""HRNet backbones from timm, adapted to MPC's contract: 4 maps of 256 channels at strides 4, 8, 16, 32."""
from __future__ import annotations

import timm
import torch
import torch.nn as nn

from .backbones import register_backbone
from .layers import Projection

__all__ = ["TIMM_HRNETS", "TimmHRNet"]

TIMM_HRNETS = ("hrnet_w18", "hrnet_w32", "hrnet_w48")


class TimmHRNet(nn.Module):
    """timm HRNet (``features_only``, the raw stage-4 branch maps) + feature dropout + MPC projections.

    HRNet has no stochastic depth, so ``Dropout2d(drop_rate)`` before each projection is what makes MPC's two
    stage-1 views differ. ImageNet weights are never downloaded: load a local file into ``body`` instead.
    """

    strides = (4, 8, 16, 32)

    def __init__(self, name: str = "hrnet_w18", drop_rate: float = 0.1, proj_channels: int = 256):
        super().__init__()
        if name not in TIMM_HRNETS:
            raise ValueError(f"unknown timm HRNet {name!r}; choose from {list(TIMM_HRNETS)}")
        # feature_location="" gives the branch outputs themselves (not the classification "incre" heads);
        # level 0 is the stride-2 stem, which MPC does not use.
        self.body = timm.create_model(
            name, pretrained=False, features_only=True, feature_location="", out_indices=(1, 2, 3, 4)
        )
        if tuple(self.body.feature_info.reduction()) != self.strides:
            raise RuntimeError(f"timm {name} returned strides {self.body.feature_info.reduction()}, expected {self.strides}")
        self.dropout = nn.Dropout2d(drop_rate)
        self.convs = nn.ModuleList(Projection(c, proj_channels) for c in self.body.feature_info.channels())
        self.out_channels = [proj_channels] * len(self.convs)

    @property
    def imagenet_module(self) -> nn.Module:
        """timm's classification weights are named relative to the timm model, not to this wrapper."""
        return self.body

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [proj(self.dropout(t)) for proj, t in zip(self.convs, self.body(x))]


for _name in TIMM_HRNETS:
    register_backbone(_name, lambda drop_path_rate, name=_name: TimmHRNet(name, drop_rate=drop_path_rate))
