"""Shared by the tests that run real gloo ranks (``torch.multiprocessing.spawn``)."""
from __future__ import annotations

import torch.distributed as dist


def average_over_ranks(tensors) -> None:
    """All-reduce then divide by the world size, in place: what DeepSpeed / DDP do with the ranks'
    gradients (and the trainer with the loss)."""
    world = dist.get_world_size()
    for t in tensors:
        dist.all_reduce(t)
        t /= world
