"""Equivalence before speed: dplis K = 1 and Opacus must produce the same clipped gradient.

Once per model, with noise 0 (σ = 0), the same initial weights and the same batch:

- dplis: ``dplis.private_grad(..., num_perturbations=1, noise_multiplier=0,
  expected_batch_size=B)``;
- Opacus, for each grad-sample mode: ``p.grad`` after one forward/backward and the DP
  optimizer's ``pre_step`` (clip + noise 0 + divide by the expected batch size B);
- dplis with ``engine="ghost", low_memory=True`` (the ``dplis_k1_lowmem`` mode) against
  dplis K = 1 itself, to the same tolerances.

The clipping bound is the median per-example gradient norm of the batch, so about half of the
examples are clipped and half are not: both branches of min(1, C/‖g‖) are exercised.
Tensors must agree to ``rtol`` / ``atol`` (fp32 defaults 1e-4 / 1e-6). A fast wrong step is
worth nothing: the CLI does not time a mode that fails this check (its row carries the error).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

import dplis

from .cases import (
    LOW_MEMORY_MODES,
    OPACUS_MODES,
    build_model,
    fresh_copy,
    get_case,
    make_batch,
    make_opacus,
)

RTOL, ATOL = 1e-4, 1e-6
EQUIVALENCE_MAX_BATCH = 16  # the check runs on min(batch size, this) examples


@dataclass
class Verdict:
    """Outcome of comparing dplis K = 1 with one Opacus grad-sample mode on one model."""

    model: str
    opacus_mode: str  # bench mode name, e.g. "opacus_hooks"
    ok: bool
    max_abs_diff: float | None = None
    max_abs_grad: float | None = None
    error: str | None = None  # Opacus raised (mode unsupported) or the gradients differ

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ModelCheck:
    """All verdicts for one model, plus the dplis side's own failure if any."""

    model: str
    batch_size: int
    max_grad_norm: float | None = None
    clipped_fraction: float | None = None
    dplis_error: str | None = None  # dplis raised, or disagrees with every Opacus mode that ran
    verdicts: list[Verdict] = field(default_factory=list)
    low_memory_error: str | None = None  # low_memory=True raised or differs from dplis K=1

    def mode_error(self, mode: str) -> str | None:
        """The error a row of ``mode`` must carry because of this check (None: fine)."""
        if mode in LOW_MEMORY_MODES:
            return self.dplis_error or self.low_memory_error
        if mode.startswith("dplis_"):
            return self.dplis_error
        for v in self.verdicts:
            if v.opacus_mode == mode and not v.ok:
                if self.dplis_error and v.max_abs_diff is not None:
                    return None  # Opacus ran and the odd one out is dplis: keep Opacus' timing
                return v.error
        return None

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "batch_size": self.batch_size,
            "max_grad_norm": self.max_grad_norm,
            "clipped_fraction": self.clipped_fraction,
            "rtol": RTOL,
            "atol": ATOL,
            "dplis_error": self.dplis_error,
            "low_memory_error": self.low_memory_error,
            "verdicts": [v.as_dict() for v in self.verdicts],
        }


def describe(exc: BaseException, limit: int = 400) -> str:
    """``Type: message`` on one line, shortened to ``limit`` characters."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def opacus_clipped_grad(name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                        grad_sample_mode: str, max_grad_norm: float) -> dict[str, torch.Tensor]:
    """Opacus' private gradient with noise 0 (after ``pre_step``), keyed like dplis."""
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    module, dp_optimizer, loss_of = make_opacus(
        name, model, x, y, grad_sample_mode, max_grad_norm=max_grad_norm, noise_multiplier=0.0,
        lr=0.0)
    dp_optimizer.zero_grad(set_to_none=True)
    loss_of(module(x)).backward()
    dp_optimizer.pre_step()
    grads = {}
    for p in dp_optimizer.params:
        if p.grad is None:
            raise RuntimeError(f"Opacus left no gradient for {names.get(id(p), '?')}")
        grads[names[id(p)]] = p.grad.detach().clone()
    return grads


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor],
            rtol: float = RTOL, atol: float = ATOL) -> tuple[bool, float, float, str | None]:
    """(ok, max |Δ|, max |grad|, message) over all parameters."""
    if set(ours) != set(theirs):
        missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
        return False, float("nan"), float("nan"), (
            f"parameter sets differ: only dplis {missing}, only Opacus {extra}")
    worst_diff, worst_grad, bad = 0.0, 0.0, []
    for n, a in ours.items():
        b = theirs[n].to(a)
        diff = (a - b).abs()
        worst_diff = max(worst_diff, float(diff.max()))
        worst_grad = max(worst_grad, float(b.abs().max()))
        if not torch.allclose(a, b, rtol=rtol, atol=atol):
            bad.append(f"{n} (max |Δ| {float(diff.max()):.3g})")
    if bad:
        return False, worst_diff, worst_grad, (
            f"clipped gradient differs from dplis K=1 (rtol {rtol:g}, atol {atol:g}) in "
            + ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else ""))
    return True, worst_diff, worst_grad, None


def check_model(name: str, batch_size: int, *, device: str | torch.device = "cpu",
                modes: tuple[str, ...] | None = None, seed: int = 0,
                rtol: float = RTOL, atol: float = ATOL,
                dplis_options: dict | None = None) -> ModelCheck:
    """Compare dplis K = 1 with each Opacus mode in ``modes`` (default: all) on ``name``.

    ``dplis_options``: extra keyword arguments for ``dplis.private_grad`` (e.g. ``engine``),
    so the check covers the same code path as the timed dplis rows.
    """
    options = dplis_options or {}
    modes = tuple(OPACUS_MODES) if modes is None else tuple(m for m in modes if m in OPACUS_MODES)
    case = get_case(name)
    base = build_model(name, device, seed)
    x, y = make_batch(name, batch_size, device, seed)
    result = ModelCheck(name, batch_size)
    try:
        probe = dplis.private_step(fresh_copy(base), case.loss_fn, x, y, max_grad_norm=1.0,
                                   noise_multiplier=0.0, expected_batch_size=batch_size,
                                   **options)
        max_grad_norm = float(probe.norms.median())
        result.max_grad_norm = max_grad_norm
        result.clipped_fraction = float((probe.norms > max_grad_norm).float().mean())
        ours = dplis.private_grad(fresh_copy(base), case.loss_fn, x, y,
                                  max_grad_norm=max_grad_norm, noise_multiplier=0.0,
                                  expected_batch_size=batch_size, **options)
    except Exception as e:
        result.dplis_error = f"dplis K=1 failed in the equivalence check: {describe(e)}"
        return result
    try:
        low = dplis.private_grad(fresh_copy(base), case.loss_fn, x, y,
                                 max_grad_norm=max_grad_norm, noise_multiplier=0.0,
                                 expected_batch_size=batch_size, engine="ghost", low_memory=True)
        ok, _, _, message = compare(low, ours, rtol, atol)
        if not ok:
            result.low_memory_error = f"low_memory=True differs from dplis K=1: {message}"
    except Exception as e:
        result.low_memory_error = f"low_memory=True failed in the equivalence check: {describe(e)}"

    for mode in modes:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Opacus' secure-RNG and backward-hook notices
                theirs = opacus_clipped_grad(name, fresh_copy(base), x, y, OPACUS_MODES[mode],
                                             max_grad_norm)
        except Exception as e:
            result.verdicts.append(Verdict(name, mode, ok=False, error=describe(e)))
            continue
        ok, diff, scale, message = compare(ours, theirs, rtol, atol)
        if not ok:
            message = f"equivalence check failed: {message}"
        result.verdicts.append(Verdict(name, mode, ok, diff, scale, message))

    ran = [v for v in result.verdicts if v.max_abs_diff is not None]
    if ran and not any(v.ok for v in ran):
        # dplis disagrees with every Opacus mode that produced a gradient: dplis is the odd one.
        worst = min(ran, key=lambda v: v.max_abs_diff)
        result.dplis_error = (
            f"equivalence check failed: dplis K=1 differs from every Opacus mode "
            f"(closest: {worst.opacus_mode}, max |Δ| {worst.max_abs_diff:.3g})")
    return result
