"""dplis: differentially private deep learning with DPlis smoothing and fused kernels.

Public API: ``private_grad`` (functional private gradient), ``PrivateTrainer``,
``dplis.accounting``, ``dplis.validation``, ``dplis.data``, ``dplis.models``, ``dplis.kernels``,
``retain_freed_memory`` (``dplis.allocator``: glibc keeps freed CPU memory; opt-in).
Importing dplis never touches CUDA nor imports Triton.
"""

__version__ = "0.1.0"

from . import accounting, data, models, validation  # noqa: E402
from .allocator import retain_freed_memory  # noqa: E402
from .kernels import NonFiniteError  # noqa: E402
from .private_grad import PrivateStep, private_grad, private_step  # noqa: E402
from .trainer import BudgetExceededError, PrivateTrainer  # noqa: E402

__all__ = [
    "BudgetExceededError",
    "NonFiniteError",
    "PrivateStep",
    "PrivateTrainer",
    "__version__",
    "accounting",
    "data",
    "models",
    "validation",
    "private_grad",
    "private_step",
    "retain_freed_memory",
]
