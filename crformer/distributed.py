"""torchrun/DDP helpers: one process per GPU (NCCL) or per CPU worker (gloo)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


_joined = False  # this process joined a torchrun process group (stays True after cleanup)


def init_distributed() -> tuple[int, int, torch.device]:
    """Initialise the process group when launched by torchrun; returns (rank, world, device)."""
    global _joined
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
        _joined = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a CPU/GPU tensor over ranks (no-op when not distributed)."""
    if dist.is_initialized():
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        buf = t.to(dev)
        dist.all_reduce(buf)
        return buf.to(t.device)
    return t


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def joined_process_group() -> bool:
    """Whether this process joined a torchrun process group (True also after :func:`cleanup`)."""
    return _joined
