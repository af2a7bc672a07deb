"""Stage-2 losses on the head's single logit map (docs/MPC_SPEC.md §4, §9.5): the official sigmoid focal loss, and
the binary cross-entropy that the paper's text names."""
from typing import Callable

import torch
import torch.nn.functional as F

from utils.config import ConfigError


def _logits_and_target(logits: torch.Tensor, target: torch.Tensor, caller: str):
    """B×h×w float32 (or float64) logits and a target of the same size (nearest-resized if it differs)."""
    if logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(f"{caller}: logits must be B×1×h×w, got shape {tuple(logits.shape)}")
    if target.dim() == 3:
        target = target.unsqueeze(1)
    if target.dim() != 4 or target.shape[1] != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"{caller}: target must be B×h×w or B×1×h×w with B={logits.shape[0]}, "
                         f"got shape {tuple(target.shape)}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    target = target.to(dtype)
    if target.shape[2:] != logits.shape[2:]:
        target = F.interpolate(target, size=logits.shape[2:], mode="nearest")
    return logits.squeeze(1).to(dtype), target.squeeze(1)


def sigmoid_focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.5,
                       gamma: float = 2.0) -> torch.Tensor:
    """Mean over all pixels of α_t·(1−p_t)^γ·BCE(z, y), p = σ(z), p_t = p·y + (1−p)(1−y),
    α_t = α·y + (1−α)(1−y); a negative α turns the class weighting off, as in the official code."""
    logits, target = _logits_and_target(logits, target, "sigmoid_focal_loss")
    cross_entropy = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    probability = torch.sigmoid(logits)
    p_t = probability * target + (1 - probability) * (1 - target)
    loss = cross_entropy * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.mean()


def binary_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over all pixels of BCE-with-logits (the loss the paper's text describes)."""
    logits, target = _logits_and_target(logits, target, "binary_cross_entropy")
    return F.binary_cross_entropy_with_logits(logits, target)


HEAD_LOSSES = {"focal": sigmoid_focal_loss, "bce": binary_cross_entropy}


def build_head_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The head loss called `name`: "focal" (official, α=0.5, γ=2) or "bce"."""
    if name not in HEAD_LOSSES:
        raise ConfigError(f"unknown head loss {name!r} (LOSS.HEAD); choose one of {sorted(HEAD_LOSSES)}")
    return HEAD_LOSSES[name]
