"""Ghost norms: per-example squared norms of Σ_p u_pᵀ v_p without forming it, as a Triton kernel.

Math:   n²[b] = ‖Σ_p u[b, p]ᵀ v[b, p]‖²_F = Σ_{p,q} (u_p·u_q)(v_p·v_q)          -> float32 ``[B]``
Shapes: u ``[B, P, M]``, v ``[B, P, N]`` (P positions; for a linear layer u holds the output
        gradients and v the inputs); float32 / bfloat16 / float16, last dim contiguous.

Parallelism: one program per (example b, tile pair (i, j) of BLOCK_P positions each, j ≥ i).
It forms the two [BLOCK_P, BLOCK_P] Gram tiles with ``tl.dot`` over M and N in BLOCK_K
chunks on values upcast to fp32, with fp32 accumulators: IEEE precision for fp32 inputs, TF32
for bf16/fp16 ones (exact there: TF32 holds every bf16/fp16 value), multiplies them and
writes the tile's sum, doubled off the diagonal (the Grams are symmetric), to
``partials[b, i, j]``; torch sums the partials in a fixed order. Deterministic, no atomics,
and the [B, P, P] Gram matrices of the torch path (``reference.ghost_sq_norms_torch``) are
never stored: for long sequences (P = 1024, B = 32) they would take 256 MiB.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._multi_tensor import device_guard

BLOCK_P = 32  # positions per tile side (tl.dot needs >= 16)
BLOCK_K = 32  # features per dot step


@triton.jit
def _gram_tile(x_ptr, rows_i, rows_j, P, M, stride_p, BLOCK_P: tl.constexpr,
               BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """[BLOCK_P, BLOCK_P] fp32 tile of x xᵀ for rows i and j of one example's x [P, M]."""
    acc = tl.zeros([BLOCK_P, BLOCK_P], dtype=tl.float32)
    for k0 in range(0, M, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols[None, :] < M
        a = tl.load(x_ptr + rows_i[:, None] * stride_p + cols[None, :],
                    mask=(rows_i[:, None] < P) & col_ok, other=0.0).to(tl.float32)
        b = tl.load(x_ptr + rows_j[:, None] * stride_p + cols[None, :],
                    mask=(rows_j[:, None] < P) & col_ok, other=0.0).to(tl.float32)
        acc += tl.dot(a, tl.trans(b), input_precision=PRECISION)
    return acc


@triton.jit(do_not_specialize=["P", "n_tiles"])
def _ghost_norm_partials_kernel(
    u_ptr, v_ptr,  # u [B, P, M], v [B, P, N]
    partial_ptr,  # float32 [B, n_tiles, n_tiles]
    P, M, N,
    su_b, su_p, sv_b, sv_p,  # strides of the batch and position dims
    n_tiles,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    per_example = n_tiles * n_tiles
    b = pid // per_example
    i = (pid % per_example) // n_tiles
    j = pid % n_tiles
    total = 0.0
    if j >= i:  # the lower tiles mirror the upper ones
        rows_i = i * BLOCK_P + tl.arange(0, BLOCK_P)
        rows_j = j * BLOCK_P + tl.arange(0, BLOCK_P)
        gu = _gram_tile(u_ptr + b * su_b, rows_i, rows_j, P, M, su_p, BLOCK_P, BLOCK_K,
                        PRECISION)
        gv = _gram_tile(v_ptr + b * sv_b, rows_i, rows_j, P, N, sv_p, BLOCK_P, BLOCK_K,
                        PRECISION)
        total = tl.sum(tl.sum(gu * gv, axis=1), axis=0) * tl.where(j > i, 2.0, 1.0)
    tl.store(partial_ptr + pid, total)


def _prepare(x: torch.Tensor) -> torch.Tensor:
    x = x.float() if x.dtype == torch.float64 else x
    return x if x.stride(-1) == 1 else x.contiguous()


def ghost_sq_norms_triton(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Σ_{p,q} (u_p·u_q)(v_p·v_q) per example -> float32 ``[B]`` (see module doc)."""
    u, v = _prepare(u), _prepare(v)
    B, P, M = u.shape
    N = v.shape[2]
    if B == 0 or P == 0:
        return torch.zeros(B, dtype=torch.float32, device=u.device)
    n_tiles = triton.cdiv(P, BLOCK_P)
    partials = torch.empty((B, n_tiles, n_tiles), dtype=torch.float32, device=u.device)
    precision = "ieee" if torch.float32 in (u.dtype, v.dtype) else "tf32"
    grid = (B * n_tiles * n_tiles,)
    with device_guard(u.device):
        _ghost_norm_partials_kernel[grid](
            u, v, partials, P, M, N, u.stride(0), u.stride(1), v.stride(0), v.stride(1),
            n_tiles, BLOCK_P=BLOCK_P, BLOCK_K=BLOCK_K, PRECISION=precision)
    return partials.sum((1, 2), dtype=torch.float64).float()  # terms far larger than it

