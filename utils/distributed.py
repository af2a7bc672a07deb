"""Multi-process training through torchrun: process-group set-up, rank helpers and small collectives.

One process per GPU (NCCL) or per CPU worker (gloo). Without torchrun's environment everything degrades to a single
process and every helper is a no-op, so the training scripts never branch on it.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE); returns (rank, world_size)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_float(value: float, device: torch.device) -> float:
    """Rank 0's value on every process (validation runs on rank 0; every scheduler must step with its score)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def all_reduce_sum(value: float, device: torch.device) -> float:
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
