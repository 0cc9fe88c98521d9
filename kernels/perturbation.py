"""K perturbed copies of the parameters, as a Triton kernel.

(Named ``perturbation``, not ``perturb``: importing a submodule ``dplis.kernels.perturb``
would rebind the package attribute ``dplis.kernels.perturb``, the public function.)

Math:   out_j[k, d] = θ_j[d] + std · z[k // 4, col_j + d][k % 4]
        z = ``tl.randn4x(seed, counter)``: one Philox call gives four normals, used
        for four consecutive perturbations k; the counter of (k // 4, column) is
        ``(k // 4) · D_total + col_j + d`` with ``col_j`` the tensor's position in the
        concatenation of the list, so every (k, element) gets its own normal, the call
        is reproducible from ``seed``, and a list gets the same values as its
        concatenated flat buffer. Each u_k is generated once, in registers.
Shapes: ``θ_j`` ``[*P_j]`` -> ``[K, *P_j]`` in ``θ_j``'s dtype (float32 / bfloat16 /
        float16 / float64); arithmetic in float32, one rounding at the store.

Parallelism: one program per chunk of ``BLOCK_D`` parameters: it loads θ once and
writes its K perturbed copies (K · BLOCK_D stores), so θ is read once and the
output written once.

Many tensors: one launch per dtype, through the pointer table of
``_multi_tensor`` (direct pointers when the dtype has a single tensor, e.g. the
flat parameter vector of ``dplis.private_grad``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _multi_tensor as mt
from .backend import interpreting

BLOCK_D = 1024  # parameters per program; each program writes K rows of BLOCK_D
TABLE_COLS: tl.constexpr = tl.constexpr(mt.TABLE_COLS)


# D keeps Triton's "% 16" specialisation (vectorised loads); the other
# integers would only multiply the compiled variants
@triton.jit(do_not_specialize=["K", "col", "total_cols", "seed"])
def _perturb_kernel(
    p_ptr,  # [D] contiguous (direct mode) / typed base pointer (table mode)
    out_ptr,  # [K, D] (direct mode) / typed base pointer (table mode)
    tensor_table_ptr,  # int64 [m, TABLE_COLS] (table mode only)
    chunk_table_ptr,  # int64 [n_chunks, 2] (table mode only)
    K,
    D,  # parameters in the tensor (direct mode only)
    col,  # global column of the tensor's element 0 (direct mode only)
    total_cols,  # D_total: columns of the whole list, the counter stride per 4 copies
    seed,
    std,
    MULTI: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    if MULTI:
        start, src, dst, D, col = mt.table_entry(chunk_table_ptr, tensor_table_ptr, pid,
                                                 TABLE_COLS)
        p_ptr, out_ptr = src.to(p_ptr.dtype), dst.to(out_ptr.dtype)
    else:
        start = pid * BLOCK_D
    cols = start + tl.arange(0, BLOCK_D)
    mask = cols < D
    theta = tl.load(p_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    counter = col + cols  # int64: (k // 4) * total_cols is added one step at a time
    row0 = out_ptr + cols  # out[k0, cols]; rows advance by pointer steps of D (no int32 products)
    out_ty = out_ptr.dtype.element_ty
    for k0 in range(0, K, 4):
        row1 = row0 + D
        row2 = row1 + D
        row3 = row2 + D
        if HAS_NOISE:
            z0, z1, z2, z3 = tl.randn4x(seed, counter)
            v0 = theta + std * z0
            v1 = theta + std * z1
            v2 = theta + std * z2
            v3 = theta + std * z3
        else:
            v0 = theta
            v1 = theta
            v2 = theta
            v3 = theta
        tl.store(row0, v0.to(out_ty), mask=mask)
        if k0 + 1 < K:
            tl.store(row1, v1.to(out_ty), mask=mask)
        if k0 + 2 < K:
            tl.store(row2, v2.to(out_ty), mask=mask)
        if k0 + 3 < K:
            tl.store(row3, v3.to(out_ty), mask=mask)
        row0 = row3 + D
        counter += total_cols


_perturb_tuned = triton.autotune(
    configs=[triton.Config({}, num_warps=w) for w in (4, 8)],
    key=["K", "D", "MULTI", "HAS_NOISE"],
)(_perturb_kernel)


def perturb_triton(
    params: list[torch.Tensor], *, std: float, num_perturbations: int, seed: int
) -> list[torch.Tensor]:
    """θ_j + std · u_kj with u ~ N(0, I) -> ``[K, *P_j]`` per parameter (see module doc)."""
    K = num_perturbations
    if K < 1:
        raise ValueError(f"num_perturbations must be >= 1, got {K}")
    flat = [p.detach().reshape(-1) for p in params]
    device = flat[0].device
    flat_out = [torch.empty((K, t.numel()), dtype=t.dtype, device=device) for t in flat]
    groups, total_cols = mt.group_by_dtype(flat, [t.numel() for t in flat])
    with mt.device_guard(device):
        for group in groups:
            outputs = [flat_out[i] for i in group.indices]
            tensor_table, chunk_table, n_chunks = mt.build_tables(group, BLOCK_D, outputs)
            D, col = (0, 0) if group.multi else (group.numels[0], group.cols[0])
            args = (
                group.inputs[0], outputs[0], tensor_table, chunk_table,
                K, D, col, total_cols, seed, std,
            )  # fmt: skip
            meta = dict(MULTI=group.multi, HAS_NOISE=std > 0, BLOCK_D=BLOCK_D)
            if interpreting():  # autotuning under the interpreter only costs time
                _perturb_kernel[(n_chunks,)](*args, **meta)
            else:
                _perturb_tuned[(n_chunks,)](*args, **meta)
    return [o.view(K, *p.shape) for o, p in zip(flat_out, params, strict=True)]
