"""Activation checkpointing for HRFormer training: keep a region's inputs, recompute its activations in backward.

A training step's memory is dominated by the activations autograd keeps for backward (at 512², about 12.7 GB per
image for HRT-B's two views). With checkpointing, each chosen region — every transformer block, or every
high-resolution module (its branches and their fusion) — keeps only its inputs during the forward and runs again,
region by region, during the backward. The step computes exactly what it computed before:

- DropPath draws are replayed: ``torch.utils.checkpoint`` saves the random state when a region starts and restores
  it for the recomputation (``preserve_rng_state=True``), so the recomputed region drops the same samples as the
  forward did, and the global random stream after the step is the plain step's;
- BatchNorm running statistics are updated once per forward, not again by the recomputation: a train-mode BN layer
  updates its running mean, variance and ``num_batches_tracked`` each time it runs, so the recomputation would
  update them a second time (a two-view step: four updates instead of two). Each region's BN buffers are therefore
  put back, after its recomputation, to what they held before it. The recomputation itself runs the forward's code
  unchanged (same kernels, batch statistics as in the forward), so its activations equal the forward's bit for bit
  on a deterministic device.

The recomputation also runs under the forward's autocast state (AMP), and it works inside DDP (non-reentrant
checkpointing) and with channels_last; tests/test_activation_checkpointing.py compares each with the plain step.

Switched on by class: a chosen module's class becomes a subclass of its own (``CheckpointedTransformerBlock`` for a
``TransformerBlock``) whose forward runs the original under the checkpoint. Parameter and buffer names are unchanged,
so checkpoints load either way; ``isinstance`` still holds; ``"off"`` restores the original classes. Eval mode and
forwards without gradients (validation, a frozen stage-2 backbone) run the plain forward.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .hrformer import HighResolutionModule, HRFormer, TransformerBlock

__all__ = ["GRANULARITIES", "CheckpointedHighResolutionModule", "CheckpointedTransformerBlock",
           "checkpointed_regions", "set_activation_checkpointing"]

GRANULARITIES = ("off", "block", "module")


def _batchnorm_buffers(region: nn.Module) -> list[torch.Tensor]:
    """Every running statistic a train-mode forward of ``region`` updates (mean, variance, batch count)."""
    buffers = []
    for layer in region.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats:
            buffers += [b for b in (layer.running_mean, layer.running_var, layer.num_batches_tracked) if b is not None]
    return buffers


@contextlib.contextmanager
def _batchnorm_statistics_restored(region: nn.Module):
    """Run the recomputation, then put the region's BN running statistics back to what they were before it.

    Restoring (rather than switching tracking off) keeps the recomputation on the forward's exact code path; the
    ``finally`` also covers the checkpoint's early stop, which ends a recomputation by raising once every needed
    tensor exists again.
    """
    buffers = _batchnorm_buffers(region)
    with torch.no_grad():
        saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


class _RecomputedInBackward:
    """Mixin placed before a module class: in training with gradients on, its forward runs under the checkpoint."""

    def forward(self, *inputs):
        plain_forward = super().forward
        if not (self.training and torch.is_grad_enabled()):
            return plain_forward(*inputs)
        if torch.compiler.is_compiling():
            # Traced by torch.compile (RUNTIME.COMPILE), the region becomes part of one functional graph: its BN
            # buffer updates are applied once, in the forward, and the backward recomputes values only, with the
            # random draws replayed by the compiler; a custom context_fn cannot be traced.
            return checkpoint(plain_forward, *inputs, use_reentrant=False)
        return checkpoint(plain_forward, *inputs, use_reentrant=False, preserve_rng_state=True,
                          context_fn=lambda: (contextlib.nullcontext(), _batchnorm_statistics_restored(self)))


class CheckpointedTransformerBlock(_RecomputedInBackward, TransformerBlock):
    """A ``TransformerBlock`` whose activations are recomputed in backward (granularity ``block``)."""


class CheckpointedHighResolutionModule(_RecomputedInBackward, HighResolutionModule):
    """A ``HighResolutionModule`` (branches + fusion) recomputed in backward as one region (granularity ``module``)."""


# granularity -> (plain class, checkpointed class) of the regions it recomputes
_REGION_CLASSES = {
    "block": (TransformerBlock, CheckpointedTransformerBlock),
    "module": (HighResolutionModule, CheckpointedHighResolutionModule),
}


def _restore_plain_classes(model: nn.Module) -> None:
    for plain, checkpointed in _REGION_CLASSES.values():
        for module in model.modules():
            if type(module) is checkpointed:
                module.__class__ = plain


def set_activation_checkpointing(model: nn.Module, granularity: str) -> int:
    """Recompute the HRFormer regions of ``model`` named by ``granularity`` in backward; the number of regions.

    ``block``: every transformer block (many small regions: the fusion layers between them keep their activations,
    and one block's activations are alive at a time in backward); ``module``: every high-resolution module, its
    blocks on all branches and their fusion as one region (fewer, larger regions: less is kept between them, and one
    whole module's activations are alive at a time in backward). ``off``: every region back to its plain class.
    Applies to every HRFormer inside ``model`` (a stage-1 or stage-2 model); a model without one cannot be
    checkpointed here and raises ``ValueError``.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"activation checkpointing must be one of {GRANULARITIES}, not {granularity!r}")
    _restore_plain_classes(model)
    if granularity == "off":
        return 0
    if not any(isinstance(m, HRFormer) for m in model.modules()):
        raise ValueError("activation checkpointing is implemented for HRFormer backbones (hrt_*) only; this model "
                         "has none: set RUNTIME.ACTIVATION_CHECKPOINTING off")
    plain, checkpointed = _REGION_CLASSES[granularity]
    regions = [m for m in model.modules() if type(m) is plain]
    for module in regions:
        module.__class__ = checkpointed
    return len(regions)


def checkpointed_regions(model: nn.Module) -> int:
    """How many modules of ``model`` are recomputed in backward."""
    return sum(isinstance(m, _RecomputedInBackward) for m in model.modules())
