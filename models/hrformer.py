"""HRFormer (High-Resolution Transformer) backbone with MPC's four 256-channel output projections.

Written from docs/MPC_SPEC.md §2 and the HRFormer paper. Module and parameter names are an interface: they equal the
official MPC / HRFormer names (``conv1``, ``layer1``, ``transition1``, ``stage2.0.branches.0.0.attn.attn.q_proj``,
``convs.0.conv`` ...) so that the released checkpoints load one to one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones import register_backbone
from .layers import Projection

__all__ = ["HRFormerConfig", "StageConfig", "HRFORMER_CONFIGS", "HRFormer", "DropPath", "build_hrformer",
           "centre_padding"]


@dataclass(frozen=True)
class StageConfig:
    """One multi-branch stage: ``num_modules`` fusion modules over ``len(widths)`` branches."""

    num_modules: int
    widths: tuple[int, ...]
    heads: tuple[int, ...]


@dataclass(frozen=True)
class HRFormerConfig:
    stem_channels: int
    stage1_planes: int  # bottleneck planes; the stage outputs 4x this
    stage1_blocks: int
    stages: tuple[StageConfig, StageConfig, StageConfig]  # stages 2, 3, 4
    blocks_per_branch: int = 2
    window_size: int = 7
    mlp_ratio: float = 4.0
    proj_channels: int = 256


def _stages(widths, heads, modules) -> tuple[StageConfig, StageConfig, StageConfig]:
    return tuple(StageConfig(modules[i], tuple(widths[: i + 2]), tuple(heads[: i + 2])) for i in range(3))


HRFORMER_CONFIGS: dict[str, HRFormerConfig] = {
    # MPC's backbone, HRFormer-B.
    "hrt_base": HRFormerConfig(64, 64, 2, _stages((78, 156, 312, 624), (2, 4, 8, 16), (1, 4, 2))),
    # Published HRFormer-S and HRFormer-T (HRFormer cls/configs/hrt/hrt_{small,tiny}.yaml).
    "hrt_small": HRFormerConfig(64, 64, 2, _stages((32, 64, 128, 256), (1, 2, 4, 8), (1, 4, 2))),
    "hrt_tiny": HRFormerConfig(64, 64, 2, _stages((18, 36, 72, 144), (1, 2, 4, 8), (1, 3, 2))),
    # Ours: small enough to train a CPU demo in minutes on 128-256 px inputs.
    "hrt_nano": HRFormerConfig(32, 16, 1, _stages((16, 32, 64, 128), (1, 1, 2, 4), (1, 1, 1))),
}


class DropPath(nn.Module):
    """Stochastic depth: per sample, zero the whole residual with probability p and rescale the rest by 1/(1-p)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * keep / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def relative_position_index(window_size: int) -> torch.Tensor:
    """(w*w, w*w) index into the ((2w-1)^2, heads) bias table for every (query, key) pair of a window."""
    rows, cols = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])  # 2, N
    delta = coords[:, :, None] - coords[:, None, :] + (window_size - 1)  # 2, N, N, each in [0, 2w-2]
    return delta[0] * (2 * window_size - 1) + delta[1]


def window_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √head_dim + bias) v in every window and head.

    q, k, v: (windows, heads, tokens, head_dim); bias: (heads, tokens, tokens). Two routes, equal up to rounding
    (3e-7 relative in float32, tests/test_fast_paths.py):
    - no gradient reaches the bias (eval, the frozen stage-2 backbone, inference): PyTorch's fused CPU kernel
      (scaled_dot_product_attention, the bias as a float mask) takes 20–50 % of the explicit softmax's time on
      HRT-B's windows at 512² and never holds the windows × heads × tokens² scores (bench/inference.py);
    - the bias needs a gradient (stage-1 training): no fused kernel of SDPA returns a mask gradient on the CPU, and
      its fallback runs slower than the explicit softmax while saving the same tensors, so the explicit softmax,
      in the official order of operations.
    """
    if bias.requires_grad:
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + bias
        return torch.softmax(scores, dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))  # the fused kernel takes a 4-D mask


class WindowAttention(nn.Module):
    """Multi-head self-attention inside one window, with a learned relative position bias.

    Input and output: (num_windows, window_size**2, dim).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.window_size = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        # Registration order k, v, q, out reproduces the official state_dict order.
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        windows, tokens, dim = x.shape
        head_dim = dim // self.num_heads

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(windows, tokens, self.num_heads, head_dim).transpose(1, 2)

        q = split_heads(self.q_proj(x))
        k = split_heads(self.k_proj(x))
        v = split_heads(self.v_proj(x))
        out = window_softmax_attention(q, k, v, self.relative_position_bias())
        return self.out_proj(out.transpose(1, 2).reshape(windows, tokens, dim))

    def relative_position_bias(self) -> torch.Tensor:
        """(heads, tokens, tokens): the learned bias of every (query, key) pair of a window."""
        tokens = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.reshape(tokens, tokens, self.num_heads).permute(2, 0, 1)


def centre_padding(size, window: int):
    """(before, after) padding of a side to the next multiple of the window, centred (the smaller half before).

    Integer arithmetic only: ``(-size) % window`` is ``ceil(size / window) * window - size`` for positive sizes, and
    it stays a traced operation when ``size`` is a traced or symbolic size (ONNX export with dynamic height and
    width), where ``math.ceil`` would freeze the size it was traced at."""
    total = (-size) % window
    before = total // 2
    return before, total - before


class PaddedWindowAttention(nn.Module):
    """Window attention over a whole (B, H, W, C) map: centre-pad to a multiple of the window, attend, crop.

    The padded positions are zeros of the already layer-normalised input, and they take part in the attention
    as keys, as in the official code.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int):
        super().__init__()
        self.window_size = window_size
        self.attn = WindowAttention(dim, num_heads, window_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        w = self.window_size
        top, bottom = centre_padding(height, w)
        left, right = centre_padding(width, w)
        x = F.pad(x, (0, 0, left, right, top, bottom))
        rows, cols = (height + top + bottom) // w, (width + left + right) // w
        windows = x.reshape(batch, rows, w, cols, w, dim).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, dim)
        out = self.attn(windows)
        out = out.reshape(batch, rows, cols, w, w, dim).permute(0, 1, 3, 2, 4, 5).reshape(batch, rows * w, cols * w, dim)
        return out[:, top : top + height, left : left + width, :]


class MlpDWBN(nn.Module):
    """FFN of HRFormer: 1x1 conv, BN, GELU, depth-wise 3x3 conv, BN, GELU, 1x1 conv, BN, GELU."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, kernel_size=1)
        self.norm1 = nn.BatchNorm2d(hidden_dim)
        self.dw3x3 = nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, padding=1, groups=hidden_dim)
        self.norm2 = nn.BatchNorm2d(hidden_dim)
        self.fc2 = nn.Conv2d(hidden_dim, dim, kernel_size=1)
        self.norm3 = nn.BatchNorm2d(dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.fc1(x)))
        x = self.act(self.norm2(self.dw3x3(x)))
        return self.act(self.norm3(self.fc2(x)))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + DropPath(attention(LN(x))), then x + DropPath(MlpDWBN(LN(x)))."""

    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.attn = PaddedWindowAttention(dim, num_heads, window_size)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MlpDWBN(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # B, H, W, C
        x = x + self.drop_path(self.attn(self.norm1(x)))
        ffn = self.mlp(self.norm2(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.drop_path(ffn)
        return x.permute(0, 3, 1, 2).contiguous()


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1, 3x3, 1x1, expansion 4) used by stage 1."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)
    )


def _downsample_step(in_channels: int, out_channels: int, last: bool) -> nn.Sequential:
    """Depth-wise 3x3 stride-2 conv, BN, point-wise conv, BN (+ ReLU except on the last step of a chain)."""
    layers = [
        nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False),
        nn.BatchNorm2d(in_channels),
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if not last:
        layers.append(nn.ReLU(inplace=False))
    return nn.Sequential(*layers)


class HighResolutionModule(nn.Module):
    """Parallel transformer branches followed by HRNet-style all-to-all fusion."""

    def __init__(self, widths, heads, blocks_per_branch, window_size, mlp_ratio, drop_paths):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(
                *(TransformerBlock(width, num_heads, window_size, mlp_ratio, drop_paths[k]) for k in range(blocks_per_branch))
            )
            for width, num_heads in zip(widths, heads)
        )
        self.fuse_layers = nn.ModuleList(
            nn.ModuleList(self._fuse_path(widths, source, target) for source in range(len(widths)))
            for target in range(len(widths))
        )
        self.relu = nn.ReLU(inplace=True)

    @staticmethod
    def _fuse_path(widths, source: int, target: int) -> nn.Module:
        if source == target:
            return nn.Identity()
        if source > target:  # lower resolution: 1x1 conv, BN, nearest upsampling (exact size fixed in forward)
            return nn.Sequential(
                nn.Conv2d(widths[source], widths[target], 1, bias=False),
                nn.BatchNorm2d(widths[target]),
                nn.Upsample(scale_factor=2 ** (source - target), mode="nearest"),
            )
        steps = target - source
        return nn.Sequential(
            *(
                _downsample_step(widths[source], widths[target] if k == steps - 1 else widths[source], last=k == steps - 1)
                for k in range(steps)
            )
        )

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        x = [branch(t) for branch, t in zip(self.branches, inputs)]
        fused = []
        for target, paths in enumerate(self.fuse_layers):
            size = x[target].shape[-2:]
            total = None
            for source, path in enumerate(paths):
                y = path(x[source])
                if y.shape[-2:] != size:  # nearest x2^k overshoots odd sizes; the official code resizes exactly
                    y = F.interpolate(y, size=size, mode="bilinear", align_corners=True)
                total = y if total is None else total + y
            fused.append(self.relu(total))
        return fused


class HRFormer(nn.Module):
    """HRFormer backbone; ``forward(x)`` returns 4 maps of ``proj_channels`` at strides 4, 8, 16, 32."""

    strides = (4, 8, 16, 32)

    def __init__(self, config: HRFormerConfig, drop_path_rate: float = 0.2):
        super().__init__()
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.config = config
        stem = config.stem_channels
        final_widths = config.stages[-1].widths
        self.out_channels = [config.proj_channels] * len(final_widths)

        self.conv1 = nn.Conv2d(3, stem, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.conv2 = nn.Conv2d(stem, stem, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        # Registered here (before layer1) to reproduce the official state_dict order.
        self.convs = nn.ModuleList(Projection(width, config.proj_channels) for width in final_widths)

        stage1_out = config.stage1_planes * Bottleneck.expansion
        self.layer1 = nn.Sequential(
            *(Bottleneck(stem if k == 0 else stage1_out, config.stage1_planes) for k in range(config.stage1_blocks))
        )

        # Stochastic depth: linear in depth over block positions; module m of a stage takes the next
        # blocks_per_branch rates and every branch of that module shares them (docs/MPC_SPEC.md §2).
        per_module = config.blocks_per_branch
        positions = sum(stage.num_modules for stage in config.stages) * per_module
        rates = torch.linspace(0, drop_path_rate, positions).tolist()

        previous = [stage1_out]
        position = 0
        for index, stage in enumerate(config.stages, start=2):
            self.add_module(f"transition{index - 1}", self._transition(previous, list(stage.widths)))
            modules = []
            for _ in range(stage.num_modules):
                module_rates = rates[position : position + per_module]
                position += per_module
                modules.append(
                    HighResolutionModule(
                        stage.widths, stage.heads, per_module, config.window_size, config.mlp_ratio, module_rates
                    )
                )
            self.add_module(f"stage{index}", nn.Sequential(*modules))
            previous = list(stage.widths)

    @staticmethod
    def _transition(previous: list[int], current: list[int]) -> nn.ModuleList:
        """Keep existing branches (3x3 conv if the width changes); grow new ones from the lowest resolution."""
        layers = []
        for i, width in enumerate(current):
            if i < len(previous):
                layers.append(nn.Identity() if previous[i] == width else _conv_bn_relu(previous[i], width, 1))
            else:
                steps = i + 1 - len(previous)
                layers.append(
                    nn.Sequential(
                        *(_conv_bn_relu(previous[-1], width if k == steps - 1 else previous[-1], 2) for k in range(steps))
                    )
                )
        return nn.ModuleList(layers)

    @staticmethod
    def _apply_transition(transition: nn.ModuleList, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [layer(maps[i] if i < len(maps) else maps[-1]) for i, layer in enumerate(transition)]

    def drop_path_rates(self) -> list[tuple[str, float]]:
        """(module name, rate) of every transformer block's DropPath, in model order."""
        return [(name[: -len(".drop_path")], m.drop_prob) for name, m in self.named_modules() if isinstance(m, DropPath)]

    def forward_branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The 4 stage-4 branch maps before the output projections."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        maps = [self.layer1(x)]
        for transition, stage in (
            (self.transition1, self.stage2),
            (self.transition2, self.stage3),
            (self.transition3, self.stage4),
        ):
            maps = stage(self._apply_transition(transition, maps))
        return maps

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [proj(t) for proj, t in zip(self.convs, self.forward_branches(x))]


def build_hrformer(name: str, drop_path_rate: float = 0.2) -> HRFormer:
    """Build an HRFormer by config name (see ``HRFORMER_CONFIGS``)."""
    if name not in HRFORMER_CONFIGS:
        raise ValueError(f"unknown HRFormer config {name!r}; choose from {sorted(HRFORMER_CONFIGS)}")
    return HRFormer(HRFORMER_CONFIGS[name], drop_path_rate)


for _name in HRFORMER_CONFIGS:
    register_backbone(_name, lambda drop_path_rate, name=_name: build_hrformer(name, drop_path_rate))
