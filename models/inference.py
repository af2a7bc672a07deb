"""A trained stage-2 model prepared once for fast inference: same maps up to rounding, in less time.

``prepare_for_inference(model)`` returns an ``InferenceModel``: images (B, 3, H, W) in, logits (B, 1, H/4, W/4)
float32 out, as ``model(images)`` in eval mode. The model given is never changed: the function works on a deep copy,
so the original's parameters, buffers, ``state_dict`` and train/eval mode stay as they were. The copy is for
inference only (its BatchNorm layers are folded away and its transformer blocks rebuilt): do not save its
``state_dict`` as a checkpoint.

What the preparation does, each step exact up to float rounding:

- **BatchNorm folded into the preceding convolution** where a BN layer directly takes a convolution's output (the
  conv → BN pairs of the stem, the bottlenecks, the transitions, the fusion paths, the FFNs, the projections and the
  head's hidden layers): in eval mode BN is the per-channel affine map ``(y − mean) · γ / √(var + ε) + β``, which the
  convolution's weights and bias absorb (computed in float64, stored in the model's dtype). A BN that follows no
  convolution (the head's input BN, after the upsampled concatenation) stays as it is.
- **Channels-last end to end.** Every convolution, GELU and residual add runs on (B, H, W, C) memory, and the
  transformer blocks (``FastTransformerBlock``) never convert between layouts: their FFN's 1×1 convolutions are
  plain matrix products over channels, the depth-wise 3×3 convolution reads the same memory as a channels-last
  NCHW view. (The plain blocks convert between (B, C, H, W) and (B, H, W, C) within every block, and their 1×1
  convolutions on (B, C, H, W) memory run several times slower than the same matrix product.)
- **Attention** with q, k and v in one matrix product (the 1/√head_dim scale folded into q's weights), the relative
  position bias gathered once at preparation, and PyTorch's fused CPU kernel for softmax(q kᵀ + bias) v.
- **Matrix products with output widths padded to a multiple of 8** (zero rows, sliced off as views), where MKL's
  GEMM is much faster; GELU in place.
- ``torch.inference_mode`` around every call.
- Optional on CUDA only: ``compile=True`` (``torch.compile``) and ``bf16=True`` (bfloat16 autocast; the maps then
  differ from float32 by bf16 rounding, not by 1e-5).

Measured: ``bench/inference.py``; equality to the plain path: ``tests/test_fast_paths.py``.
"""
from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hrformer import Bottleneck, HRFormer, MlpDWBN, TransformerBlock, centre_padding
from .layers import Projection

__all__ = ["FastTransformerBlock", "InferenceModel", "fold_batchnorm", "fold_batchnorms", "prepare_for_inference"]

# Modules whose forward feeds a named convolution straight into a named BatchNorm (and uses the convolution's output
# nowhere else). nn.Sequential pairs (Conv2d immediately followed by BatchNorm2d) are found without a table.
_CONV_BN_ATTRIBUTES: dict[type, tuple[tuple[str, str], ...]] = {
    HRFormer: (("conv1", "bn1"), ("conv2", "bn2")),
    Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    MlpDWBN: (("fc1", "norm1"), ("dw3x3", "norm2"), ("fc2", "norm3")),
    Projection: (("conv", "bn"),),
}


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """One convolution computing ``bn(conv(x))`` for an eval-mode ``bn``: a new module, the inputs are unchanged."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                       device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        folded.weight.copy_(conv.weight.double() * scale.reshape(-1, 1, 1, 1))
        folded.bias.copy_((bias - bn.running_mean.double()) * scale + bn.bias.double())
    return folded


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.track_running_stats and bn.affine
            and bn.num_features == conv.out_channels)


def _conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(parent, convolution name, BN name) of every conv → BN pair that can be folded."""
    pairs = []
    for parent in model.modules():
        if type(parent) is nn.Sequential:
            names = list(parent._modules)
            named = list(zip(names, names[1:]))
        else:
            named = [pair for kind, pairs_of in _CONV_BN_ATTRIBUTES.items() if isinstance(parent, kind)
                     for pair in pairs_of]
        pairs += [(parent, conv, bn) for conv, bn in named
                  if _foldable(getattr(parent, conv, None), getattr(parent, bn, None))]
    return pairs


def fold_batchnorms(model: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a convolution into it, in place; returns how many were folded.

    Each folded BN becomes an ``nn.Identity``. Meant for a copy in eval mode (``prepare_for_inference``): training
    the folded model would not train what the original trains.
    """
    pairs = _conv_bn_pairs(model)
    for parent, conv_name, bn_name in pairs:
        setattr(parent, conv_name, fold_batchnorm(getattr(parent, conv_name), getattr(parent, bn_name)))
        setattr(parent, bn_name, nn.Identity())
    return len(pairs)


class FastTransformerBlock(nn.Module):
    """Inference form of a ``TransformerBlock`` whose FFN BatchNorms are already folded (``fold_batchnorms``).

    Input and output (B, C, H, W), ideally channels-last (then no layout copy happens anywhere in the block). The
    function is the block's eval-mode function: x + attention(LN(x)), then + FFN(LN(·)); DropPath is the identity
    in eval mode.
    """

    def __init__(self, block: TransformerBlock):
        super().__init__()
        attention = block.attn.attn
        if not (isinstance(block.mlp.norm1, nn.Identity) and isinstance(block.mlp.norm2, nn.Identity)
                and isinstance(block.mlp.norm3, nn.Identity)):
            raise ValueError("fold the block's BatchNorms first (fold_batchnorms)")
        self.window_size = block.attn.window_size
        self.num_heads = attention.num_heads
        self.dim = attention.q_proj.in_features
        self.norm1, self.norm2 = block.norm1, block.norm2
        scale = (self.dim // self.num_heads) ** -0.5
        with torch.no_grad():
            self.qkv = _linear_with_padded_outputs(
                torch.cat([attention.q_proj.weight * scale, attention.k_proj.weight, attention.v_proj.weight]),
                torch.cat([attention.q_proj.bias * scale, attention.k_proj.bias, attention.v_proj.bias]))
            self.out_proj = _linear_with_padded_outputs(attention.out_proj.weight, attention.out_proj.bias)
            # (heads, tokens, tokens), kept 3-D so that channels_last conversion of the model leaves it alone.
            self.register_buffer("position_bias", attention.relative_position_bias().contiguous())
            mlp = block.mlp
            self.fc1 = _linear_with_padded_outputs(*_pointwise_weights(mlp.fc1), multiple=1)  # feeds dw3x3 as is
            self.dw3x3 = mlp.dw3x3
            self.fc2 = _linear_with_padded_outputs(*_pointwise_weights(mlp.fc2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.permute(0, 2, 3, 1)  # B, H, W, C: a view, contiguous when x is channels-last
        tokens = tokens + self._attention(self.norm1(tokens))
        tokens += self._ffn(self.norm2(tokens))  # a fresh tensor of this block: adding in place is safe
        return tokens.permute(0, 3, 1, 2)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        w = self.window_size
        top, bottom = centre_padding(height, w)
        left, right = centre_padding(width, w)
        padded = F.pad(x, (0, 0, left, right, top, bottom))  # zeros that take part as keys, as in the plain block
        rows, cols = padded.shape[1] // w, padded.shape[2] // w
        windows = padded.reshape(batch, rows, w, cols, w, dim).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, dim)
        qkv = self.qkv(windows)[..., : 3 * dim]
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        bias = self.position_bias.unsqueeze(0).to(q.dtype)  # the fused CPU kernel takes a 4-D mask of q's dtype
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # q is pre-scaled
        out = self.out_proj(out.transpose(1, 2).reshape(-1, w * w, dim))[..., :dim]
        out = out.reshape(batch, rows, cols, w, w, dim).permute(0, 1, 3, 2, 4, 5).reshape(batch, rows * w, cols * w, dim)
        return out[:, top : top + height, left : left + width]

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        # GELU in place: each fresh tensor of this size costs page faults as well as a pass over memory.
        hidden = _gelu_(self.fc1(x))  # B, H, W, hidden
        hidden = self.dw3x3(hidden.permute(0, 3, 1, 2))  # a channels-last view in, channels-last out
        hidden = _gelu_(hidden).permute(0, 2, 3, 1)
        return _gelu_(self.fc2(hidden))[..., : self.dim]


def _gelu_(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU in place: ATen's gelu_, which torch.nn.functional does not expose."""
    return torch.ops.aten.gelu_(x)


def _linear_with_padded_outputs(weight: torch.Tensor, bias: torch.Tensor, multiple: int = 8) -> nn.Linear:
    """A Linear computing x Wᵀ + b in its first ``len(weight)`` outputs, then zero outputs up to a multiple of 8.

    The caller slices the padding off (a view). Why: MKL's float32 GEMM is much faster when the output width is a
    multiple of 8 — on HRT-B's widest branch at 512² (one thread, this project's 2-core VM) q, k, v take 19.6 ms
    with 234 columns and 10.8 ms with 240; the output projection 6.5 → 4.1 ms (78 → 80), the FFN's second layer
    26.0 → 21.3 ms.
    """
    out_features, in_features = weight.shape
    padded = math.ceil(out_features / multiple) * multiple
    linear = nn.Linear(in_features, padded, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
        linear.weight[:out_features] = weight
        linear.bias[:out_features] = bias
    return linear


def _pointwise_weights(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a 1×1 convolution as the Linear layer it is over the channels of (…, C) memory."""
    if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1 or conv.padding not in ((0, 0), 0):
        raise ValueError(f"not a point-wise convolution: {conv}")
    bias = conv.bias if conv.bias is not None else conv.weight.new_zeros(conv.out_channels)
    return conv.weight[:, :, 0, 0], bias


def _replace_transformer_blocks(model: nn.Module) -> int:
    """Swap every TransformerBlock (checkpointed ones included) for its FastTransformerBlock; returns how many."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, TransformerBlock)]
    for parent, name, block in swaps:
        setattr(parent, name, FastTransformerBlock(block))
    return len(swaps)


class InferenceModel(nn.Module):
    """A prepared model: ``forward(images)`` → logits (B, 1, H/4, W/4), float32, under ``torch.inference_mode``.

    ``images`` (B, 3, H, W) in [0, 1], as for the plain model, on any device and in any layout (moved to the
    model's device and to channels-last here). ``folded_batchnorms`` and ``fast_blocks`` say what the preparation
    changed.
    """

    def __init__(self, model: nn.Module, device: torch.device, channels_last: bool, bf16: bool,
                 folded_batchnorms: int, fast_blocks: int):
        super().__init__()
        self.model = model
        self.device = device
        self.channels_last = channels_last
        self.bf16 = bf16
        self.folded_batchnorms = folded_batchnorms
        self.fast_blocks = fast_blocks

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = images.to(self.device, torch.float32)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16
                        else contextlib.nullcontext())
            with autocast:
                logits = self.model(x)
            return logits.float().contiguous()


def _device_of(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def prepare_for_inference(model: nn.Module, *, channels_last: bool = True, fold_bn: bool = True,
                          fast_blocks: bool = True, compile: bool = False, bf16: bool = False) -> InferenceModel:
    """Prepare a trained stage-2 model (or any model built from these layers) once for inference.

    ``model`` is copied and never changed. ``fold_bn``, ``fast_blocks`` and ``channels_last`` (all on by default)
    each keep the eval-mode function exactly, up to rounding; ``fast_blocks`` needs ``fold_bn``.
    ``compile`` (``torch.compile``) and ``bf16`` (bfloat16 autocast) are for CUDA only: a ValueError elsewhere.
    """
    device = _device_of(model)
    for flag, asked in (("compile", compile), ("bf16", bf16)):
        if asked and device.type != "cuda":
            raise ValueError(f"{flag}=True is for a model on CUDA; this one is on {device}")
    if fast_blocks and not fold_bn:
        raise ValueError("fast_blocks=True needs fold_bn=True (the fast blocks take folded FFN weights)")
    prepared = copy.deepcopy(model).eval().requires_grad_(False)
    folded = fold_batchnorms(prepared) if fold_bn else 0
    swapped = _replace_transformer_blocks(prepared) if fast_blocks else 0
    if channels_last:
        prepared = prepared.to(memory_format=torch.channels_last)
    if compile:
        prepared = torch.compile(prepared)
    return InferenceModel(prepared, device, channels_last, bf16, folded, swapped)
