"""The ghost engine: clipped per-example sums from one forward + one backward per perturbation.

Forward hooks record each layer call's inputs; one ``autograd.grad`` of Σ_b ℓ_b gives the
gradients of the layer outputs. Layer rules (``ghost_rules``) turn them into per-example
gradients in factored form Σ_p u_pᵀ v_p, and per parameter the engine picks the cheaper way
to get each example's squared norm ("mixed" ghost clipping):

- ghost norm: Σ_{p,p'} (u_p·u_p')(v_p·v_p'), cost ~ P²(m+n) per example;
- explicit:   ‖Σ_p u_pᵀ v_p‖², cost ~ P·m·n, forming the [m, n] gradient.

K perturbations: the gradient to clip is the mean over the K passes, so the K passes are
stacked as extra positions with u scaled by 1/K: the norm of the K-averaged gradient comes
out of the same Gram products. The clipped sum Σ_b c_b Σ_p u_bpᵀ v_bp is one matmul per
parameter (book-keeping, no second backward). Shared (tied) parameters sum the factors of
all their uses before the norm. Layers without a rule get per-example gradients of their own
parameters by ``vmap(vjp)`` of that layer alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from .ghost_rules import Factor, Unsupported, rule_for
from .kernels import NonFiniteError
from .kernels.reference import clip_factors


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along the position axis (dim 1); a single part is returned as is."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


class ParamGrad:
    """Per-example gradient of one parameter [B, *shape], kept as factors and/or explicitly."""

    def __init__(self, shape: torch.Size):
        self.shape = shape
        self.factors: list[Factor] = []
        self.explicit: torch.Tensor | None = None

    def add(self, part: Factor | torch.Tensor, scale: float) -> None:
        if isinstance(part, Factor):
            if part.index:
                self.factors.append(Factor(part.u, part.v * scale, index=True))
            else:
                self.factors.append(Factor(part.u * scale, part.v))
            return
        part = part.reshape(part.shape[0], *self.shape).float() * scale
        self.explicit = part if self.explicit is None else self.explicit + part

    def _dense_u(self, f: Factor) -> torch.Tensor:
        if not f.index:
            return f.u
        rows = self.shape[0]
        return nn.functional.one_hot(f.u, rows).to(f.v.dtype)

    def finish(self) -> torch.Tensor:
        """Squared per-example norms [B] (fp32); picks ghost or explicit per parameter."""
        if not self.factors:
            return self.explicit.flatten(1).float().pow(2).sum(1)
        m, n = self.shape[0], self.shape[1:].numel()
        positions = sum(f.v.shape[1] for f in self.factors)
        all_index = all(f.index for f in self.factors)
        ghost = self.explicit is None and (all_index or positions * (m + n) < m * n)
        if ghost and positions == 1:  # one position: ‖u vᵀ‖² = ‖u‖²‖v‖²
            (f,) = self.factors
            u_sq = torch.ones_like(f.v[:, 0, 0]) if f.index else f.u.float().pow(2).sum((1, 2))
            return u_sq * f.v.float().pow(2).sum((1, 2))
        if ghost:
            v = _cat([f.v for f in self.factors]).float()
            gram_v = v @ v.transpose(1, 2)
            if all_index:
                idx = _cat([f.u for f in self.factors])
                gram_u = (idx.unsqueeze(2) == idx.unsqueeze(1)).float()
            else:
                u = _cat([self._dense_u(f) for f in self.factors]).float()
                gram_u = u @ u.transpose(1, 2)
            return (gram_u * gram_v).sum((1, 2))
        # explicit: form each example's gradient once, it also serves the clipped sum
        full = sum(torch.bmm(self._dense_u(f).float().transpose(1, 2), f.v.float())
                   for f in self.factors).reshape(-1, *self.shape)
        self.explicit = full if self.explicit is None else self.explicit + full
        self.factors = []
        return self.explicit.flatten(1).pow(2).sum(1)

    def clipped_sum(self, c: torch.Tensor, out: torch.Tensor) -> None:
        """Write Σ_b c_b · g_b (fp32) into ``out`` [m, n] or [m] (after ``finish``)."""
        if not self.factors:
            torch.mm(c.unsqueeze(0), self.explicit.flatten(1), out=out.view(1, -1))
            return
        out = out.view(self.shape[0], -1)
        out.zero_()
        for f in self.factors:
            v = (f.v.float() * c[:, None, None]).flatten(0, 1)
            if f.index:
                out.index_add_(0, f.u.flatten(), v)
            else:
                out.addmm_(f.u.float().flatten(0, 1).T, v)


def _plan(model: nn.Module, trainable: dict[str, torch.Tensor]) -> dict[nn.Module, dict]:
    """module -> {its attribute name: canonical trainable name} for modules owning trainables."""
    canon = {id(p): n for n, p in trainable.items()}
    plan: dict[nn.Module, dict] = {}
    for module in model.modules():
        owned = {a: canon[id(p)] for a, p in module.named_parameters(recurse=False)
                 if id(p) in canon}
        if owned:
            plan[module] = owned
    return plan


def supports(model: nn.Module, trainable: dict[str, torch.Tensor]) -> bool:
    """True when every layer owning a trainable parameter has a rule (no vmap fallback)."""
    return all(rule_for(m) is not None for m in _plan(model, trainable))


def _fallback(module: nn.Module, owned: dict, params: dict, args: tuple, kwargs: dict,
              grad: torch.Tensor, name: str) -> dict:
    """Per-example gradients of ``module``'s own parameters by vmap(vjp) over the batch."""
    own = {a: params[c].detach() for a, c in owned.items()}

    def one(x, g):
        def f(p):
            return functional_call(module, p, tuple(t.unsqueeze(0) for t in x), kwargs)
        return vjp(f, own)[1](g.unsqueeze(0))[0]

    try:
        return vmap(one, randomness="different")(args, grad)
    except Exception as e:  # any layer vmap/vjp cannot handle: say which one
        raise ValueError(f"the ghost engine cannot compute per-example gradients of layer "
                         f"{name} ({type(module).__name__}): {e}. Use engine='vmap'") from e


def _versions(call: tuple) -> tuple[int, ...]:
    """Version counters of a recorded call's tensor inputs and output (in-place detection)."""
    _, args, _, out, *_ = call
    return tuple(t._version for t in (*args, out) if isinstance(t, torch.Tensor))


@contextlib.contextmanager
def _recording(plan: dict, isolate: bool) -> Iterator[list[tuple]]:
    """Record (module, args, kwargs, output, versions) of every call of the planned layers.

    ``isolate``: the layer gets copies of its tensor inputs and the rest of the model a copy
    of its output, so an in-place op elsewhere (``ReLU(inplace=True)``) cannot change what
    was recorded; used only when such an op was seen, as it costs a copy per layer.
    """
    calls: list[tuple] = []

    def copy(t):
        return t.clone() if isolate and isinstance(t, torch.Tensor) else t

    def before(module, args, kwargs):
        return (tuple(copy(a) for a in args), kwargs) if isolate else None

    def after(module, args, kwargs, out):
        call = (module, args, kwargs, out)
        calls.append((*call, _versions(call)))
        return copy(out) if isolate else None

    hooks = [h for m in plan for h in (
        m.register_forward_pre_hook(before, with_kwargs=True),
        m.register_forward_hook(after, with_kwargs=True))]
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


def clipped_sum(
    model: nn.Module,
    loss_fn: Callable,
    trainable: dict[str, torch.Tensor],
    frozen: dict[str, torch.Tensor],
    thetas: list[dict[str, torch.Tensor] | None],
    inputs: tuple,
    targets: torch.Tensor,
    max_grad_norm: float,
    forward: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    verify: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Σ_b clip_C(mean_k g_kb), flat fp32 [D] in ``trainable`` order, norms [B], losses [K, B].

    thetas: K dicts name -> parameter value (the perturbed points), or [None]: the model's own
    parameters (one unperturbed pass). ``forward()``: the context of the model's forward and
    loss (e.g. bf16 autocast); the norms and sums run outside it, in fp32. ``verify``: also
    take autograd's batch gradient (one more weight-gradient pass) and check the per-example
    gradients add up to it, so a parameter used outside its layer cannot go unnoticed.
    """
    plan = _plan(model, trainable)
    names = {m: n for n, m in model.named_modules()}
    batch, k = len(targets), len(thetas)
    grads = {n: ParamGrad(p.shape) for n, p in trainable.items()}
    batch_grad: dict[str, torch.Tensor] = {}
    losses = []
    per_example_loss = vmap(lambda out, t: loss_fn(out.unsqueeze(0), t.unsqueeze(0)),
                            randomness="different")
    for params in thetas:
        direct = params is None  # the model's own parameters: no functional_call needed
        params = trainable if direct else {n: t.detach().requires_grad_(True)
                                           for n, t in params.items()}

        def run(isolate: bool, params=params, direct=direct) -> tuple[list, torch.Tensor]:
            with forward(), _recording(plan, isolate) as calls:
                out = (model(*inputs) if direct else
                       functional_call(model, {**frozen, **params}, inputs, tie_weights=True))
                return calls, per_example_loss(out, targets).float()

        calls, loss = run(isolate=False)
        if any(_versions(c) != c[4] for c in calls):  # a later in-place op changed a record
            calls, loss = run(isolate=True)
        losses.append(loss.detach())
        outs = [c[3] for c in calls]
        for module, _, _, output, _ in calls:
            if not isinstance(output, torch.Tensor):
                raise ValueError(f"the ghost engine needs layer {names.get(module, '<root>')} "
                                 f"({type(module).__name__}) to return one tensor, got "
                                 f"{type(output).__name__}. Use engine='vmap'")
        wrt = outs + (list(params.values()) if verify else [])
        found = torch.autograd.grad(loss.sum(), wrt, allow_unused=True)
        douts = found[:len(outs)]
        if verify:  # autograd's batch gradient, to check the per-example ones add up to it
            for n, g in zip(params, found[len(outs):]):
                if g is not None:
                    batch_grad[n] = batch_grad.get(n, 0) + g.detach().float() / k
        for (module, args, kwargs, *_), dout in zip(calls, douts):
            if dout is None:
                continue
            name = names.get(module, type(module).__name__)
            shapes = [t.shape[0] for t in (*args, dout) if isinstance(t, torch.Tensor)]
            if any(s != batch for s in shapes):
                raise ValueError(f"layer {name} ({type(module).__name__}) got an input or output "
                                 f"without the batch dimension {batch} first: per-example "
                                 "gradients need every layer input to carry the batch")
            args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            owned = plan[module]
            rule = rule_for(module)
            try:
                if rule is None:
                    raise Unsupported(type(module).__name__)
                parts = rule(module, args, dout.detach())
            except Unsupported:
                parts = _fallback(module, owned, params, args, kwargs, dout.detach(), name)
            for attr, part in parts.items():
                if attr in owned:
                    grads[owned[attr]].add(part, 1.0 / k)
    losses = torch.stack(losses)
    sq = torch.zeros(batch, device=losses.device)
    for g in grads.values():
        if g.factors or g.explicit is not None:
            sq = sq + g.finish()
    norms = sq.sqrt()
    if not bool(torch.isfinite(norms).all()):  # the losses are the caller's to check
        bad = int((~torch.isfinite(norms)).sum())
        raise NonFiniteError(f"{bad} per-example gradients are NaN or infinite")
    c = clip_factors(norms, max_grad_norm)
    if verify:
        _check_sums(grads, batch_grad, torch.ones_like(c))
    return _clipped_sums(grads, c), norms, losses


def _clipped_sums(grads: dict[str, ParamGrad], c: torch.Tensor) -> torch.Tensor:
    """Σ_b c_b g_b of every parameter, flat fp32 [D] in ``grads`` order."""
    sizes = [g.shape.numel() for g in grads.values()]
    flat = torch.zeros(sum(sizes), device=c.device)
    for g, part in zip(grads.values(), torch.split(flat, sizes)):
        if g.factors or g.explicit is not None:  # an unused parameter keeps its zeros
            g.clipped_sum(c, part)
    return flat


def _check_sums(grads: dict[str, ParamGrad], batch_grad: dict, ones: torch.Tensor) -> None:
    """The unclipped per-example gradients must add up to autograd's batch gradient.

    A parameter also used outside the layers that own it (e.g. ``F.linear(x, emb.weight)`` in a
    parent's forward) would otherwise get a silently wrong per-example gradient.
    """
    sums = torch.split(_clipped_sums(grads, ones), [g.shape.numel() for g in grads.values()])
    bad = []
    for name, ours in zip(grads, sums):
        ref = batch_grad.get(name)
        ref = torch.zeros_like(ours) if ref is None else ref.reshape(-1)
        if float((ours - ref).norm()) > 0.05 * float(ref.norm()) + 1e-6:
            bad.append(name)
    if bad:
        raise ValueError(f"per-example gradients of {bad} do not add up to the batch gradient: "
                         "these parameters are used outside the layers that own them (e.g. "
                         "F.linear(x, module.weight) in a parent's forward). Use engine='vmap'")
