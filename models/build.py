"""MPC's two models built by name: the stage-1 encoder and the stage-2 localization model."""
from __future__ import annotations

from .backbones import build_backbone
from .heads import build_head
from .loading import load_checkpoint
from .mpc import Stage1Model, Stage2Model

__all__ = ["build_stage1_model", "build_stage2_model"]


def build_stage1_model(
    backbone: str = "hrt_base", drop_path_rate: float = 0.2, normalize: bool = True, pretrained_path=None
) -> Stage1Model:
    """The stage-1 model; ``pretrained_path`` = a local ImageNet weights file for the backbone (loaded by name;
    ``load_checkpoint`` logs its report)."""
    encoder = build_backbone(backbone, drop_path_rate)
    if pretrained_path is not None:
        load_checkpoint(getattr(encoder, "imagenet_module", encoder), pretrained_path)
    return Stage1Model(encoder, normalize)


def build_stage2_model(backbone: str = "hrt_base", head: str = "catnet", drop_path_rate: float = 0.2) -> Stage2Model:
    """The stage-2 model: backbone + localization head on the 4 fused scales."""
    encoder = build_backbone(backbone, drop_path_rate)
    return Stage2Model(encoder, build_head(head, in_channels=sum(encoder.out_channels)))
