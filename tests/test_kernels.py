"""dplis.kernels: Triton kernels against float64 gold and the plain-torch reference.

Device: CUDA (compiled Triton) when CUDA is available and TRITON_INTERPRET is unset
or "0"; otherwise CPU tensors with Triton's interpreter (TRITON_INTERPRET=1).

Accuracy rule (three-way, as in Liger-Kernel): with ``gold`` computed in float64 from
the same inputs and ``plain`` computed by plain torch in the input dtype,
``max|kernel - gold| <= 2 * max|plain - gold| + atol``, where atol is one unit of
rounding of the output dtype at the scale of the result (eps · max|gold|). The Triton kernels
accumulate in float32, so in bf16/fp16 they beat ``plain`` by a wide margin; in
float32 they must be as good as torch.

Noise is checked statistically: sample mean and standard deviation within 6 standard
errors (computed from n), so a correct kernel fails with probability < 1e-8.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():  # must precede any triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dplis.kernels import (  # noqa: E402
    NonFiniteError,
    add_noise,
    fused_dp_step,
    ghost_sq_norms,
    per_sample_norms,
    perturb,
)
from dplis.kernels import reference as ref  # noqa: E402
from dplis.kernels.backend import interpreting, triton_available  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
TRITON_OK = triton_available() and (DEVICE == "cuda" or interpreting())
needs_triton = pytest.mark.skipif(
    not TRITON_OK,
    reason="triton is not importable"
    if not triton_available()
    else "Triton needs CUDA tensors or TRITON_INTERPRET=1",
)
TRITON = pytest.param("triton", marks=needs_triton)
BACKENDS = [TRITON, "torch"]
LOW = [torch.float32, torch.bfloat16, torch.float16]

# (K, B, parameter shapes): sizes off the block sizes, lists served by the pointer table
CASES = [
    (1, 1, [(7,)]),
    (3, 5, [(1000,)]),
    (1, 64, [(4099,)]),
    (3, 5, [(7, 3), (1,), (1000,), (4099,)]),
    (3, 64, [(1,), (33, 7)]),
]
CASE_IDS = ["K1B1D7", "K3B5D1000", "K1B64D4099", "K3B5-four-tensors", "K3B64-two-tensors"]


def make_grads(K, B, shapes, dtype, seed=0, batch_dims=2):
    gen = torch.Generator().manual_seed(seed)
    lead = (K, B) if batch_dims == 2 else (B,)
    out = []
    for i, s in enumerate(shapes):
        g = torch.randn(*lead, *s, generator=gen) * (1 + i)  # tensors of different scales
        out.append(g.to(DEVICE, dtype))
    return out


def kbd(g, batch_dims=2):
    return ref.as_kbd(g, batch_dims)


def assert_three_way(out, gold, plain, what=""):
    """max|out - gold| <= 2 max|plain - gold| + eps(out dtype) * max|gold| (see module doc)."""
    out_d = torch.cat([o.double().reshape(-1).cpu() for o in out])
    gold_d = torch.cat([g.double().reshape(-1).cpu() for g in gold])
    plain_d = torch.cat([p.double().reshape(-1).cpu() for p in plain])
    if gold_d.numel() == 0:
        return
    eps = torch.finfo(out[0].dtype).eps
    atol = eps * max(gold_d.abs().max().item(), 1e-30)
    err = (out_d - gold_d).abs().max().item()
    err_plain = (plain_d - gold_d).abs().max().item()
    assert err <= 2 * err_plain + atol, f"{what}: error {err:.3g}, plain torch {err_plain:.3g}"


def gold_norms(grads, batch_dims=2):
    return sum(kbd(g, batch_dims).double().mean(0).pow(2).sum(1) for g in grads).sqrt()


def plain_norms(grads, batch_dims=2):  # everything in the input dtype
    return sum(kbd(g, batch_dims).mean(0).pow(2).sum(1) for g in grads).sqrt()


def clipped_sum(grads, factors, batch_dims=2):
    """Σ_b c_b mean_k g[k, b] in the dtype of ``factors`` (multiplied in, summed over k, b)."""
    out = []
    for g in grads:
        x = kbd(g, batch_dims).to(factors.dtype)
        s = (factors[None, :, None] * x).sum(dim=(0, 1)) / x.shape[0]
        out.append(s.reshape(g.shape[batch_dims:]))
    return out


def gold_step(grads, C, divisor, noise=None, batch_dims=2):
    """float64 gold of fused_dp_step; ``noise`` (the float32 noise the backend drew) is added."""
    factors = (C / (gold_norms(grads, batch_dims) + ref.EPS)).clamp(max=1.0)
    sums = clipped_sum(grads, factors, batch_dims)
    if noise is not None:
        sums = [s + n.double() for s, n in zip(sums, noise)]
    return [s / divisor for s in sums]


def plain_step(grads, C, divisor, noise=None, batch_dims=2):
    """fused_dp_step computed by plain torch in the input dtype."""
    dt = grads[0].dtype
    factors = (C / (plain_norms(grads, batch_dims) + ref.EPS)).clamp(max=1.0).to(dt)
    sums = clipped_sum(grads, factors, batch_dims)
    if noise is not None:
        sums = [s + n.to(dt) for s, n in zip(sums, noise)]
    return [s / divisor for s in sums]


def draw_noise(grads, backend, noise_std, seed, batch_dims=2):
    """The float32 noise a backend adds: its output on all-zero gradients, times divisor=1."""
    zeros = [torch.zeros_like(g, dtype=torch.float32) for g in grads]
    out, _ = fused_dp_step(
        zeros,
        max_grad_norm=1.0,
        noise_std=noise_std,
        divisor=1.0,
        seed=seed,
        backend=backend,
        batch_dims=batch_dims,
    )
    return out


def check_normal(x, mean=0.0, std=1.0, what=""):
    """Sample mean and std of ``x`` within 6 standard errors of N(mean, std²)."""
    x = x.double().reshape(-1).cpu()
    n = x.numel()
    m, s = x.mean().item(), x.std().item()
    assert abs(m - mean) <= 6 * std / math.sqrt(n), f"{what}: mean {m:.4g}, n={n}"
    assert abs(s - std) <= 6 * std / math.sqrt(2 * (n - 1)), f"{what}: std {s:.4g}, n={n}"


# --------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_norms_accuracy(case, dtype, backend):
    K, B, shapes = case
    grads = make_grads(K, B, shapes, dtype)
    out = per_sample_norms(grads, backend=backend, batch_dims=2)
    assert out.dtype == torch.float32 and out.shape == (B,)
    assert_three_way([out], [gold_norms(grads)], [plain_norms(grads)], "norms")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_dp_step_accuracy(case, dtype, backend):
    K, B, shapes = case
    grads = make_grads(K, B, shapes, dtype, seed=1)
    C = 0.5 * gold_norms(grads).median().item()  # about half the examples are clipped
    noise = draw_noise(grads, backend, noise_std=0.3, seed=11)
    out, norms = fused_dp_step(
        grads, max_grad_norm=C, noise_std=0.3, divisor=3.0, seed=11, backend=backend, batch_dims=2
    )
    assert [o.shape for o in out] == [g.shape[2:] for g in grads]
    assert all(o.dtype == dtype for o in out)
    assert_three_way([norms], [gold_norms(grads)], [plain_norms(grads)], "norms")
    assert_three_way(
        out, gold_step(grads, C, 3.0, noise), plain_step(grads, C, 3.0, noise), "clipped noisy sum"
    )


@needs_triton
@pytest.mark.parametrize("case", CASES[2:4], ids=CASE_IDS[2:4])
def test_triton_matches_reference_without_noise(case):
    K, B, shapes = case
    grads = make_grads(K, B, shapes, torch.float32, seed=2)
    C = gold_norms(grads).median().item()
    kw = dict(max_grad_norm=C, noise_std=0.0, divisor=7.0, seed=0, batch_dims=2)
    out_t, n_t = fused_dp_step(grads, backend="triton", **kw)
    out_r, n_r = fused_dp_step(grads, backend="torch", **kw)
    torch.testing.assert_close(n_t, n_r, rtol=1e-5, atol=1e-6)
    for a, b in zip(out_t, out_r):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_and_float64(backend, K):
    grads = [
        g.to(dt)
        for g, dt in zip(
            make_grads(K, 5, [(100,), (7, 9), (4099,), (13,)], torch.float32, seed=3),
            [torch.float32, torch.bfloat16, torch.float64, torch.bfloat16],
        )
    ]
    kw = dict(max_grad_norm=5.0, noise_std=0.0, divisor=2.0, seed=0, batch_dims=2)
    out, norms = fused_dp_step(grads, backend=backend, **kw)
    out_r, norms_r = fused_dp_step(grads, backend="torch", **kw)
    torch.testing.assert_close(norms, norms_r, rtol=1e-5, atol=1e-6)
    for o, r, g in zip(out, out_r, grads):
        assert o.dtype == g.dtype
        tol = 1e-5 if g.dtype in (torch.float32, torch.float64) else 1e-2
        torch.testing.assert_close(o, r, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_grads(backend):
    grads = [torch.zeros(3, 5, 1000, device=DEVICE), torch.zeros(3, 5, 7, device=DEVICE)]
    out, norms = fused_dp_step(
        grads, max_grad_norm=1.0, noise_std=0.0, divisor=5.0, backend=backend, seed=0
    )
    assert torch.equal(norms, torch.zeros(5, device=DEVICE))
    assert all(torch.equal(o, torch.zeros_like(o)) for o in out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_huge_gradient_is_clipped(backend):
    grads = make_grads(3, 5, [(1000,), (7,)], torch.float32, seed=4)
    for g in grads:
        g[:, 2] *= 1e4
    C = 1.0
    out, norms = fused_dp_step(
        grads, max_grad_norm=C, noise_std=0.0, divisor=1.0, backend=backend, seed=0
    )
    factors = ref.clip_factors(norms, C)
    assert factors[2] < 1e-3
    assert_three_way(out, gold_step(grads, C, 1.0), plain_step(grads, C, 1.0), "huge")
    # the huge example contributes at most C
    alone = [g[:, 2:3] for g in grads]
    out_alone, _ = fused_dp_step(
        alone, max_grad_norm=C, noise_std=0.0, divisor=1.0, backend=backend, seed=0
    )
    total = math.sqrt(sum(o.double().pow(2).sum().item() for o in out_alone))
    assert total <= C * (1 + 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_clip_is_plain_mean_sum(backend):
    grads = make_grads(3, 5, [(1000,), (4, 7)], torch.float32, seed=5)
    out, _ = fused_dp_step(
        grads, max_grad_norm=1e9, noise_std=0.0, divisor=5.0, backend=backend, seed=0
    )
    for o, g in zip(out, grads):
        torch.testing.assert_close(o, g.mean(0).sum(0) / 5.0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    grads = [torch.zeros(2, 0, 10, device=DEVICE), torch.zeros(2, 0, 3, 3, device=DEVICE)]
    assert per_sample_norms(grads, backend=backend, batch_dims=2).shape == (0,)
    out, norms = fused_dp_step(
        grads, max_grad_norm=1.0, noise_std=0.0, divisor=1.0, backend=backend, seed=0, batch_dims=2
    )
    assert norms.shape == (0,)
    assert [o.shape for o in out] == [(10,), (3, 3)]
    assert all(torch.equal(o, torch.zeros_like(o)) for o in out)
    noisy, _ = fused_dp_step(
        grads, max_grad_norm=1.0, noise_std=1.0, divisor=2.0, backend=backend, seed=0, batch_dims=2
    )
    assert all(torch.isfinite(o).all() and o.abs().sum() > 0 for o in noisy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_parameter_in_list(backend):
    grads = [torch.randn(2, 3, 0, device=DEVICE), torch.randn(2, 3, 5, device=DEVICE)]
    out, norms = fused_dp_step(
        grads, max_grad_norm=1.0, noise_std=0.0, divisor=1.0, backend=backend, seed=0, batch_dims=2
    )
    assert [o.shape for o in out] == [(0,), (5,)]
    torch.testing.assert_close(norms, per_sample_norms(grads[1:], backend="torch", batch_dims=2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    base = make_grads(3, 5, [(40, 30)], torch.float32, seed=6)[0]
    views = [base.transpose(2, 3), base[:, :, ::3, 1:], base[..., 0]]
    assert not any(v.is_contiguous() for v in views)
    kw = dict(max_grad_norm=3.0, noise_std=0.5, divisor=2.0, seed=9, backend=backend)
    out, norms = fused_dp_step(views, **kw)
    out_c, norms_c = fused_dp_step([v.contiguous() for v in views], **kw)
    torch.testing.assert_close(norms, norms_c, rtol=1e-6, atol=0)
    for o, oc in zip(out, out_c):
        torch.testing.assert_close(o, oc, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_dims_1_is_k_equal_1(backend):
    grads = make_grads(1, 5, [(1000,), (7, 3)], torch.bfloat16, seed=7, batch_dims=1)
    kw = dict(max_grad_norm=2.0, noise_std=0.5, divisor=2.0, seed=3, backend=backend)
    out1, n1 = fused_dp_step(grads, batch_dims=1, **kw)
    out2, n2 = fused_dp_step([g.unsqueeze(0) for g in grads], batch_dims=2, **kw)
    assert torch.equal(n1, n2)
    assert all(torch.equal(a, b) for a, b in zip(out1, out2))
    assert [o.shape for o in out1] == [g.shape[1:] for g in grads]


@needs_triton
def test_triton_list_equals_flat_buffer():
    """The global column space: a list and its concatenation get the same noise and sums."""
    grads = make_grads(3, 5, [(1000,), (7, 3), (4099,)], torch.float32, seed=8)
    flat = torch.cat([kbd(g) for g in grads], dim=2)
    # no clipping (factors exactly 1): norms of a list and of its concatenation round
    # differently, and clip factors would pass that on to the sums
    kw = dict(max_grad_norm=1e9, noise_std=1.0, divisor=2.0, seed=5, backend="triton")
    out, norms = fused_dp_step(grads, **kw)
    (out_flat,), norms_flat = fused_dp_step([flat], **kw)
    torch.testing.assert_close(norms, norms_flat, rtol=1e-6, atol=0)
    assert torch.equal(torch.cat([o.reshape(-1) for o in out]), out_flat)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    grads = make_grads(3, 5, [(4099,), (7,)], torch.bfloat16, seed=9)
    kw = dict(max_grad_norm=1.0, noise_std=1.0, divisor=2.0, seed=1, backend=backend)
    (a, b), n1 = fused_dp_step(grads, **kw)
    (c, d), n2 = fused_dp_step(grads, **kw)
    assert torch.equal(n1, n2) and torch.equal(a, c) and torch.equal(b, d)


# --------------------------------------------------------------------------- noise


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_statistics_and_seeds(backend):
    grads = [torch.zeros(1, 2, 30000, device=DEVICE), torch.zeros(1, 2, 20000, device=DEVICE)]
    kw = dict(max_grad_norm=1.0, noise_std=2.0, divisor=4.0, backend=backend)
    (a1, b1), _ = fused_dp_step(grads, seed=123, **kw)
    check_normal(torch.cat([a1, b1]) * 4.0 / 2.0, what="noise")
    (a2, b2), _ = fused_dp_step(grads, seed=123, **kw)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)  # same seed, same noise
    (a3, b3), _ = fused_dp_step(grads, seed=124, **kw)
    x, y = torch.cat([a1, b1]).double().cpu(), torch.cat([a3, b3]).double().cpu()
    rho = torch.corrcoef(torch.stack([x, y]))[0, 1].item()
    assert abs(rho) < 6 / math.sqrt(x.numel()), f"seeds 123/124 correlated: {rho}"
    # two tensors of one call draw independent noise, and so do the tensors of calls with
    # consecutive seeds (the torch path once seeded tensor j with seed + j: b1 was a3's start)
    for p, q, what in ((a1[:20000], b1, "tensors of a call"), (a3[:20000], b1, "seed+1, seed")):
        rho = torch.corrcoef(torch.stack([p, q]).double().cpu())[0, 1].item()
        assert abs(rho) < 6 / math.sqrt(20000), f"{what} share noise: {rho}"


TORCH_RANDN_BOUND = math.sqrt(-2 * math.log(2.0**-24))  # 5.77: 24-bit uniforms
REACH = math.sqrt(-2 * math.log(2.0**-53))  # 8.57: 53-bit uniforms


def test_torch_noise_reaches_beyond_float32_box_muller():
    """torch.randn's normals stop at 5.77 (24-bit uniforms): a clipped gradient pushing one
    coordinate past that shows its example was in the batch (the noise audit: δ ≥ 2e-5 at
    the training command's default run, which claims 1e-5). The noise's radius now comes
    from 53 random bits: the largest uniform gives 8.57."""
    extreme = ref.box_muller(torch.tensor([1 - 2.0**-53, 0.0], dtype=torch.float64),
                             torch.tensor([0.0, 0.25]))
    assert extreme[0].item() == pytest.approx(REACH, rel=1e-6) and REACH > TORCH_RANDN_BOUND + 2
    assert extreme[1].item() == 0.0 and abs(extreme[3].item()) < 1e-7  # radius 0; sin(π/2)·0
    gen = torch.Generator().manual_seed(0)
    check_normal(ref.normals(200_001, gen, torch.device("cpu")), what="noise")


if TRITON_OK:  # a kernel feeding chosen Philox words to the noise's Box-Muller
    import triton
    import triton.language as tl
    from dplis.kernels import dp_step

    @triton.jit
    def _box_muller_probe(bits_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        mask = i < n
        i0 = tl.load(bits_ptr + 3 * i, mask=mask, other=0).to(tl.uint32)
        i1 = tl.load(bits_ptr + 3 * i + 1, mask=mask, other=0).to(tl.uint32)
        i2 = tl.load(bits_ptr + 3 * i + 2, mask=mask, other=0).to(tl.uint32)
        tl.store(out_ptr + i, dp_step.box_muller(i0, i1, i2), mask=mask)


def test_the_torch_paths_noise_is_drawn_by_normals():
    """The noise of ``fused_dp_step`` and ``add_noise`` on the torch path is ``ref.normals``
    of the call's generator, tensor after tensor: the sampler above, not torch.randn (the
    review: undoing the fix left every other test passing)."""
    zeros = [torch.zeros(1, 1, 1000), torch.zeros(1, 1, 77)]
    (a, b), _ = fused_dp_step(zeros, max_grad_norm=1.0, noise_std=2.0, divisor=4.0, seed=5,
                              backend="torch")
    gen = ref.generator(torch.device("cpu"), 5)
    expected = [ref.normals(n, gen, torch.device("cpu")) * 2.0 / 4.0 for n in (1000, 77)]
    assert torch.allclose(a, expected[0], rtol=1e-6, atol=0)
    assert torch.allclose(b, expected[1], rtol=1e-6, atol=0)
    (c,) = add_noise([torch.zeros(1000)], noise_std=2.0, divisor=4.0, seed=5, backend="torch")
    assert torch.equal(c, a)


if TRITON_OK:
    @triton.jit
    def _normal_probe(out_ptr, words_ptr, seed, n, BLOCK: tl.constexpr):
        """dp_step.normal(seed, i) and the three Philox words it reads, for i < n."""
        i = tl.arange(0, BLOCK)
        mask = i < n
        tl.store(out_ptr + i, dp_step.normal(seed, i.to(tl.int64)), mask=mask)
        i0, i1, i2, _ = tl.randint4x(seed, i.to(tl.int64))
        for j, word in ((0, i0), (1, i1), (2, i2)):
            tl.store(words_ptr + 3 * i + j, word.to(tl.int64) & 0xFFFFFFFF, mask=mask)


@needs_triton
def test_the_kernels_noise_is_box_muller_of_its_philox_words():
    """``fused_dp_step``'s Triton noise at column d is ``dp_step.normal(seed, d)``, which is
    the 53-bit radius formula of that column's Philox words (computed here in float64),
    not ``tl.randn``."""
    n, seed = 300, 11
    out = torch.empty(n, device=DEVICE)
    words = torch.empty(n, 3, dtype=torch.int64, device=DEVICE)
    _normal_probe[(1,)](out, words, seed, n, BLOCK=512)
    w = words.cpu().double()
    u = ((w[:, 0] // 32) * 2.0**26 + w[:, 1] // 64 + 1) * 2.0**-53
    angle = (w[:, 2] // 256) * (2 * math.pi / 2**24)
    expected = torch.sqrt(-2 * torch.log(u)) * torch.cos(angle)
    assert torch.allclose(out.cpu().double(), expected, rtol=1e-5, atol=1e-6)
    (noise,), _ = fused_dp_step([torch.zeros(1, 1, n, device=DEVICE)], max_grad_norm=1.0,
                                noise_std=1.0, divisor=1.0, seed=seed, backend="triton")
    assert torch.equal(noise, out)


@needs_triton
def test_triton_noise_reaches_beyond_float32_box_muller():
    """The kernel's normals: ``tl.randn`` stops at 5.68 (its uniforms are clamped at 1e-7);
    ``dp_step.box_muller`` reaches 8.57 at the smallest 53-bit uniform (all bits 0)."""
    ones = 2**32 - 1
    bits = torch.tensor([[0, 0, 0], [ones, ones, 0], [0, 0, 2**30]], dtype=torch.int64,
                        device=DEVICE)
    out = torch.empty(3, device=DEVICE)
    _box_muller_probe[(1,)](bits, out, 3, BLOCK=4)
    assert out[0].item() == pytest.approx(REACH, rel=1e-6)  # u = 2⁻⁵³, angle 0
    assert out[1].item() == 0.0  # u = 1
    assert abs(out[2].item()) < 1e-5  # angle π/2: cos 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeds_up_to_2_pow_63(backend):
    """Any seed in [0, 2**63). Triton's Philox reads all 64 bits; CPU's mt19937 (the torch
    path here) only the low 32, which is why the trainer's noise seeds are consecutive."""
    zeros = [torch.zeros(1, 1, 4096, device=DEVICE)]
    kw = dict(max_grad_norm=1.0, noise_std=1.0, divisor=1.0, backend=backend)
    low, high = 12345, 12345 + 2**32 * 977
    (a,), _ = fused_dp_step(zeros, seed=low, **kw)
    (b,), _ = fused_dp_step(zeros, seed=high, **kw)
    (c,), _ = fused_dp_step(zeros, seed=2**63 - 1, **kw)
    check_normal(c, what="noise at seed 2**63 - 1")
    u = perturb([torch.zeros(4096, device=DEVICE)], std=1.0, num_perturbations=2,
                seed=2**63 - 1, backend=backend)[0]
    check_normal(u, what="perturbations at seed 2**63 - 1")
    if backend == "torch" and DEVICE == "cpu":
        assert torch.equal(a, b)  # the documented limit of mt19937 seeding
    else:
        rho = torch.corrcoef(torch.stack([a, b]).double().cpu())[0, 1].item()
        assert abs(rho) < 6 / math.sqrt(a.numel()), f"the high 32 bits are ignored: {rho}"


# --------------------------------------------------------------------------- perturb


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [1, 3, 6])
def test_perturb_statistics_and_seeds(K, backend):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(DEVICE) for s in [(20000,), (7, 3)]]
    out = perturb(params, std=0.1, num_perturbations=K, seed=42, backend=backend)
    assert [o.shape for o in out] == [(K, 20000), (K, 7, 3)]
    check_normal((out[0] - params[0]) / 0.1, what="perturbation")
    if K > 1:
        assert not torch.equal(out[0][0], out[0][1]) and not torch.equal(out[1][0], out[1][-1])
    again = perturb(params, std=0.1, num_perturbations=K, seed=42, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(out, again))
    other = perturb(params, std=0.1, num_perturbations=K, seed=43, backend=backend)
    assert not torch.equal(out[0], other[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_perturb_draws_fresh_normals_everywhere(backend):
    """No normal is reused across copies k or tensors (e.g. by overlapping RNG counters)."""
    K, shapes = 7, [(1000,), (3, 5), (1,)]
    u = perturb(
        [torch.zeros(s, device=DEVICE) for s in shapes],
        std=1.0,
        num_perturbations=K,
        seed=17,
        backend=backend,
    )
    assert [t.shape for t in u] == [(K, *s) for s in shapes]
    values = torch.cat([t.reshape(-1) for t in u]).cpu()
    n = values.numel()
    # float32 normals from 32-bit uniforms almost never collide: a handful of equal pairs
    # at most, where reused counters would repeat about n / K values
    assert n - torch.unique(values).numel() <= 3
    check_normal(values, what="perturbation")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_perturb_accuracy(dtype, backend):
    gen = torch.Generator().manual_seed(1)
    shapes = [(4099,), (7,), (), (33, 31)]
    params = [torch.randn(s, generator=gen).to(DEVICE, dtype) for s in shapes]
    K, std = 3, 0.25
    # the noise depends on (seed, position) only: read it off zero float32 parameters
    u = perturb(
        [torch.zeros(s, device=DEVICE) for s in shapes],
        std=1.0,
        num_perturbations=K,
        seed=5,
        backend=backend,
    )
    out = perturb(params, std=std, num_perturbations=K, seed=5, backend=backend)
    assert [o.shape for o in out] == [(K, *s) for s in shapes]
    assert all(o.dtype == dtype for o in out)
    gold = [p.double() + std * n.double() for p, n in zip(params, u)]
    plain = [p + std * n.to(dtype) for p, n in zip(params, u)]
    assert_three_way(out, gold, plain, "perturb")
    zero = perturb(params, std=0.0, num_perturbations=K, seed=5, backend=backend)
    assert all(torch.equal(z, p.expand(K, *p.shape)) for z, p in zip(zero, params))


@needs_triton
def test_triton_perturb_list_equals_flat_and_non_contiguous():
    gen = torch.Generator().manual_seed(2)
    params = [torch.randn(40, 30, generator=gen).t().to(DEVICE), torch.randn(1000).to(DEVICE)]
    out = perturb(params, std=1.0, num_perturbations=5, seed=3, backend="triton")
    flat = torch.cat([p.reshape(-1) for p in params])
    (out_flat,) = perturb([flat], std=1.0, num_perturbations=5, seed=3, backend="triton")
    assert torch.equal(torch.cat([o.reshape(5, -1) for o in out], dim=1), out_flat)
    # loading the Triton module must not shadow the public function (dplis.kernels.perturb)
    import dplis.kernels

    assert callable(dplis.kernels.perturb)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_finite_gradient_raises(bad, dtype, backend):
    grads = make_grads(3, 5, [(1000,), (7,)], dtype, seed=10)
    grads[1][1, 3, 4] = bad
    # the example is named: index 3 of the 5 (dim 1; dim 0 is the perturbations)
    with pytest.raises(NonFiniteError, match=r"gradients of 1 of 5 examples \(index 3\)"):
        fused_dp_step(grads, max_grad_norm=1.0, noise_std=1.0, divisor=1.0, seed=0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments(backend):
    grads = make_grads(1, 2, [(5,)], torch.float32)
    ok = dict(max_grad_norm=1.0, noise_std=1.0, divisor=1.0, seed=0, backend=backend)
    for change, err in [
        (dict(backend="cuda"), ValueError),
        (dict(noise_std=-1.0), ValueError),
        (dict(max_grad_norm=0.0), ValueError),
        (dict(max_grad_norm=-1.0), ValueError),
        (dict(divisor=0.0), ValueError),
        (dict(divisor=-2.0), ValueError),
        (dict(seed=-1), ValueError),
        (dict(seed=2**63), ValueError),
        (dict(batch_dims=3), ValueError),
        (dict(batch_dims=2.0), ValueError),
        (dict(batch_dims=True), ValueError),
        (dict(max_grad_norm=None), TypeError),
        (dict(max_grad_norm="1"), TypeError),
        (dict(divisor=True), TypeError),
        (dict(noise_std=False), TypeError),
        (dict(seed=1.0), ValueError),
        (dict(seed=True), ValueError),
    ]:
        with pytest.raises(err, match=next(iter(change))):
            fused_dp_step(grads, **{**ok, **change})
    # a numpy integer is a seed like any int
    np = pytest.importorskip("numpy")
    assert torch.equal(fused_dp_step(grads, **{**ok, "seed": np.int64(3)})[0][0],
                       fused_dp_step(grads, **{**ok, "seed": 3})[0][0])
    with pytest.raises(TypeError):
        fused_dp_step([1.0, 2.0], **ok)
    with pytest.raises(TypeError):
        fused_dp_step([torch.ones(1, 2, 3, dtype=torch.int32, device=DEVICE)], **ok)
    with pytest.raises(ValueError):
        fused_dp_step([], **ok)
    with pytest.raises(ValueError):
        per_sample_norms([torch.ones(2, 3, 4), torch.ones(3, 3, 4)], batch_dims=2, backend=backend)
    params = [torch.ones(3, device=DEVICE)]
    with pytest.raises(ValueError):
        perturb(params, std=0.1, num_perturbations=0, seed=0, backend=backend)
    with pytest.raises(TypeError):
        perturb(params, std=0.1, num_perturbations=2.0, seed=0, backend=backend)
    with pytest.raises(ValueError):
        perturb(params, std=-0.1, num_perturbations=2, seed=0, backend=backend)
    with pytest.raises(TypeError):
        perturb(
            [torch.ones(3, dtype=torch.int64)],
            std=0.1,
            num_perturbations=2,
            seed=0,
            backend=backend,
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_refused_call_leaves_the_global_rng_alone(backend):
    """seed=None draws from torch's global RNG only once the call can no longer fail."""
    grads = make_grads(2, 3, [(5,)], torch.float32, seed=1)
    bad = [grads[0].clone()]
    bad[0][0, 1, 2] = float("nan")
    params = [torch.ones(3, device=DEVICE)]
    calls = [
        lambda: fused_dp_step(grads, max_grad_norm=1.0, noise_std=1.0, divisor=1.0,
                              backend="nope"),
        lambda: fused_dp_step(bad, max_grad_norm=1.0, noise_std=1.0, divisor=1.0,
                              backend=backend),
        lambda: add_noise([torch.ones(3, device=DEVICE)], noise_std=1.0, divisor=1.0,
                          backend="nope"),
        lambda: perturb(params, std=1.0, num_perturbations=2, seed=None, backend="nope"),
    ]
    for call in calls:
        torch.manual_seed(0)
        before = torch.get_rng_state()
        with pytest.raises((ValueError, NonFiniteError)):
            call()
        assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    fused_dp_step(grads, max_grad_norm=1.0, noise_std=1.0, divisor=1.0, backend=backend)
    assert not torch.equal(torch.get_rng_state(), before)  # a call that runs does draw


@pytest.mark.parametrize("backend", BACKENDS)
def test_results_carry_no_autograd_graph(backend):
    """Both paths detach their inputs: no result holds (or keeps alive) a graph."""
    grads = [g.requires_grad_() for g in make_grads(1, 4, [(6,), (3, 2)], torch.float32)]
    (out, _), norms = fused_dp_step(grads, max_grad_norm=1.0, noise_std=1.0, divisor=1.0,
                                    seed=0, backend=backend)
    (noised,) = add_noise([grads[0][0, 0]], noise_std=1.0, divisor=1.0, seed=0, backend=backend)
    u, v = (torch.randn(2, 3, 4, device=DEVICE, requires_grad=True) for _ in range(2))
    results = [out, norms, noised, per_sample_norms(grads, backend=backend, batch_dims=2),
               ghost_sq_norms(u, v, backend=backend)]
    assert not any(r.requires_grad for r in results)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter
def test_an_overflowing_squared_norm_is_named(backend):
    grads = [torch.full((1, 2, 4), 1e20, device=DEVICE)]  # finite; ‖g‖² overflows float32
    with pytest.raises(NonFiniteError, match="overflows float32"):
        fused_dp_step(grads, max_grad_norm=1.0, noise_std=0.0, divisor=1.0, seed=0,
                      backend=backend)


# --------------------------------------------------------------------------- compiled path

# Compiles kernel variants ahead of time for sm_90 (Triton's bundled ptxas, no GPU needed):
# the interpreter accepts code the compiler rejects, e.g. methods called on an int argument
# that Triton specialised to constexpr 1. Runs in a subprocess without TRITON_INTERPRET.
COMPILE_SCRIPT = r"""
import sys
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    from triton.compiler import ASTSource
except Exception as e:
    print("no nvidia backend:", e)
    sys.exit(77)
from dplis.kernels import dp_step, ghost_norm, norms, perturbation

def build(kernel, types, consts, num_warps=4):
    names = kernel.arg_names
    sig = {n: "constexpr" if n in consts else types[n] for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]]
             for n in names if n not in consts and (sig[n][0] == "*" or n in ("D", "row_stride"))}
    src = ASTSource(kernel, sig, consts, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))

t = dict(tensor_table_ptr="*i64", chunk_table_ptr="*i64", B="i32", K="i32", D="i32",
         row_stride="i32", n_chunks="i32", col="i32", seed="i32", total_cols="i64",
         factors_ptr="*fp32", partial_ptr="*fp32", noise_std="fp32", divisor="fp32", std="fp32")
direct = build(norms._sq_norm_partials_kernel, dict(t, g_ptr="*bf16"),
               dict(MULTI=False, BLOCK_D=norms.BLOCK_D), num_warps=norms.NUM_WARPS)
assert "ld.global.v4" in direct.asm["ptx"], "direct-mode norms loads are not vectorised"
build(norms._sq_norm_partials_kernel, dict(t, g_ptr="*fp32"), dict(MULTI=True, BLOCK_D=4096))
for dt, multi, extra in [("fp16", False, dict(D=1, row_stride=1)), ("bf16", True, {})]:
    build(dp_step._clipped_noisy_sum_kernel, dict(t, g_ptr="*" + dt, out_ptr="*" + dt),
          dict(MULTI=multi, HAS_NOISE=True, BLOCK_D=dp_step.BLOCK_D, **extra))
for dt, multi, noise in [("bf16", False, True), ("fp64", True, False)]:
    build(perturbation._perturb_kernel, dict(t, p_ptr="*" + dt, out_ptr="*" + dt),
          dict(MULTI=multi, HAS_NOISE=noise, BLOCK_D=perturbation.BLOCK_D))
g = {n: "i32" for n in ("P", "M", "N", "su_b", "su_p", "sv_b", "sv_p", "n_tiles")}
for du, dv, precision in [("fp32", "fp32", "ieee"), ("bf16", "bf16", "tf32"),
                          ("bf16", "fp32", "ieee")]:
    gram = build(ghost_norm._ghost_norm_partials_kernel,
                 dict(g, u_ptr="*" + du, v_ptr="*" + dv, partial_ptr="*fp32"),
                 dict(BLOCK_P=ghost_norm.BLOCK_P, BLOCK_K=ghost_norm.BLOCK_K, PRECISION=precision))
    if precision == "tf32":
        assert "mma" in gram.asm["ptx"], "16-bit ghost-norm Grams do not use tensor cores"
print("ok")
"""


@pytest.mark.skipif(not triton_available(), reason="triton is not importable")
def test_kernels_compile_for_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    if run.returncode == 77:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]


# --------------------------------------------------------------------------- bench smoke


def test_kernel_bench_smoke(tmp_path):
    path = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "kernel_bench.py")
    spec = importlib.util.spec_from_file_location("kernel_bench", path)
    kernel_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernel_bench)
    out = tmp_path / "kernels.json"
    argv = ["--device", "cpu", "--sizes", "1000", "--dtypes", "fp32", "--backends", "torch"]
    assert kernel_bench.main([*argv, "--rep-ms", "5", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["op"] for r in rows} == {"copy", "fused_dp_step", "perturb", "ghost_sq_norms"}
    assert all(r["GBps"] > 0 for r in rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_noise_is_the_noise_half_of_the_fused_step(backend):
    torch.manual_seed(0)
    sums = [torch.randn(7, 3, device=DEVICE), torch.randn(1001, device=DEVICE)]
    kw = dict(noise_std=0.0, divisor=4.0, backend=backend)
    plain = add_noise(sums, seed=1, **kw)
    for got, s in zip(plain, sums, strict=True):
        torch.testing.assert_close(got, s / 4.0)
    # same seed, same kernel: add_noise(Σ) equals fused_dp_step on one example with Σ
    noisy = add_noise(sums, seed=3, noise_std=2.0, divisor=4.0, backend=backend)
    fused, _ = fused_dp_step([s.unsqueeze(0) for s in sums], max_grad_norm=1e30, noise_std=2.0,
                             divisor=4.0, seed=3, backend=backend, batch_dims=1)
    for a, b in zip(noisy, fused, strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.equal(noisy[1], plain[1])


# ghost norms: (B, P, M, N) off the tile sizes (32), several tiles, one position, one example
GHOST_CASES = [(1, 1, 1, 1), (3, 5, 7, 3), (2, 37, 19, 33), (4, 64, 16, 17), (1, 71, 5, 40)]


def ghost_inputs(B, P, M, N, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(B, P, M, generator=gen).to(DEVICE, dtype)
    v = (3 * torch.randn(B, P, N, generator=gen)).to(DEVICE, dtype)
    return u, v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape", GHOST_CASES, ids=lambda s: "B{}P{}M{}N{}".format(*s))
def test_ghost_sq_norms_accuracy(shape, dtype, backend):
    u, v = ghost_inputs(*shape, dtype)
    out = ghost_sq_norms(u, v, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (shape[0],)
    # gold: form each example's [M, N] gradient in float64 and take its squared norm
    gold = torch.einsum("bpm,bpn->bmn", u.double(), v.double()).pow(2).sum((1, 2))
    plain = (torch.bmm(u, u.transpose(1, 2)) * torch.bmm(v, v.transpose(1, 2))).sum((1, 2))
    assert_three_way([out], [gold], [plain], f"ghost norms {shape} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ghost_sq_norms_edge_cases(backend):
    u, v = ghost_inputs(0, 5, 3, 2, torch.float32)  # empty batch
    assert ghost_sq_norms(u, v, backend=backend).shape == (0,)
    u, v = ghost_inputs(3, 40, 6, 5, torch.float32)
    mixed = ghost_sq_norms(u.bfloat16(), v, backend=backend)  # dtypes may differ
    torch.testing.assert_close(mixed, ghost_sq_norms(u.bfloat16().float(), v, backend=backend))
    strided = ghost_sq_norms(u.transpose(1, 2).contiguous().transpose(1, 2), v, backend=backend)
    torch.testing.assert_close(strided, ghost_sq_norms(u, v, backend=backend))
    with pytest.raises(ValueError, match="same B and P"):
        ghost_sq_norms(u, v[:, :3], backend=backend)
    with pytest.raises(ValueError, match="same B and P"):
        ghost_sq_norms(u[0], v[0], backend=backend)


@needs_triton
def test_ghost_sq_norms_deterministic():
    u, v = ghost_inputs(3, 70, 20, 9, torch.float32, seed=5)
    first = ghost_sq_norms(u, v, backend="triton")
    assert torch.equal(first, ghost_sq_norms(u, v, backend="triton"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_perturbation_is_a_value_error_on_both_paths(backend):
    grads = [torch.zeros(0, 4, 3, device=DEVICE)]
    with pytest.raises(ValueError, match="K >= 1"):
        fused_dp_step(grads, max_grad_norm=1.0, noise_std=0.0, divisor=1.0, batch_dims=2,
                      backend=backend)


def test_the_torch_perturbations_of_a_call_are_one_stream():
    """Tensor j once drew from seed + j: a call with seed s + 1 repeated s's second tensor."""
    z = [torch.zeros(50), torch.zeros(50)]
    a = perturb(z, std=1.0, num_perturbations=1, seed=7, backend="torch")
    b = perturb(z, std=1.0, num_perturbations=1, seed=8, backend="torch")
    assert not torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])
    again = perturb(z, std=1.0, num_perturbations=1, seed=7, backend="torch")
    assert all(torch.equal(x, y) for x, y in zip(a, again))


@pytest.mark.parametrize("n", [5, 4096, 4097, 3 * 4096 + 17])
def test_wide_sq_norms_sum_long_rows_in_chunks_exactly(n):
    """fp32 chunks of 4 096 squares, added in fp64: a plain fp32 sum of 4M squares came out
    1.6e-4 low on CPU (an example clipped that much above C); also a strided input."""
    from dplis.kernels.reference import wide_sq_norms

    x = torch.randn(3, 2 * n, generator=torch.Generator().manual_seed(n))[:, ::2]
    want = x.double().square().sum(1)
    torch.testing.assert_close(wide_sq_norms(x).double(), want, rtol=1e-6, atol=0)
    long = torch.randn(1, 4_000_000, generator=torch.Generator().manual_seed(0))
    got = wide_sq_norms(long).double()
    assert abs(float(got / long.double().square().sum()) - 1) < 1e-6
