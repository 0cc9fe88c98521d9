"""``compile=True`` for the vmap engine: ``torch.compile`` of the per-example gradient function.

The compiled function is specialised to its shapes (``dynamic=False``: with dynamic batch
sizes torch 2.13 fails on vmap's batched tensors, e.g. in the convolution backward and in
cross-entropy's gather). Poisson batches vary in size, so a batch of b examples is padded to
``bucket(b)`` with copies of its first example. Their gradients and losses are dropped, and
the real examples' results are unchanged. Each bucket compiles once per process. A bucket is
a multiple of a quarter of the power of two below b, and at least 8: at most 4 buckets per
doubling of b, and fewer than max(8, b/4) padded examples. ``fallback_random`` makes
Inductor draw random numbers (dropout) as eager torch does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Fn = Callable[[torch.Tensor, tuple, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def bucket(batch: int) -> int:
    """The padded size for ``batch`` >= 1 examples: in [batch, batch + max(8, batch/4))."""
    step = max(8, (1 << (batch.bit_length() - 1)) // 4)
    return -(-batch // step) * step


def run_padded(fn: Fn, thetas: torch.Tensor, inputs: tuple,
               targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn(thetas, inputs, targets)`` compiled, on the batch padded to ``bucket(B)``.

    ``fn`` returns per-example results with the batch on dim 1 ([k, B, D] gradients, [k, B]
    losses); the padded rows are cut off. An empty batch runs ``fn`` uncompiled.
    """
    batch = len(targets)
    if batch == 0:
        return fn(thetas, inputs, targets)
    pad = bucket(batch) - batch

    def padded(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t[:1].expand(pad, *t.shape[1:])]) if pad else t

    compiled = torch.compile(fn, dynamic=False, options={"fallback_random": True})
    grads, losses = compiled(thetas, tuple(padded(t) for t in inputs), padded(targets))
    return grads[:, :batch], losses[:, :batch]
