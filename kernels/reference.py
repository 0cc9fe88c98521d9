"""Plain-torch references of every kernel: the CPU path and the test oracle.

Shapes: ``grads`` is a list of per-example gradients, one tensor per parameter,
each ``[K, B, *P_j]`` (K perturbations, B examples) or ``[B, *P_j]`` (K = 1).
All reductions accumulate in float32; outputs come back in the input dtype. Inputs are
detached, as the Triton kernels do: no result carries an autograd graph.
"""

from __future__ import annotations

import math

import torch

EPS = 1e-6


def as_kbd(g: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """View one gradient as ``[K, B, D]`` (``batch_dims`` = 1 means no K axis)."""
    if batch_dims == 1:
        g = g.unsqueeze(0)
    return g.reshape(g.shape[0], g.shape[1], math.prod(g.shape[2:]))


FP32_SUM_MAX = 2**12  # rows are summed in fp32 in chunks of this many, the chunks in fp64


def wide_sq_norms(x: torch.Tensor) -> torch.Tensor:
    """Row-wise squared L2 norms of [B, N] -> float32 [B]: fp32 sums of 4 096 squares at a
    time, added in fp64 (fp64 input: fp64). On CPU a plain fp32 sum of millions of squares
    came out up to 1.3e-3 low (at 16M; 2e-5 at 1M): an example clipped that much above C;
    a plain fp64 sum costs 3.5x fp32's time, and more with the fp64 copy of a long row."""
    if x.dtype == torch.float64:
        return torch.linalg.vector_norm(x, dim=1).square().float()
    batch, n = x.shape
    if n <= FP32_SUM_MAX:
        return torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).square()
    whole = n // FP32_SUM_MAX * FP32_SUM_MAX
    chunks = torch.linalg.vector_norm(x[:, :whole].reshape(batch, -1, FP32_SUM_MAX), dim=2,
                                      dtype=torch.float32)
    sq = chunks.double().square().sum(1)
    if whole < n:
        sq += torch.linalg.vector_norm(x[:, whole:], dim=1, dtype=torch.float32).double() ** 2
    return sq.float()


def per_sample_sq_norms_torch(grads: list[torch.Tensor], batch_dims: int) -> torch.Tensor:
    """Σ_j ‖mean_k g_j[k, b]‖² for every example b -> float32 ``[B]``."""
    total = None
    for g in grads:
        kbd = as_kbd(g.detach(), batch_dims)
        mean = kbd[0] if kbd.shape[0] == 1 else kbd.float().mean(dim=0)
        sq = wide_sq_norms(mean)
        total = sq if total is None else total + sq
    return total


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """c_b = min(1, C / (n_b + 1e-6)), float32 ``[B]``."""
    return (max_grad_norm / (norms + EPS)).clamp(max=1.0)


def generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A torch generator on ``device`` seeded with ``seed`` (None: a fresh random seed).

    On CPU the generator is mt19937, which reads only the seed's low 32 bits; on CUDA it is
    Philox, keyed by all 64.
    """
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def gaussian_like(ref: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    """float32 N(0, std²) shaped like ``ref``: the next values of ``gen``'s stream (torch.randn:
    for the perturbations, which carry no privacy; the noise is ``normals``)."""
    return torch.randn(ref.shape, generator=gen, device=ref.device, dtype=torch.float32).mul_(std)


def box_muller(u53: torch.Tensor, u24: torch.Tensor) -> torch.Tensor:
    """Two float32 N(0, 1) per pair of uniforms in [0, 1): u53 float64 (53 random bits: the
    radius √(−2 ln(1 − u53)), up to √(106 ln 2) = 8.57), u24 float32 (the angle 2π·u24):
    [r cos θ, r sin θ], the cosines first."""
    radius = u53.neg().log1p_().mul_(-2.0).sqrt_().float()
    angle = u24.float().mul(2 * math.pi)
    out = radius.new_empty(2 * len(radius))
    torch.cos(angle, out=out[:len(radius)]).mul_(radius)
    torch.sin(angle, out=out[len(radius):]).mul_(radius)
    return out


NOISE_CHUNK = 2**20  # values of privacy noise drawn at a time (bounded temporaries)


def normals(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """float32 [n] ~ N(0, 1) for the privacy noise: ``box_muller`` of the next values of
    ``gen``'s stream. torch.randn's float32 Box-Muller reads 24-bit uniforms, so its normals
    never pass 5.77 (Triton's ``tl.randn``: 5.68); a clipped gradient that pushes one
    coordinate beyond that shows its example was in the batch, which puts δ at least
    q·T·P(z > 5.77 − 1/σ): 2·10⁻⁵ for the training command's default run (δ = 10⁻⁵). Here
    the bound is 8.57, where that probability is 1.2·10⁻¹³ at σ = 0.8."""
    half = (n + 1) // 2
    u53 = torch.rand(half, generator=gen, device=device, dtype=torch.float64)
    u24 = torch.rand(half, generator=gen, device=device, dtype=torch.float32)
    return box_muller(u53, u24)[:n]


def add_noise_(x: torch.Tensor, std: float, gen: torch.Generator) -> None:
    """x += N(0, std²) in place (x contiguous fp32), ``NOISE_CHUNK`` values at a time, so
    the draws' temporaries stay a few chunks whatever x's size."""
    flat = x.view(-1)
    for start in range(0, flat.numel(), NOISE_CHUNK):
        part = flat[start:start + NOISE_CHUNK]
        part.add_(normals(part.numel(), gen, x.device), alpha=std)


def _noised(x: torch.Tensor, noise_std: float, divisor: float,
            gen: torch.Generator) -> torch.Tensor:
    """(x + N(0, noise_std²)) / divisor, in place on the fp32 buffer x (noise from ``gen``)."""
    x = x.contiguous()
    if noise_std > 0:  # in place: x is the only D-sized buffer besides the noise's chunks
        add_noise_(x, noise_std, gen)
    return x.div_(divisor)


def clipped_noisy_sum_torch(
    grads: list[torch.Tensor],
    factors: torch.Tensor,
    *,
    noise_std: float,
    divisor: float,
    seed: int | None,
    batch_dims: int,
) -> list[torch.Tensor]:
    """(Σ_b c_b · mean_k g[k, b] + N(0, noise_std²)) / divisor, one tensor per parameter.

    One noise stream per call, from ``seed``: the tensors draw consecutive parts of it, so
    they share no noise, and neither do two calls whose seeds differ (on CPU: differ in the
    low 32 bits, see ``generator``).
    """
    gen = generator(factors.device, seed)
    out = []
    for g in grads:
        kbd = as_kbd(g.detach(), batch_dims).float()
        summed = torch.einsum("b,kbd->d", factors, kbd).div_(kbd.shape[0])
        noisy = _noised(summed, noise_std, divisor, gen)
        out.append(noisy.reshape(g.shape[batch_dims:]).to(g.dtype))
    return out


def add_noise_torch(tensors: list[torch.Tensor], *, noise_std: float, divisor: float,
                    seed: int | None) -> list[torch.Tensor]:
    """(t_j + N(0, noise_std²)) / divisor per tensor, in fp32, cast back to t_j's dtype.

    The values of ``clipped_noisy_sum_torch`` for one example with factor 1 (the same noise
    stream), without its [K, B, D] bookkeeping.
    """
    gen = generator(tensors[0].device, seed)
    return [_noised(t.detach().to(torch.float32, copy=True), noise_std, divisor, gen).to(t.dtype)
            for t in tensors]


def perturb_torch(
    params: list[torch.Tensor], *, std: float, num_perturbations: int, seed: int
) -> list[torch.Tensor]:
    """θ_j + std · u_kj with u ~ N(0, I) -> ``[K, *P_j]`` per parameter: one stream per call,
    from ``seed``, of which the tensors draw consecutive parts (so calls with other seeds
    share nothing; on CPU, seeds that differ in the low 32 bits)."""
    gen = generator(params[0].device, seed) if std > 0 else None
    out = []
    for p in params:
        base = p.detach().float().unsqueeze(0).expand(num_perturbations, *p.shape)
        if std > 0:  # the noise buffer is the result: one [K, *P_j] allocation
            base = gaussian_like(base, std, gen).add_(base)
        out.append(base.to(p.dtype).contiguous())
    return out


def ghost_sq_norms_torch(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """‖Σ_p u[b, p]ᵀ v[b, p]‖² = Σ_{p,q} (u_p·u_q)(v_p·v_q) per example: u [B, P, M],
    v [B, P, N] -> float32 [B], through the two [B, P, P] Gram matrices in fp32, their P²
    products added in fp64 (the terms can be far larger than the result and cancel)."""
    u, v = u.detach().float(), v.detach().float()
    grams = torch.bmm(u, u.transpose(1, 2)).mul_(torch.bmm(v, v.transpose(1, 2)))
    return grams.sum((1, 2), dtype=torch.float64).float()
