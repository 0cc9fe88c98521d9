"""Exceptions raised by the kernel entry points (re-exported by dplis)."""

from __future__ import annotations

import torch

SHOWN = 8  # example indices a message lists


class NonFiniteError(FloatingPointError):
    """A loss or gradient was NaN or infinite: clipping would hide it, so the step is refused."""


def non_finite_examples(values: torch.Tensor) -> list[int]:
    """The examples b (the last dim of ``values`` [..., B]) with a NaN or infinite value."""
    finite = torch.isfinite(values)
    if bool(finite.all()):  # the common case, and an empty batch
        return []
    return torch.nonzero(~finite.reshape(-1, values.shape[-1]).all(0)).flatten().tolist()


def refuse_non_finite(values: torch.Tensor, what: str, why: str = "") -> None:
    """Raise NonFiniteError if ``values`` [..., B] hold a NaN or infinity, naming the examples:
    "the {what} of 2 of 64 examples (index 3, 17) are NaN or infinite{why}"."""
    bad = non_finite_examples(values)
    if bad:
        shown = ", ".join(map(str, bad[:SHOWN])) + (", …" if len(bad) > SHOWN else "")
        raise NonFiniteError(f"the {what} of {len(bad)} of {values.shape[-1]} examples (index "
                             f"{shown}) are NaN or infinite{why}")


def refuse_non_finite_losses(losses: torch.Tensor) -> None:
    """``refuse_non_finite`` for per-example losses [K, B] (K perturbed points) or [B]."""
    points = losses.shape[0] if losses.dim() > 1 else 1
    refuse_non_finite(losses, "losses", f" (at one or more of the K = {points} perturbed "
                                        "points)" if points > 1 else "")
