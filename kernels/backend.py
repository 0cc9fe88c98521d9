"""Backend choice: Triton on CUDA tensors when importable, the plain-torch reference otherwise.

Nothing here touches CUDA at import time; Triton itself is imported on first use.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("triton", "torch")


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(backend: str | None, device: torch.device) -> str:
    """Return "triton" or "torch" for tensors on ``device``; raise on an impossible request."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None (auto), got {backend!r}")
    if backend == "torch":
        return "torch"
    usable = triton_available() and (device.type == "cuda" or interpreting())
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package: pip install triton")
        if not usable:
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (got {device.type}); "
                "set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors"
            )
        return "triton"
    return "triton" if usable and device.type == "cuda" else "torch"
