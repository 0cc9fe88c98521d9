"""Data-parallel private training on torch.distributed (gloo on CPU, NCCL on GPU).

Each rank Poisson-samples its own shard with the global rate q, so the logical batch is the
union over ranks. Every rank computes the clipped per-example sum of its examples; rank 0
alone adds the Gaussian noise N(0, σ²C²) to its sum before the all-reduce, so the reduced
sum carries the noise exactly once (not √world times). All ranks then divide by the global
expected batch size q·N and apply the same update. Seeds come from the same generator on
every rank, so perturbations are identical and the models stay in lock-step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(dataset: Dataset, rank: int, size: int) -> Dataset:
    """Examples rank, rank + size, ... of ``dataset`` (the shards partition it)."""
    return dataset if size == 1 else Subset(dataset, range(rank, len(dataset), size))


def agree(error: BaseException | None, device: torch.device) -> None:
    """Collective: raise on every rank if any rank failed (the failing rank re-raises its own)."""
    flag = torch.tensor([0 if error is None else 1], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if int(flag) != 0:
        raise RuntimeError("another rank failed this step; no rank applied it")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def close(completed: bool) -> None:
    """Leave the process group; after a run that ``completed`` on every rank, barrier first.

    The barrier makes exit safe with gloo. Each gloo worker thread frees a finished
    collective's tensors while holding the group's queue lock, and a tensor whose Python
    object is gone needs the GIL to be freed. If the interpreter is already finalising by
    then, the thread dies and the process aborts ("terminate called without an active
    exception"); ``destroy_process_group`` alone does not prevent it. Queuing the barrier
    takes that lock with the GIL released, so it returns only once every earlier collective
    is freed. A run that failed skips the barrier (a rank may be stuck in another collective).
    """
    if completed:
        dist.barrier()
    dist.destroy_process_group()
