"""Public entry points of dplis.kernels: validate, pick a backend, dispatch.

Each op has a plain-torch reference (``reference.py``) and a Triton kernel
(``norms.py``, ``dp_step.py``, ``perturbation.py``, ``ghost_norm.py``); both take the same
arguments.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from . import reference
from .backend import resolve
from .errors import refuse_non_finite

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_tensors(tensors: Sequence[torch.Tensor], what: str) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"{what} must be a non-empty list of tensors")
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what} must hold tensors, got {type(t).__name__}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{what} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if len({t.device for t in tensors}) > 1:
        devices = sorted({str(t.device) for t in tensors})
        raise ValueError(f"{what} are on several devices: {devices}")
    return tensors


def infer_batch_dims(grads: list[torch.Tensor], batch_dims: int | None) -> int:
    """2 for ``[K, B, *P]`` tensors, 1 for ``[B, *P]``.

    Auto (None) reads ``[B, *P]`` when a tensor is 1-D or the tensors disagree on
    dim 1 while agreeing on dim 0; otherwise ``[K, B, *P]``: one ``[B, D]`` tensor is read
    as K = B perturbations of D scalar gradients. Pass it explicitly whenever a list could
    be read both ways.
    """
    if batch_dims is None:
        lead0 = {g.shape[0] for g in grads if g.dim() >= 1}
        lead01 = {tuple(g.shape[:2]) for g in grads}
        one_d = any(g.dim() == 1 for g in grads)
        batch_dims = 1 if one_d or (len(lead01) > 1 and len(lead0) == 1) else 2
    if isinstance(batch_dims, bool) or not isinstance(batch_dims, int) or batch_dims not in (1, 2):
        raise ValueError(f"batch_dims must be 1 ([B, *P]) or 2 ([K, B, *P]), got {batch_dims}")
    lead = {tuple(g.shape[:batch_dims]) for g in grads}
    if any(g.dim() < batch_dims for g in grads) or len(lead) != 1:
        names = "[B, *P]" if batch_dims == 1 else "[K, B, *P]"
        raise ValueError(
            f"grads must all be {names} with the same leading dims, got shapes "
            f"{[tuple(g.shape) for g in grads]}"
        )
    if batch_dims == 2 and grads[0].shape[0] == 0:
        raise ValueError("per-example gradients need K >= 1 perturbations, got K = 0")
    return batch_dims


def _positive(name: str, value: float, allow_zero: bool = False) -> float:
    bound = ">= 0" if allow_zero else "> 0"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number {bound}, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and (value >= 0 if allow_zero else value > 0)):
        raise ValueError(f"{name} must be finite and {bound}, got {value}")
    return value


SEED_MAX = 2**63  # seeds are ints in [0, SEED_MAX)


def _check_seed(seed: int | None) -> int | None:
    """``seed`` as an int in [0, 2**63) (numpy integers too), or None; checked before
    anything runs, so that a refused call draws nothing (``_drawn``)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) \
            or not 0 <= seed < SEED_MAX:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return int(seed)


def _drawn(seed: int | None) -> int:
    """The checked ``seed``, or a random one from torch's global RNG when it is None: drawn
    only once the call can no longer fail before its output, so a refused call leaves the
    global RNG as it was."""
    return int(torch.randint(0, SEED_MAX - 1, (1,)).item()) if seed is None else seed


def _sq_norms(grads: list[torch.Tensor], batch_dims: int, backend: str) -> torch.Tensor:
    if backend == "triton":
        from .norms import per_sample_sq_norms_triton

        return per_sample_sq_norms_triton(grads, batch_dims)
    return reference.per_sample_sq_norms_torch(grads, batch_dims)


def per_sample_norms(
    grads: Sequence[torch.Tensor], *, backend: str | None = None, batch_dims: int | None = None
) -> torch.Tensor:
    """L2 norm over all tensors of each example's K-averaged gradient -> float32 ``[B]``.

    grads: tensors ``[K, B, *P_j]`` (or ``[B, *P_j]``, K = 1; see ``infer_batch_dims``).
    """
    grads = _check_tensors(grads, "grads")
    batch_dims = infer_batch_dims(grads, batch_dims)
    be = resolve(backend, grads[0].device)
    return _sq_norms(grads, batch_dims, be).sqrt()


def ghost_sq_norms(u: torch.Tensor, v: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Per-example ‖Σ_p u[b, p]ᵀ v[b, p]‖² without forming the [M, N] matrices -> fp32 ``[B]``.

    u ``[B, P, M]``, v ``[B, P, N]``: the ghost norm of a layer's weight gradient (u: output
    gradients, v: inputs, P positions) = Σ_{p,q} (u_p·u_q)(v_p·v_q). The torch path forms the
    two [B, P, P] Gram matrices; the Triton kernel reduces them tile by tile.
    """
    u, v = _check_tensors([u, v], "u and v")
    if u.dim() != 3 or v.dim() != 3 or u.shape[:2] != v.shape[:2]:
        raise ValueError(f"u and v must be [B, P, M] and [B, P, N] with the same B and P, got "
                         f"{tuple(u.shape)} and {tuple(v.shape)}")
    if resolve(backend, u.device) == "triton":
        from .ghost_norm import ghost_sq_norms_triton

        return ghost_sq_norms_triton(u, v)
    return reference.ghost_sq_norms_torch(u, v)


def fused_dp_step(
    grads: Sequence[torch.Tensor],
    *,
    max_grad_norm: float,
    noise_std: float,
    divisor: float,
    seed: int | None = None,
    backend: str | None = None,
    batch_dims: int | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Clip, sum, noise and scale per-example gradients in two passes.

    Returns ``[(Σ_b min(1, C/(n_b+1e-6)) · mean_k g_j[k,b] + N(0, noise_std²)) / divisor]``
    (one tensor ``[*P_j]`` per input, in its dtype) and the fp32 norms ``n`` ``[B]``.
    Raises NonFiniteError, before any output is formed, if a gradient is NaN/inf.

    ``seed`` (int in [0, 2**63); None: a random one) selects one noise stream, of which the
    tensors take consecutive parts. Triton keys Philox with all 64 bits; the torch path on
    CPU uses mt19937, which reads the low 32 bits only, so two calls draw independent noise
    when their seeds differ modulo 2**32 (``PrivateTrainer`` uses consecutive seeds).
    """
    grads = _check_tensors(grads, "grads")
    batch_dims = infer_batch_dims(grads, batch_dims)
    max_grad_norm = _positive("max_grad_norm", max_grad_norm)
    noise_std = _positive("noise_std", noise_std, allow_zero=True)
    divisor = _positive("divisor", divisor)
    seed = _check_seed(seed)
    be = resolve(backend, grads[0].device)
    norms = _sq_norms(grads, batch_dims, be).sqrt()
    refuse_non_finite(norms, "gradients", ", or their squared norm overflows float32")
    factors = reference.clip_factors(norms, max_grad_norm)
    out = _summer(be)(grads, factors, noise_std=noise_std, divisor=divisor, seed=_drawn(seed),
                      batch_dims=batch_dims)
    return out, norms


def _summer(backend: str):
    if backend == "triton":
        from .dp_step import clipped_noisy_sum_triton

        return clipped_noisy_sum_triton
    return reference.clipped_noisy_sum_torch


def add_noise(
    tensors: Sequence[torch.Tensor],
    *,
    noise_std: float,
    divisor: float,
    seed: int | None = None,
    backend: str | None = None,
) -> list[torch.Tensor]:
    """(t_j + N(0, noise_std²)) / divisor for already-clipped sums ``t_j`` ``[*P_j]``.

    The noise half of ``fused_dp_step`` (same kernel, one example with factor 1, so the same
    RNG and the same ``seed`` rules), for engines that form the clipped sum themselves
    (dplis.ghost).
    """
    tensors = _check_tensors(tensors, "tensors")
    noise_std = _positive("noise_std", noise_std, allow_zero=True)
    divisor = _positive("divisor", divisor)
    seed = _check_seed(seed)
    if resolve(backend, tensors[0].device) == "torch":
        return reference.add_noise_torch(tensors, noise_std=noise_std, divisor=divisor,
                                         seed=_drawn(seed))
    ones = torch.ones(1, dtype=torch.float32, device=tensors[0].device)
    return _summer("triton")([t.unsqueeze(0) for t in tensors], ones, noise_std=noise_std,
                             divisor=divisor, seed=_drawn(seed), batch_dims=1)


def perturb(
    params: Sequence[torch.Tensor],
    *,
    std: float,
    num_perturbations: int,
    seed: int,
    backend: str | None = None,
) -> list[torch.Tensor]:
    """K perturbed copies θ_j + std · u_kj, u ~ N(0, I), reproducible from ``seed``.

    params: tensors ``[*P_j]``; returns ``[K, *P_j]`` per tensor, in its dtype.
    """
    params = _check_tensors(params, "params")
    std = _positive("std", std, allow_zero=True)
    if isinstance(num_perturbations, bool) or not isinstance(num_perturbations, int):
        raise TypeError(f"num_perturbations must be an int, got {type(num_perturbations).__name__}")
    if num_perturbations < 1:
        raise ValueError(f"num_perturbations must be >= 1, got {num_perturbations}")
    seed = _check_seed(seed)
    if resolve(backend, params[0].device) == "triton":
        from .perturbation import perturb_triton

        return perturb_triton(params, std=std, num_perturbations=num_perturbations,
                              seed=_drawn(seed))
    return reference.perturb_torch(params, std=std, num_perturbations=num_perturbations,
                                   seed=_drawn(seed))
