"""Data-parallel training with ``torchrun``: one process per device, gradients averaged by DDP.

``torchrun --nproc_per_node=N -m mtrank.cli run ...`` (or any script that builds a :class:`Trainer`) sets
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; :func:`init_from_env` then joins the process group (NCCL on GPUs,
Gloo on CPUs) and the trainer wraps the model in ``DistributedDataParallel``. Each rank reads its own
``batch_size`` rows of the same shuffled order, so N ranks with batch b train exactly like one process with
batch N*b (tested).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group described by torchrun's environment; False when not launched distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return True


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group cleanly: wait for every rank, then destroy it. Without this, Gloo's worker
    threads can still hold work items when the interpreter exits, which aborts the process (SIGABRT)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
