"""Device, seeding and mixed-precision choices, made once from the config so the loops stay device-agnostic."""
from __future__ import annotations

import contextlib
import os
import random
import warnings

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    """`auto` = this process's GPU under torchrun (LOCAL_RANK), else the first GPU, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name} was asked for, but no CUDA device is available here")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def amp_dtype(mode: str, device: torch.device):
    """None (full precision), torch.bfloat16 or torch.float16. AMP is a CUDA feature here; on the CPU it is refused
    with a warning rather than silently slowing training down."""
    if mode == "off":
        return None
    if device.type != "cuda":
        warnings.warn(f"RUNTIME.AMP {mode} ignored: mixed precision is only used on CUDA devices")
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode in ("bf16", "fp16"):
        return torch.bfloat16 if mode == "bf16" else torch.float16
    raise ValueError(f"RUNTIME.AMP must be off, auto, bf16 or fp16, not '{mode}'")


def autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(dtype, device: torch.device):
    """fp16 needs loss scaling; bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
