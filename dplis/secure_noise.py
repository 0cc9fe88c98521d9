"""Gaussian noise from the operating system's CSPRNG (``os.urandom``) for ``secure_rng=True``.

Method: 2×53 random bits per pair of normals from os.urandom, Box-Muller in float64
(z = sqrt(-2 ln u1) · cos(2π u2), u1 in (0, 1]), rounded to the parameter dtype. No seed,
no state: the draws cannot be replayed. It closes the predictability of torch's Philox /
Mersenne generators; it does not make the floating-point Gaussian immune to Mironov-style
least-significant-bit attacks (a discrete Gaussian would).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch


def _uniform53(n: int) -> np.ndarray:
    """n float64 uniforms in (0, 1] from 53 random bits each."""
    bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
    return (bits.astype(np.float64) + 1.0) / 2.0**53


def secure_gaussian(n: int, std: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 [n] ~ N(0, std²) from os.urandom."""
    half = (n + 1) // 2
    u1, u2 = _uniform53(half), _uniform53(half)
    radius = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([radius * np.cos(2 * math.pi * u2), radius * np.sin(2 * math.pi * u2)])
    return torch.from_numpy(z[:n] * std).float().to(device)
