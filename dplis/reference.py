"""Naive private gradient: a Python loop over examples and perturbations with autograd.

The oracle that tests and benchmarks compare every fast path against. Slow on purpose.
"""

from __future__ import annotations

import torch
from torch import nn

from .private_grad import LossFn, as_batch, trainable


def naive_private_grad(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor | tuple,
    targets: torch.Tensor,
    *,
    max_grad_norm: float,
    perturbations: list[dict[str, torch.Tensor]] | None = None,
    noise: dict[str, torch.Tensor] | None = None,
    expected_batch_size: float | None = None,
) -> dict[str, torch.Tensor]:
    """(Σ_i clip_C(mean_k ∇ℓ(θ + u_k; x_i)) + noise) / expected_batch_size, in float64.

    perturbations: K dicts name -> u_k (default: one zero perturbation); noise: name -> the
    Gaussian noise already scaled by σC (default: none). Runs the model in its current mode.
    """
    inputs, batch = as_batch(inputs, targets)
    params = trainable(model)
    perturbations = perturbations or [{}]
    total = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
    originals = {n: p.detach().clone() for n, p in params.items()}
    try:
        for i in range(batch):
            mean = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
            for u in perturbations:
                with torch.no_grad():
                    for n, p in params.items():
                        p.copy_(originals[n] + u.get(n, 0))
                loss = loss_fn(model(*(x[i:i + 1] for x in inputs)), targets[i:i + 1])
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                for n, g in zip(params, grads):
                    if g is not None:
                        mean[n] += g.double() / len(perturbations)
            norm = torch.sqrt(sum(g.pow(2).sum() for g in mean.values()))
            factor = min(1.0, max_grad_norm / (float(norm) + 1e-6))
            for n in total:
                total[n] += factor * mean[n]
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(originals[n])
    divisor = batch if expected_batch_size is None else expected_batch_size
    return {n: (t + (noise[n].double() if noise else 0)) / divisor for n, t in total.items()}
