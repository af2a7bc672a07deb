"""The backbone registry: every backbone MPC can train, by name.

A backbone is an ``nn.Module`` whose ``forward(x)`` returns 4 maps of 256 channels at strides 4, 8, 16 and 32, with
``out_channels`` listing their widths (build them with ``models.layers.Projection``). Its factory takes the maximum
rate of the stochastic regulariser that makes MPC's two stage-1 views differ. A backbone whose ImageNet weights are
named relative to an inner module exposes that module as ``imagenet_module``.

Adding one: a file in ``models/`` that calls ``register_backbone(name, factory)``, and its name in the import line of
``models/__init__.py``.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from utils.config import ConfigError

__all__ = ["BACKBONES", "COARSEST_STRIDE", "build_backbone", "register_backbone"]

COARSEST_STRIDE = 32  # of every backbone's last map: inputs whose sides are multiples of it halve exactly 4 times

BACKBONES: dict[str, Callable[[float], nn.Module]] = {}


def register_backbone(name: str, factory: Callable[[float], nn.Module]) -> None:
    if name in BACKBONES:
        raise ValueError(f"backbone {name!r} is registered twice")
    BACKBONES[name] = factory


def build_backbone(name: str = "hrt_base", drop_path_rate: float = 0.2) -> nn.Module:
    """A registered backbone; ``drop_path_rate`` = the maximum DropPath rate for HRFormer, the ``Dropout2d`` rate
    before the projections for timm HRNets."""
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; choose from {list(BACKBONES)}")
    return BACKBONES[name](drop_path_rate)
