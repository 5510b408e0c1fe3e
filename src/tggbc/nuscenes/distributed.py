"""Evaluation split into whole scenes over the processes `torchrun` starts.

    torchrun --nproc-per-node 4 -m tggbc eval --model NAME --weights FILE --dataroot DIR ...

Each process reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), joins a torch.distributed group (gloo on CPU, NCCL on CUDA) and runs its share of
the scenes. A scene is never split: StreamPETR's memory runs through a scene, so every process
starts its scenes with an empty memory exactly as a single process does, and any process count
gives the single-process result. Without torchrun's environment everything runs in one process.

Imports nothing but the standard library and torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["Shard", "assign_scenes", "current_shard", "agree", "barrier", "finish"]


@dataclass(frozen=True)
class Shard:
    """This process's place in the run: rank of world_size (local_rank on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (torchrun sets it)") from None


def current_shard(device: str = "cpu") -> Shard:
    """This process's Shard, joining torchrun's process group when WORLD_SIZE > 1.

    Args:
        device: "cpu" (gloo) or "cuda" (NCCL; each process takes cuda:LOCAL_RANK).
    """
    world = _env_int("WORLD_SIZE") or 1
    if world <= 1:
        return Shard()
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    if rank is None or local is None:
        raise ValueError("WORLD_SIZE is set but RANK / LOCAL_RANK are not: start sharded runs with torchrun")
    import torch.distributed as dist

    if not dist.is_available():
        raise ImportError("this torch build has no torch.distributed: run in one process")
    _die_with_parent()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local}, but this node has {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        import datetime

        # Processes that finish their scenes early wait for the others at the end: allow hours, not
        # the default half hour (a process that fails makes torchrun stop the rest anyway).
        timeout = datetime.timedelta(hours=24)
        dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://", timeout=timeout)
    return Shard(rank=rank, world_size=world, local_rank=local)


def _die_with_parent() -> None:
    """Under torchrun: end this process when its launcher dies (Linux), so none is left running."""
    import signal

    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: torchrun's own shutdown still stops its workers


def assign_scenes(frame_counts: list[int], world_size: int) -> list[list[int]]:
    """Whole scenes per process, balanced by frames: each scene (longest first, ties by position)
    goes to the process with the fewest frames so far (ties: lowest rank).

    Args:
        frame_counts: frames of each scene, in test order.
    Returns:
        world_size lists of scene indices, each in test order.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    load = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for scene in sorted(range(len(frame_counts)), key=lambda s: (-frame_counts[s], s)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        shares[rank].append(scene)
        load[rank] += frame_counts[scene]
    return [sorted(share) for share in shares]


def agree(shard: Shard, problem: str | None, device: str = "cpu") -> None:
    """Every process learns whether any process hit a problem, and all raise the same ValueError.

    Used around the checks made before long work, so that one process's bad input does not leave
    the others waiting at the next collective.
    """
    if not shard.distributed:
        if problem:
            raise ValueError(problem)
        return
    import torch.distributed as dist

    cuda = torch.device(device).type == "cuda"
    flag = torch.tensor([1 if problem else 0], device=f"cuda:{shard.local_rank}" if cuda else "cpu")
    dist.all_reduce(flag)
    if problem:
        raise ValueError(problem)
    if int(flag.item()):
        raise ValueError("another process of this torchrun found a problem (its message is above)")


def barrier(shard: Shard) -> None:
    """Wait for every process (nothing when running alone)."""
    if shard.distributed:
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[shard.local_rank])
        else:
            dist.barrier()


def finish(shard: Shard) -> None:
    """Leave the process group (nothing when running alone)."""
    if shard.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
