"""Models of MPC: backbones (HRFormer, timm HRNet), localization heads, stage-1/stage-2 models, weight loading."""
from __future__ import annotations

import torch.nn as nn

from .checkpoint import OUR_FORMAT, CheckpointError, LoadReport, load_checkpoint, read_checkpoint
from .heads import HEADS, LocalizationHead, build_head
from .hrformer import HRFORMER_CONFIGS, HRFormer, build_hrformer
from .hrnet_timm import TIMM_HRNETS, TimmHRNet
from .mpc import Stage1Model, Stage2Model, fuse_scales
from .registry import registry_entry_for, verify_weights

__all__ = [
    "BACKBONES",
    "HEADS",
    "OUR_FORMAT",
    "CheckpointError",
    "HRFormer",
    "LoadReport",
    "LocalizationHead",
    "Stage1Model",
    "Stage2Model",
    "TimmHRNet",
    "build_backbone",
    "build_head",
    "build_stage1_model",
    "build_stage2_model",
    "fuse_scales",
    "load_checkpoint",
    "read_checkpoint",
    "registry_entry_for",
    "verify_weights",
]

BACKBONES: tuple[str, ...] = tuple(HRFORMER_CONFIGS) + TIMM_HRNETS


def build_backbone(name: str = "hrt_base", drop_path_rate: float = 0.2) -> nn.Module:
    """A backbone returning 4 maps of 256 channels at strides 4..32.

    ``drop_path_rate`` is the stochastic regulariser that makes MPC's two views differ: the maximum DropPath
    rate for HRFormer, the ``Dropout2d`` rate before the projections for timm HRNets.
    """
    if name in HRFORMER_CONFIGS:
        return build_hrformer(name, drop_path_rate)
    if name in TIMM_HRNETS:
        return TimmHRNet(name, drop_rate=drop_path_rate)
    raise ValueError(f"unknown backbone {name!r}; choose from {list(BACKBONES)}")


def build_stage1_model(
    backbone: str = "hrt_base", drop_path_rate: float = 0.2, normalize: bool = True, pretrained_path=None
) -> Stage1Model:
    """The stage-1 model; ``pretrained_path`` = a local ImageNet weights file for the backbone (loaded by name)."""
    encoder = build_backbone(backbone, drop_path_rate)
    if pretrained_path is not None:
        # timm's classification weights are named relative to the timm model, HRFormer's to the backbone.
        # load_checkpoint logs its report.
        load_checkpoint(encoder.body if isinstance(encoder, TimmHRNet) else encoder, pretrained_path)
    return Stage1Model(encoder, normalize)


def build_stage2_model(backbone: str = "hrt_base", head: str = "catnet", drop_path_rate: float = 0.2) -> Stage2Model:
    """The stage-2 model: backbone + localization head on the 4 fused scales."""
    encoder = build_backbone(backbone, drop_path_rate)
    return Stage2Model(encoder, build_head(head, in_channels=sum(encoder.out_channels)))
