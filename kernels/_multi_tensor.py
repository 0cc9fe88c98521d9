"""Multi-tensor launch plan shared by the Triton kernels (``norms``, ``dp_step``, ``perturbation``).

A model has hundreds of parameter tensors, and a step must not be launch-bound,
so every kernel serves a whole list of tensors in one launch per dtype:

* **Direct mode** (one tensor of that dtype; the main caller, ``dplis.private_grad``,
  passes a single flat ``[K, B, D]`` buffer): the tensor is an ordinary pointer
  argument, so Triton specialises on its 16-byte alignment and on ``D % 16`` and
  emits vectorised loads. One launch, no copy.
* **Table mode** (several tensors of one dtype): a pointer table in the style of
  Triton's grouped-GEMM tutorial. ``tensor_table`` is int64 ``[m, TABLE_COLS]`` with
  one row per tensor (input address, output address, ``D_j``, global column
  ``col_j``); ``chunk_table`` is int64 ``[n, 2]`` with one row per ``BLOCK_D``-chunk
  (tensor index, first column). Program ``i`` reads row ``i`` of the chunk table
  and casts the addresses back to typed pointers. One launch per dtype, no copy,
  no per-tensor launch overhead; the price is that the compiler no longer knows the
  alignment (no vectorised loads), which is acceptable off the hot path.

Rejected: one launch per tensor (hundreds of launches of tiny kernels, launch-bound)
and concatenating into one flat buffer (an extra read + write of every gradient
byte, doubling the traffic of a memory-bound op).

Every tensor owns columns ``[col_j, col_j + D_j)`` of one global index space (its
position in the concatenation of the list). The kernels draw noise from
``dp_step.normal(seed, column)``, so tensors get independent noise and a list gives
exactly the same noise as the concatenated flat buffer.

Block sizes are fixed per kernel, because the host sizes the chunk tables and
partial buffers with them. On a GPU ``triton.autotune`` picks ``num_warps`` for the
kernels whose results do not depend on it (keyed on K, D and the mode; under the
interpreter the plain kernel runs); the norms kernel, whose ``tl.sum`` order does, runs
with a fixed ``num_warps``. Scalar accesses (table entries, clip factors, partial sums)
sit at grid or loop indices that are in bounds by construction; every block access is
masked.

Tensors whose rows are not contiguous are copied by ``.contiguous()`` (a
correct, rare slow path); tensors with no elements are skipped.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

TABLE_COLS = 4  # tensor_table columns: input address, output address, D_j, col_j


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Group:
    """The non-empty tensors of one dtype: one kernel launch."""

    indices: list[int] = field(default_factory=list)  # positions in the caller's list
    inputs: list[torch.Tensor] = field(default_factory=list)  # contiguous
    numels: list[int] = field(default_factory=list)  # D_j: columns (elements per row)
    cols: list[int] = field(default_factory=list)  # global column of each tensor's column 0

    @property
    def multi(self) -> bool:
        return len(self.inputs) > 1


def group_by_dtype(tensors: list[torch.Tensor], numels: list[int]) -> tuple[list[Group], int]:
    """Split ``tensors`` (with ``numels[j]`` columns each) into per-dtype groups.

    Returns the groups and the total number of columns (the size of the global
    index space, empty tensors included).
    """
    groups: dict[torch.dtype, Group] = {}
    col = 0
    for j, (t, d) in enumerate(zip(tensors, numels, strict=True)):
        if d > 0:
            g = groups.setdefault(t.dtype, Group())
            g.indices.append(j)
            g.inputs.append(t.contiguous())
            g.numels.append(d)
            g.cols.append(col)
        col += d
    return list(groups.values()), col


def build_tables(
    group: Group, block: int, outputs: list[torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Return ``(tensor_table, chunk_table, n_chunks)`` for ``group`` with chunks of ``block``.

    In direct mode (one tensor) the tables are unused placeholders. ``outputs``
    (one per input, same order) fill the output-address column.
    """
    device = group.inputs[0].device
    n_chunks = [cdiv(d, block) for d in group.numels]
    total = sum(n_chunks)
    if not group.multi:
        dummy = torch.empty(2, dtype=torch.int64, device=device)
        return dummy, dummy, total
    m = len(group.inputs)
    rows = [
        [t.data_ptr(), outputs[i].data_ptr() if outputs is not None else 0, d, c]
        for i, (t, d, c) in enumerate(zip(group.inputs, group.numels, group.cols, strict=True))
    ]
    tensor_table = torch.tensor(rows, dtype=torch.int64).reshape(-1)
    counts = torch.tensor(n_chunks, dtype=torch.int64)
    owner = torch.repeat_interleave(torch.arange(m, dtype=torch.int64), counts)
    first_chunk = torch.cumsum(counts, 0) - counts
    start = (torch.arange(total, dtype=torch.int64) - first_chunk[owner]) * block
    chunk_table = torch.stack([owner, start], dim=1).reshape(-1)
    # one host-to-device copy for both tables
    both = torch.cat([tensor_table, chunk_table]).to(device)
    return both[: m * TABLE_COLS], both[m * TABLE_COLS :], total


def device_guard(device: torch.device):
    """Make ``device`` current while launching (Triton launches on the current CUDA device)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@triton.jit
def table_entry(chunk_table_ptr, tensor_table_ptr, chunk, TABLE_COLS: tl.constexpr):
    """Decode chunk ``chunk`` of the tables: (first column, input address, output address,
    D_j, col_j); the caller casts the addresses to its typed pointers."""
    j = tl.load(chunk_table_ptr + 2 * chunk)
    start = tl.load(chunk_table_ptr + 2 * chunk + 1)
    row = tensor_table_ptr + TABLE_COLS * j
    return start, tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)
