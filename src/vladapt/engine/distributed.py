"""Data-parallel training helpers: one code path for 1 process and for ``torchrun --nproc_per_node N``.

Every rank computes the same global batch order and takes its own contiguous slice of each global
batch; gradients of the trainable parameters are averaged across ranks after each backward pass
(the reduction DistributedDataParallel performs), so N processes follow the trajectory of one
process with the same global batch size, up to floating-point summation order.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed(device: str = "cpu") -> bool:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); gloo on CPU, nccl on CUDA."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    dist.init_process_group(backend=backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce and average the gradients of ``params`` (flattened into one buffer per dtype)."""
    if not dist.is_initialized() or world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def all_sum(values: list[float]) -> list[float]:
    """Sum a few numbers (counts, losses) over all ranks."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()
