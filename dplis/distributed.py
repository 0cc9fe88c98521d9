"""Data-parallel private training on torch.distributed (gloo on CPU, NCCL on GPU).

Each rank Poisson-samples its own shard with the global rate q, so the logical batch is the
union over ranks. Every rank computes the clipped per-example sum of its examples; rank 0
alone adds the Gaussian noise N(0, σ²C²) to its sum before the all-reduce, so the reduced
sum carries the noise exactly once (not √world times). All ranks then divide by the global
expected batch size q·N and apply the same update. Seeds come from the same generator on
every rank, so perturbations are identical and the models stay in lock-step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

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


# Tensors handed to a collective, held from Python until the collective's C++ work has let
# go of them (see ``close``); pruned at every collective, so at most a few are held.
_held: list[torch.Tensor] = []
RELEASE_TIMEOUT_S = 10.0


def _release(timeout: float = 0.0) -> bool:
    """Drop the held tensors no collective work references any more (use count 1: this list
    alone); with ``timeout``, wait up to that long for the others. True when none is left."""
    deadline = time.monotonic() + timeout
    while True:
        _held[:] = [t for t in _held if t._use_count() > 1]
        if not _held or time.monotonic() >= deadline:
            return not _held
        time.sleep(1e-3)


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    """``dist.all_reduce`` in place on ``tensor`` (returned), through an alias kept in
    ``_held``: a tensor object of its own, so views the caller takes of ``tensor`` do not
    count in its use count."""
    alias = tensor.view(tensor.shape)
    dist.all_reduce(alias, op=op)
    _held.append(alias)
    _release()
    return tensor


def agree(error: BaseException | None, device: torch.device) -> None:
    """Collective: raise on every rank if any rank failed (the failing rank re-raises its own)."""
    flag = _all_reduce(torch.tensor([0 if error is None else 1], device=device),
                       dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if int(flag) != 0:
        raise RuntimeError("another rank failed this step; no rank applied it")


def all_gather(tensor: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape and dtype on all ranks), by rank, on ``tensor``'s
    device; the collective runs on ``device`` (NCCL needs CUDA tensors)."""
    alias = tensor.to(device, copy=True)
    parts = [torch.empty_like(alias) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, alias)
    _held.extend([alias, *parts])
    _release()
    return [p.to(tensor.device, copy=True) for p in parts]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Σ over ranks, in place on ``tensor`` (returned)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def close(completed: bool) -> None:
    """Leave the process group; after a run that ``completed`` on every rank, barrier first
    and wait until gloo has freed every collective's work.

    A gloo worker thread frees a finished collective's work, and with it the work's tensors,
    sometimes after the caller's ``all_reduce`` has returned; a barrier's work also keeps
    the collectives queued before it until it is freed itself. A tensor whose Python object
    is already gone then needs the GIL to be freed; if the interpreter is finalising by
    then, the thread dies and the process aborts ("terminate called without an active
    exception"). So every tensor handed to a collective here stays referenced from Python
    (``_held``) until its use count shows no work holds it: the thread then never frees a
    Python object. After the barrier, ``close`` waits (up to ``RELEASE_TIMEOUT_S``) for the
    last ones. A run that failed skips both (a rank may be stuck in another collective).
    """
    if completed:
        dist.barrier()
        _release(RELEASE_TIMEOUT_S)
    dist.destroy_process_group()


@contextlib.contextmanager
def closing(enabled: bool = True) -> Iterator[None]:
    """Leave the process group when the block ends: ``close(True)`` if it ran to its end,
    ``close(False)`` if it raised (the error then propagates). ``enabled=False``: nothing
    (a process that did not join a group itself)."""
    completed = False
    try:
        yield
        completed = True
    finally:
        if enabled:
            close(completed)
