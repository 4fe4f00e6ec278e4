"""Data parallelism through torch.distributed, started by `torchrun` (gloo on CPU, NCCL on GPU).

Each rank reads its own part of the data (the loaders' rank split) and computes gradients on it;
`average_gradients` all-reduces them once per step, after the backward pass and before a method's
`after_backward` hook and the optimizer step, so every rank takes the identical step whatever the
method does to its gradients. (DistributedDataParallel overlaps the reduction with the backward
pass, but would reduce before a method could see its own rank's gradients.) Outside torchrun every
function here is a no-op.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Only rank 0 writes checkpoints, metrics and reports."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_from_environment(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (NCCL for CUDA, else gloo); returns this rank's device."""
    if not launched_by_torchrun() or active():
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
    log.info("rank %d of %d on %s", rank(), world_size(), device)
    return device


def shutdown() -> None:
    if active():
        dist.destroy_process_group()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def average_gradients(modules: Iterable[nn.Module]) -> None:
    """Replace every gradient with its mean over the ranks, in one flattened all-reduce."""
    if not active() or world_size() == 1:
        return
    grads = [p.grad for module in modules for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset: offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def broadcast_module(module: nn.Module) -> None:
    """Rank 0's parameters and buffers everywhere (at the start, so every rank trains the same model)."""
    if active():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) before each step, as DistributedDataParallel does."""
    if active():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def sum_floats(values: list[float]) -> list[float]:
    if not active():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_objects(items: list) -> list:
    """Every rank's list items, concatenated (small, picklable Python values only)."""
    if not active():
        return list(items)
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def broadcast_object(value: object) -> object:
    """Rank 0's value on every rank (a small picklable Python value)."""
    if not active():
        return value
    holder = [value if is_main() else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
