"""Per-example squared gradient norms, as a Triton kernel.

Math:   n²[b] = Σ_j ‖(1/K) Σ_k g_j[k, b, :]‖²                       -> float32 ``[B]``
Shapes: ``g_j`` is ``[K, B, *P_j]`` (``batch_dims=2``) or ``[B, *P_j]`` (``batch_dims=1``,
        K = 1), viewed as ``[K, B, D_j]``; dtypes float32 / bfloat16 / float16 / float64,
        possibly different across the list. Loads are upcast to float32 and every sum
        is float32 (as in ``reference.per_sample_sq_norms_torch``).

Parallelism: one program per (example b, chunk of ``BLOCK_D`` columns). It reads
the K rows of its chunk once, averages them and writes the chunk's sum of
squares to ``partials[b, chunk]``; torch then sums the partials over chunks and
over dtype groups in a fixed order. Deterministic: no atomics.

Many tensors: one launch per dtype, through the pointer table of
``_multi_tensor`` (direct pointer when the dtype has a single tensor, e.g. the
flat ``[K, B, D]`` buffer of ``dplis.private_grad``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _multi_tensor as mt
from .reference import as_kbd

BLOCK_D = 4096  # columns per program: K * 4096 loads, enough bytes in flight per program
TABLE_COLS: tl.constexpr = tl.constexpr(mt.TABLE_COLS)


# D and row_stride keep Triton's "% 16" specialisation (vectorised loads); the other
# integers would only multiply the compiled variants
@triton.jit(do_not_specialize=["B", "K", "n_chunks"])
def _sq_norm_partials_kernel(
    g_ptr,  # [K, B, D] contiguous (direct mode) / typed base pointer (table mode)
    partial_ptr,  # float32 [B, n_chunks]
    tensor_table_ptr,  # int64 [m, TABLE_COLS] (table mode only)
    chunk_table_ptr,  # int64 [n_chunks, 2] (table mode only)
    B,
    K,
    D,  # columns of the tensor (direct mode only)
    row_stride,  # B * D: distance between g[k, b] and g[k + 1, b] (direct mode only)
    n_chunks,
    MULTI: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_chunks
    chunk = pid % n_chunks
    if MULTI:
        start, src, _, D, _ = mt.table_entry(chunk_table_ptr, tensor_table_ptr, chunk, TABLE_COLS)
        g_ptr = src.to(g_ptr.dtype)
        row_stride = D * B
    else:
        start = chunk * BLOCK_D
    cols = start + tl.arange(0, BLOCK_D)
    mask = cols < D
    ptrs = g_ptr + b * D + cols
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for _ in range(K):
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        ptrs += row_stride
    mean = acc / K
    tl.store(partial_ptr + pid, tl.sum(mean * mean, axis=0))


NUM_WARPS = 4  # fixed, not autotuned: tl.sum's order of additions follows the warp layout,
# so a per-process choice would make the norms (and clip factors) differ between processes


def _sq_norm_partials(group: mt.Group, K: int, B: int) -> torch.Tensor:
    """Launch the kernel for one dtype group -> float32 ``[B]`` (its share of n²)."""
    first = group.inputs[0]
    tensor_table, chunk_table, n_chunks = mt.build_tables(group, BLOCK_D)
    partials = torch.empty((B, n_chunks), dtype=torch.float32, device=first.device)
    D = group.numels[0] if not group.multi else 0
    args = (first, partials, tensor_table, chunk_table, B, K, D, B * D, n_chunks)
    _sq_norm_partials_kernel[(B * n_chunks,)](*args, MULTI=group.multi, BLOCK_D=BLOCK_D,
                                              num_warps=NUM_WARPS)
    return partials.sum(dim=1)


def per_sample_sq_norms_triton(grads: list[torch.Tensor], batch_dims: int) -> torch.Tensor:
    """Σ_j ‖mean_k g_j[k, b]‖² for every example b -> float32 ``[B]`` (see module doc)."""
    kbd = [as_kbd(g.detach(), batch_dims) for g in grads]
    K, B = kbd[0].shape[:2]
    device = kbd[0].device
    total = torch.zeros(B, dtype=torch.float32, device=device)
    if B == 0:
        return total
    groups, _ = mt.group_by_dtype(kbd, [t.shape[2] for t in kbd])
    with mt.device_guard(device):
        for group in groups:
            total += _sq_norm_partials(group, K, B)
    return total
