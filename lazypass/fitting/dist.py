"""Process-group plumbing of fitting: world size and rank, and sums over all processes."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def world_and_rank(model: nn.Module) -> tuple[int, int]:
    """(world size, rank); initialises the process group under torchrun if nobody did.

    The backend is gloo on CPU and nccl on CUDA, chosen from the model's device.
    """
    if not dist.is_available():
        return 1, 0
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = next(model.parameters()).device
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(), dist.get_rank()


def all_sum(values: list, world: int) -> list[float]:
    """Sums over all processes (one all-reduce) of scalars or 0-d tensors, as floats."""
    if world == 1:
        return [float(v) for v in values]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
