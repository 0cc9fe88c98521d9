"""dplis.kernels: fused kernels of the private step, each with a plain-torch reference.

Ops: ``per_sample_norms``, ``fused_dp_step``, ``perturb``, ``add_noise``, ``ghost_sq_norms``
(see ``api.py``).
``backend=None`` picks Triton for CUDA tensors when it is installed, else torch.
"""

from .api import (
    SEED_MAX,
    add_noise,
    fused_dp_step,
    ghost_sq_norms,
    infer_batch_dims,
    per_sample_norms,
    perturb,
)
from .backend import resolve as resolve_backend
from .errors import NonFiniteError

__all__ = [
    "SEED_MAX",
    "NonFiniteError",
    "add_noise",
    "fused_dp_step",
    "ghost_sq_norms",
    "infer_batch_dims",
    "per_sample_norms",
    "perturb",
    "resolve_backend",
]
