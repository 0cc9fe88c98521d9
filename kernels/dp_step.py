"""Clipped, noised, scaled sum of per-example gradients, as a Triton kernel.

Math:   out_j[d] = (Σ_b c[b] · (1/K) Σ_k g_j[k, b, d] + noise_std · z[col_j + d]) / divisor
        z = ``normal(seed, column)``: counter-based Philox normals indexed by the
        column's position in the concatenation of the list (``col_j + d``), so tensors
        draw independent noise, a call is reproducible from ``seed``, and a list gets
        bit-identical results to its concatenated flat buffer. Box-Muller with a
        radius from 53 random bits in float64, up to 8.57 (``tl.randn``, its
        uniforms clamped at 1e-7, stops at 5.68: see ``reference.normals``).
Shapes: ``g_j`` ``[K, B, *P_j]`` (``batch_dims=2``) or ``[B, *P_j]`` (``batch_dims=1``),
        viewed as ``[K, B, D_j]``; ``c`` float32 ``[B]`` (clip factors); output
        ``[*P_j]`` in ``g_j``'s dtype. Dtypes float32 / bfloat16 / float16 / float64;
        all arithmetic in float32, one rounding at the store.

Parallelism: one program per chunk of ``BLOCK_D`` columns. It loops over the
B examples and K perturbations, reading each gradient byte exactly once, and
keeps the sum in a float32 register block: the reduction over b is sequential
inside a program, hence deterministic, with no atomics and no partial buffer.

Many tensors: one launch per dtype, through the pointer table of
``_multi_tensor`` (direct pointers when the dtype has a single tensor, e.g. the
flat ``[K, B, D]`` buffer of ``dplis.private_grad``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _multi_tensor as mt
from .backend import interpreting
from .reference import as_kbd

BLOCK_D = 1024  # columns per program; each program streams K * B rows of BLOCK_D
TABLE_COLS: tl.constexpr = tl.constexpr(mt.TABLE_COLS)


@triton.jit
def box_muller(i0, i1, i2):
    """float32 N(0, 1) from three uint32 Philox outputs: the radius √(−2 ln u) with u in
    (0, 1] from 53 of the bits of i0 and i1, in float64; the angle 2π·(i2 >> 8)/2²⁴."""
    u = ((i0 >> 5).to(tl.float64) * 67108864.0 + (i1 >> 6).to(tl.float64) + 1.0) \
        * 1.1102230246251565e-16  # (hi·2²⁶ + lo + 1)·2⁻⁵³
    radius = tl.sqrt(-2.0 * tl.log(u)).to(tl.float32)
    return radius * tl.cos((i2 >> 8).to(tl.float32) * 3.7450702e-07)  # 2π/2²⁴


@triton.jit
def normal(seed, offsets):
    """float32 N(0, 1) per offset: ``box_muller`` of one Philox call per offset."""
    i0, i1, i2, _ = tl.randint4x(seed, offsets)  # uint32 (the bitcasts: whatever it says)
    return box_muller(i0.to(tl.uint32, bitcast=True), i1.to(tl.uint32, bitcast=True),
                      i2.to(tl.uint32, bitcast=True))


# D and row_stride keep Triton's "% 16" specialisation (vectorised loads); the other
# integers would only multiply the compiled variants
@triton.jit(do_not_specialize=["B", "K", "col", "seed"])
def _clipped_noisy_sum_kernel(
    g_ptr,  # [K, B, D] contiguous (direct mode) / typed base pointer (table mode)
    out_ptr,  # [D] (direct mode) / typed base pointer (table mode)
    factors_ptr,  # float32 [B]
    tensor_table_ptr,  # int64 [m, TABLE_COLS] (table mode only)
    chunk_table_ptr,  # int64 [n_chunks, 2] (table mode only)
    B,
    K,
    D,  # columns of the tensor (direct mode only)
    col,  # global column of the tensor's column 0: the noise counter (direct mode only)
    row_stride,  # B * D: distance between g[k, b] and g[k + 1, b] (direct mode only)
    seed,
    noise_std,
    divisor,
    MULTI: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    if MULTI:
        start, src, dst, D, col = mt.table_entry(chunk_table_ptr, tensor_table_ptr, pid,
                                                 TABLE_COLS)
        g_ptr, out_ptr = src.to(g_ptr.dtype), dst.to(out_ptr.dtype)
        row_stride = D * B
    else:
        start = pid * BLOCK_D
    cols = start + tl.arange(0, BLOCK_D)
    mask = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    example_ptrs = g_ptr + cols  # g[0, b, cols]
    for b in range(B):
        factor = tl.load(factors_ptr + b)
        ptrs = example_ptrs
        inner = tl.zeros([BLOCK_D], dtype=tl.float32)
        for _ in range(K):
            inner += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            ptrs += row_stride
        acc += factor * inner
        example_ptrs += D
    acc = acc / K
    if HAS_NOISE:
        acc += noise_std * normal(seed, col + cols)
    acc = acc / divisor
    tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


_clipped_noisy_sum_tuned = triton.autotune(
    configs=[triton.Config({}, num_warps=w) for w in (4, 8)],
    # not B: Poisson batches differ in size at almost every step, and the config cannot
    # change the result (each column's sum runs in a fixed order inside one program)
    key=["K", "D", "MULTI", "HAS_NOISE"],
)(_clipped_noisy_sum_kernel)


def _launch(
    group: mt.Group,
    outputs: list[torch.Tensor],
    factors: torch.Tensor,
    K: int,
    B: int,
    seed: int,
    noise_std: float,
    divisor: float,
) -> None:
    """One launch for one dtype group, writing ``outputs`` (flat ``[D_j]``, same order)."""
    tensor_table, chunk_table, n_chunks = mt.build_tables(group, BLOCK_D, outputs)
    D, col = (0, 0) if group.multi else (group.numels[0], group.cols[0])
    args = (
        group.inputs[0], outputs[0], factors, tensor_table, chunk_table,
        B, K, D, col, B * D, seed, noise_std, divisor,
    )  # fmt: skip
    meta = dict(MULTI=group.multi, HAS_NOISE=noise_std > 0, BLOCK_D=BLOCK_D)
    if interpreting():  # autotuning under the interpreter only costs time
        _clipped_noisy_sum_kernel[(n_chunks,)](*args, **meta)
    else:
        _clipped_noisy_sum_tuned[(n_chunks,)](*args, **meta)


def clipped_noisy_sum_triton(
    grads: list[torch.Tensor],
    factors: torch.Tensor,
    *,
    noise_std: float,
    divisor: float,
    seed: int,
    batch_dims: int,
) -> list[torch.Tensor]:
    """(Σ_b c_b · mean_k g_j[k, b] + N(0, noise_std²)) / divisor -> ``[*P_j]`` per tensor."""
    kbd = [as_kbd(g.detach(), batch_dims) for g in grads]
    K, B = kbd[0].shape[:2]
    device = kbd[0].device
    if factors.shape != (B,):
        raise ValueError(f"factors must be [B] = [{B}], got {tuple(factors.shape)}")
    factors = factors.to(device=device, dtype=torch.float32).contiguous()
    flat_out = [torch.empty(t.shape[2], dtype=t.dtype, device=device) for t in kbd]
    groups, _ = mt.group_by_dtype(kbd, [t.shape[2] for t in kbd])
    with mt.device_guard(device):
        for group in groups:
            outputs = [flat_out[i] for i in group.indices]
            _launch(group, outputs, factors, K, B, seed, noise_std, divisor)
    return [o.view(g.shape[batch_dims:]) for o, g in zip(flat_out, grads, strict=True)]
