"""Per-example losses [B] from a loss written for a batch of one.

dplis calls ``loss_fn(output, target)`` as on a batch of one example; the ghost engine needs
all B per-example losses of a batch at once. The general way is ``vmap`` over the batch, which
on CPU costs more than the loss itself for small models (``F.cross_entropy`` is decomposed in
Python under vmap). So a loss may carry a batched twin, ``loss_fn.per_example(output, target)
-> [B]``, that must equal ``stack([loss_fn(output[b:b+1], target[b:b+1]) for b])``;
``F.cross_entropy``, ``nn.CrossEntropyLoss`` (no class weights, mean reduction), ``F.mse_loss``,
``nn.MSELoss`` (mean reduction) and ``dplis.models.lm_loss`` have one; subclasses of those
modules do not (their forward may differ). Anything else uses vmap, and a loss vmap cannot
run (Python control flow on the example's values, ``.item()``) a loop of B calls on batches
of one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import vmap
from torch.nn import functional as F

PerExample = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def scalar_loss(loss_fn: Callable, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``loss_fn`` on a batch of one example: a scalar (a one-value tensor is taken as one)."""
    value = loss_fn(out, t)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"loss_fn must return one value for a batch of one example, got "
                         f"{shape}: reduce it to a scalar (a mean or sum over the example's "
                         "positions), not reduction='none' over several")
    return value.reshape(())


def per_example(loss_fn: Callable) -> PerExample:
    """output [B, ...], target [B, ...] -> fp32 losses [B], each ``loss_fn`` on one example."""
    batched = getattr(loss_fn, "per_example", None) or _builtin(loss_fn)

    def general(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        try:
            return vmap(lambda o, y: scalar_loss(loss_fn, o.unsqueeze(0), y.unsqueeze(0)),
                        randomness="different")(out, t).float()
        except RuntimeError as e:  # vmap's refusal (control flow on values, .item(), an
            # op without a batching rule): one example at a time; the loss's own errors pass
            if "vmap" not in str(e) and "atching rule" not in str(e):
                raise
            return torch.stack([scalar_loss(loss_fn, out[b:b + 1], t[b:b + 1]).float()
                                for b in range(len(out))]) if len(out) else out.new_zeros(0).float()

    if batched is None:
        return general

    def losses(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        value = batched(out, t)
        if value is None:
            return general(out, t)
        if value.shape != (len(out),):
            raise ValueError(f"loss_fn.per_example must return the B = {len(out)} losses "
                             f"[B], got shape {tuple(value.shape)}")
        return value.float()
    return losses


def _builtin(loss_fn: Callable) -> Callable | None:
    """The batched twin of a torch loss used with its defaults, or None."""
    if loss_fn is F.cross_entropy:
        return lambda out, t: _cross_entropy(out, t, -100, 0.0)
    # the exact classes only: a subclass may compute something else in its forward
    if type(loss_fn) is nn.CrossEntropyLoss and loss_fn.weight is None \
            and loss_fn.reduction == "mean":
        return lambda out, t: _cross_entropy(out, t, loss_fn.ignore_index,
                                             loss_fn.label_smoothing)
    if loss_fn is F.mse_loss or (type(loss_fn) is nn.MSELoss and loss_fn.reduction == "mean"):
        return _mse
    return None


def _cross_entropy(out: torch.Tensor, t: torch.Tensor, ignore: int,
                   smoothing: float) -> torch.Tensor | None:
    """Class-index targets [B] with logits [B, C] only (None: let vmap handle the rest).

    An ignored target makes the loss of a batch of one NaN (a mean over nothing), which
    reduction="none" would report as 0: such batches also go to vmap.
    """
    if out.dim() != 2 or t.dim() != 1 or t.is_floating_point() or bool((t == ignore).any()):
        return None
    return F.cross_entropy(out, t, ignore_index=ignore, label_smoothing=smoothing,
                           reduction="none")


def _mse(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor | None:
    if out.shape != t.shape:  # broadcasting: let vmap reproduce it exactly
        return None
    return F.mse_loss(out, t, reduction="none").reshape(len(out), -1).mean(1)
