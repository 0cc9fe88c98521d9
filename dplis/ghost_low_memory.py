"""Low-memory ghost clipping: norms inside the backward, the clipped sum from a second one.

The book-keeping engine (``dplis.ghost``) holds every layer's activations and output
gradients until the backward ends, then forms Σ_b c_b g_b from them: on a transformer that
adds the output gradients of all layers to the step's peak. Here (Opacus's ghost clipping,
with dplis's rules, mixed norms, tied weights and fallbacks):

1. forward; each recorded layer output passes through ``_Tap``, which does nothing forward;
2. backward of Σ_b ℓ_b (activation gradients only: no weight gradient is asked for); as the
   output gradient of a layer call arrives, its ``_Tap`` turns it into per-example gradient
   parts, and once every use of a parameter is in, its squared norms [B] are taken and its
   factors dropped: one layer's output gradient is held at a time (tied ones until their
   last use);
3. c_b = min(1, C / ‖g_b‖), then a second backward of Σ_b c_b ℓ_b through the retained
   graph, again for activation gradients only: as each layer call's output gradient (now
   weighted by c_b) reaches its tap, the same rules give its parts, summed over the batch
   into Σ_b c_b g_b and dropped. The clipped sum is built only from what the rules saw, as
   in book-keeping: a use of a parameter outside its layers goes missing (the verification
   catches it) rather than reaching the sum unclipped, as autograd's weight gradients would.

Peak memory is that of the non-private step plus one layer's parts; the cost, one more
backward (activation gradients). One pass only: with K perturbations the norm of the
K-averaged gradient needs the factors of all K passes at once, which is what this avoids.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .ghost import (
    GhostUnsupported,
    _label,
    batch_losses,
    check_independent,
    check_sums,
    check_weights,
    clip_of,
    exact_fp32,
    layer_grads,
    one_tensor,
    parameters_restored,
    plan_layers,
    refuse_hidden_backward,
    refuse_transformed,
    refuse_unsupported,
    spread,
    spread_refused,
    sums_tolerance,
    tensors_in,
    versions,
)
from .ghost_grad import Budget, ParamGrad
from .ghost_rules import rule_for
from .kernels import NonFiniteError


class _Tap(torch.autograd.Function):
    """Identity on a layer output; its backward hands the output gradient to ``arrived``.

    ``copy``: return a copy rather than a view, for models that change a layer's output in
    place (``ReLU(inplace=True)``), which autograd forbids on a custom Function's view.
    ``probe``: a 0-d leaf every tap takes, so that a backward asked for ``probe`` alone
    runs exactly the part of the graph above the taps.
    """

    @staticmethod
    def forward(ctx, out, probe, arrived, copy):
        ctx.arrived = arrived
        return out.clone() if copy else out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        ctx.arrived(grad)
        return grad, None, None, None


@contextlib.contextmanager
def _tapping(plan: dict, probe: torch.Tensor, copy: bool, model: nn.Module,
             arrived: Callable, batch: int, checked: bool) -> Iterator[tuple[Counter, list]]:
    """While open, every call of a planned layer returns its output through a ``_Tap`` whose
    backward calls ``arrived(module, args, kwargs, grad)``. Yields the uses of each trainable
    parameter (one per owning attribute per call), counted as the forward runs, and the
    calls (module, whether its output needs a gradient, tensor inputs, their versions, whether
    it was spread) for ``_check_calls``. The inputs a layer read need no copy: its own
    backward saved them, and autograd refuses a backward through inputs changed in place;
    one it did not save (a keyword bias) is checked. A layer shared by the batch gets its
    output, and its inputs for the rule, expanded to the batch (``ghost.spread``;
    ``checked``: the step runs the verification)."""
    uses: Counter = Counter()
    calls: list = []

    def after(module, args, kwargs, out):
        one_tensor(model, module, out)
        refuse_transformed(model, module, out)
        uses.update(plan[module].values())
        inputs = (*tensors_in(args), *tensors_in(kwargs))
        wide = spread(model, module, args, kwargs, out, batch, checked)
        calls.append((module, out.requires_grad, inputs, versions(inputs), wide is not None))
        if wide is not None:
            out, args, kwargs = wide
        return _Tap.apply(out, probe, lambda g: arrived(module, args, kwargs, g), copy)

    hooks = [m.register_forward_hook(after, with_kwargs=True, prepend=True) for m in plan]
    try:
        yield uses, calls
    finally:
        for h in hooks:
            h.remove()


def _check_calls(model: nn.Module, losses: torch.Tensor, calls: list) -> None:
    """After the forward: an input changed in place since its layer read it would give the
    rules another value than the layer used (refused: book-keeping runs such a model on
    copies); a layer run without gradient gets none (``refuse_hidden_backward`` first)."""
    for module, _, inputs, seen, _ in calls:
        if versions(inputs) != seen:
            raise GhostUnsupported(f"an input of layer {_label(model, module)} was changed in "
                                   "place after the layer read it: low-memory ghost clipping "
                                   "would read the changed value. Use low_memory=False")
    silent = next((module for module, needs_grad, *_ in calls if not needs_grad), None)
    if silent is not None:
        refuse_hidden_backward(model, losses, silent, allowed=(_Tap,))


def clipped_sum(
    model: nn.Module,
    loss_fn: Callable,
    trainable: dict[str, torch.Tensor],
    thetas: list[dict[str, torch.Tensor] | None],
    inputs: tuple,
    targets: torch.Tensor,
    max_grad_norm: float,
    forward: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    verify: bool = True,
    backend: str | None = None,
    owners: dict[nn.Module, dict] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Σ_b clip_C(g_b), flat fp32 [D] in ``trainable`` order, norms [B], losses [1, B].

    As ``ghost.clipped_sum`` (same arguments) for one pass: ``thetas`` is [None] (the model's
    own parameters) or [point]. Norms, clipping and the clipped sum are fp32.
    """
    if len(thetas) != 1:
        raise ValueError(f"low-memory ghost clipping takes one pass, got {len(thetas)} "
                         "perturbed points: use num_perturbations=1, or the book-keeping "
                         "engine (low_memory=False) for K > 1")
    plan = plan_layers(model, trainable) if owners is None else owners
    refuse_unsupported(model, plan)
    if verify:
        check_independent(model, loss_fn, inputs, targets, plan, forward)
    rules = {m: rule_for(m) for m in plan}
    batch = len(targets)
    first = next(iter(trainable.values()))
    probe = torch.zeros((), device=first.device, requires_grad=True)
    weights = check_weights(batch, first.device) if verify else None
    grads = {n: ParamGrad(p.shape, 1.0, backend) for n, p in trainable.items()}
    held: Counter = Counter()  # parameter -> bytes of output gradients its parts came from
    sq: dict[str, torch.Tensor] = {}  # squared per-example norms of the parameters done
    unclipped: dict[str, torch.Tensor] = {}  # verify: Σ_b w_b g_b of each parameter done
    # examples whose norm cancels (ParamGrad.retaken): (example, its gradient [m, n]) each
    retaken: dict[str, list[tuple[int, torch.Tensor]]] = {}

    def skip(name: str, size: int, device: torch.device) -> torch.Tensor | None:
        """Weights 1, 0 for the retaken examples (their shares are added from ``retaken``)."""
        if name not in retaken:
            return None
        keep = torch.ones(size, device=device)
        keep[[b for b, _ in retaken[name]]] = 0.0
        return keep
    clipped = {n: torch.zeros(p.numel(), device=first.device) for n, p in trainable.items()}
    # uses not yet in; the backward running: "norms", "verify" (the taps pass the gradient
    # on) or "sum" (the clipped sum)
    state = {"uses": Counter(), "phase": "norms"}

    def done(name: str) -> None:
        """All uses of ``name`` are in: its squared norms, then its factors are dropped. It
        may form [B, m, n] only within the bytes of the output gradients it held."""
        g = grads.pop(name)
        if verify:
            unclipped[name] = torch.zeros(g.shape.numel(), device=first.device)
        if g.empty:
            return
        g.budget = Budget(held[name])
        sq[name] = g.finish()
        if g.retaken is not None:  # their shares of the sum: from these gradients too (the
            # second backward's c-weighted output gradients round before they cancel)
            retaken[name] = list(zip(g.retaken.tolist(), g.formed))
        if verify:
            g.clipped_sum(weights, unclipped[name])

    def arrived(module, args, kwargs, dout) -> None:
        if state["phase"] == "verify":
            return
        parts = layer_grads(model, module, rules[module], plan[module], trainable, args,
                            kwargs, dout, batch)
        if state["phase"] == "sum":  # the second backward: dout is weighted by c_b
            for attr, name in plan[module].items():
                if attr in parts:
                    part = ParamGrad(trainable[name].shape, 1.0, backend)
                    part.add(parts[attr])
                    summed = torch.empty_like(clipped[name])
                    part.clipped_sum(skip(name, batch, dout.device), summed)
                    clipped[name] += summed
            return
        for attr, name in plan[module].items():
            if attr in parts:
                grads[name].add(parts[attr])
                held[name] += dout.numel() * dout.element_size()
            state["uses"][name] -= 1
        for name in set(plan[module].values()):
            if name in grads and state["uses"][name] == 0:
                done(name)

    per_example_loss = batch_losses(loss_fn)

    def run(copy: bool) -> torch.Tensor:
        with forward(), _tapping(plan, probe, copy, model, arrived, batch, verify) as (uses, calls):
            state["calls"] = calls
            losses = per_example_loss(model(*inputs), targets)
        _check_calls(model, losses, calls)
        state["uses"] = uses
        return losses

    try:
        # IEEE fp32 throughout (CUDA): the second backward must round as the first did
        with exact_fp32(first.device), parameters_restored(trainable):
            if thetas[0] is not None:
                for p, value in zip(trainable.values(), thetas[0].values()):
                    p.data = value
            with spread_refused(model, lambda: [c[0] for c in state.get("calls", []) if c[4]]):
                try:
                    losses = run(copy=False)
                except RuntimeError as e:  # autograd refuses in-place ops on a tap's view: copies
                    if "inplace" not in str(e):
                        raise
                    losses = run(copy=True)
            # no trainable parameter reaches the loss: zero gradients, as the other engines give
            reached = losses.requires_grad
            # the taps return no gradient for the probe: only the layer outputs' are computed
            if reached:
                torch.autograd.grad(losses.sum(), [probe], retain_graph=True, allow_unused=True)
            for name in list(grads):  # parameters some of whose uses got no gradient
                done(name)
            norms, c = clip_of(list(sq.values()), batch, losses, max_grad_norm)
            if verify and reached:  # autograd's gradient of Σ w_b ℓ_b against Σ_b w_b g_b
                state["phase"] = "verify"
                found = torch.autograd.grad((losses * weights).sum(), list(trainable.values()),
                                            retain_graph=True, allow_unused=True)
                check_sums(unclipped, {n: g.float() for n, g in zip(trainable, found)
                                       if g is not None}, sums_tolerance(trainable, False),
                           squares=sq)
                del found
            state["phase"] = "sum"
            if reached:
                torch.autograd.grad((losses * c).sum(), [probe], allow_unused=True)
            for name, examples in retaken.items():
                for b, example in examples:
                    clipped[name].add_(example.flatten(), alpha=float(c[b]))
        total = torch.cat(list(clipped.values()))
        if not bool(torch.isfinite(total).all()):  # the norms came from the first backward
            raise NonFiniteError("the clipped sum from the second backward is NaN or infinite "
                                 "although every example's gradient norm from the first was "
                                 "finite: the model's backward gave other values when run "
                                 "again (a hook acting on its second call?)")
        return total, norms, losses.detach().unsqueeze(0)
    finally:  # the taps' closures reach ``state``, whose recorded calls hold tensors of
        # the graph, which holds the taps: a cycle through autograd's nodes that Python's
        # garbage collector cannot see, leaking every step's activations
        state.clear()
