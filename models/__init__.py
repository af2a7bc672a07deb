"""Models of MPC: backbones (HRFormer, timm HRNet) by name, localization heads, the stage-1/stage-2 models, and the
checkpoint files (reading, writing, loading into a model, trained stage-2 models)."""
from __future__ import annotations

from . import hrformer, hrnet_timm  # noqa: F401  the backbone modules: each registers its backbones on import
from .backbones import BACKBONES, build_backbone, register_backbone
from .build import build_stage1_model, build_stage2_model
from .checkpoint import OUR_FORMAT, CheckpointError, read_checkpoint
from .heads import HEADS, LocalizationHead, build_head
from .hrformer import HRFormer
from .hrnet_timm import TimmHRNet
from .loading import LoadReport, load_checkpoint
from .mpc import Stage1Model, Stage2Model, fuse_scales
from .registry import registry_entry_for, verify_weights
from .trained import TrainedModel, load_trained_model

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
    "TrainedModel",
    "build_backbone",
    "build_head",
    "build_stage1_model",
    "build_stage2_model",
    "fuse_scales",
    "load_checkpoint",
    "load_trained_model",
    "read_checkpoint",
    "register_backbone",
    "registry_entry_for",
    "verify_weights",
]
