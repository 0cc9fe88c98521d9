"""The ghost engine: clipped per-example sums from one forward + one backward per perturbation.

Forward hooks record each layer call's inputs; one ``autograd.grad`` of Σ_b ℓ_b gives the
gradients of the layer outputs. Layer rules (``ghost_rules``) turn them into per-example
gradients in factored form Σ_p u_pᵀ v_p, and ``ghost_grad.ParamGrad`` picks, per parameter,
the cheaper way to each example's squared norm ("mixed" ghost clipping):

- ghost norm: Σ_{p,p'} (u_p·u_p')(v_p·v_p'), cost ~ P²(m+n) per example;
- explicit:   ‖Σ_p u_pᵀ v_p‖², cost ~ P·m·n, forming the [m, n] gradient.

K perturbations: the gradient to clip is the mean over the K passes, so the K passes are
stacked as extra positions scaled by 1/K: the norm of the K-averaged gradient comes out of the
same products. Each pass runs the model itself, its trainable parameters pointed at the
pass's point (their own storage given back afterwards). The clipped sum
Σ_b c_b Σ_p u_bpᵀ v_bp is one matmul per parameter (book-keeping, no second backward). Shared
(tied) parameters sum the factors of all their uses before the norm. Layers without a rule get
per-example gradients of their own parameters by ``vmap(vjp)`` of that layer alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_map

from .ghost_grad import Budget, ParamGrad
from .ghost_rules import Factor, Unsupported, layer_norm_stats, rule_for
from .kernels.errors import refuse_non_finite, refuse_non_finite_losses
from .kernels.reference import clip_factors
from .losses import per_example as losses_of
from .model_state import replayable


class GhostUnsupported(ValueError):
    """The ghost engine cannot compute this model's per-example gradients, the vmap engine
    can: a layer returning a tuple, or one whose input lacks the batch dimension, or that
    vmap(vjp) of the layer alone cannot handle; a parameter used outside its layers.
    ``engine="auto"`` then runs the vmap engine."""


def plan_layers(model: nn.Module, trainable: dict[str, torch.Tensor]
                ) -> dict[nn.Module, dict]:
    """module -> {its attribute name: canonical trainable name} for modules owning trainables."""
    canon = {id(p): n for n, p in trainable.items()}
    owners: dict[nn.Module, dict] = {}
    for module in model.modules():
        # every attribute holding a trainable (one parameter under two names: both uses count)
        owned = {a: canon[id(p)] for a, p in module._parameters.items() if id(p) in canon}
        if owned:
            owners[module] = owned
    return owners


def refuse_unsupported(model: nn.Module, plan: dict) -> None:
    """Refuse, before any forward, what the rules cannot take: an Embedding with
    ``scale_grad_by_freq=True``, whose gradient scales each row by its count in the whole
    batch, where one example's gradient needs the counts in that example alone."""
    for module in plan:
        if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
            raise GhostUnsupported(f"layer {_label(model, module)}: Embedding with "
                                   "scale_grad_by_freq=True. Use engine='vmap'")


def check_weights(batch: int, device: torch.device) -> torch.Tensor:
    """Fixed weights w_b in [0.5, 1.5) for the verification (``check_sums``): autograd's
    gradient of Σ_b w_b ℓ_b must equal Σ_b w_b g_b, which holds only if every g_b is example
    b's own; unweighted, any split of the batch gradient would pass. Drawn from a generator
    of their own (the caller's RNG is not touched)."""
    gen = torch.Generator(device=device).manual_seed(0)
    return torch.rand(batch, generator=gen, device=device).add_(0.5)


def check_independent(model: nn.Module, loss_fn: Callable, inputs: tuple,
                      targets: torch.Tensor, plan: dict,
                      forward: Callable[[], contextlib.AbstractContextManager]) -> None:
    """Refuse a model whose forward mixes examples (``GhostUnsupported``): the ghost engine
    runs the batch through the model at once, so ``x - x.mean(0)``, batch statistics
    (``F.batch_norm(training=True)``), ``x / x.abs().max()`` or attention across the batch
    would let one example move the others' gradients, past any clipping.

    Forwards of the same shape (no gradient, in ``forward()``, every module in its own mode,
    each from the same state: torch's, Python's and numpy's RNGs, the modules' generators
    and plain attributes, see ``model_state.replayable``): the batch, then the batch with
    the examples outside a kept half replaced by copies of kept ones, for four halves: the
    first, the second, a seeded random half and its complement (mixing within blocks that
    do not cross the middle shows in the random ones). Each kept example must come out the
    same: every floating input and output of the planned layers, and its loss. With the
    same shapes every op runs the same way (blocking, dropout masks), so an example that
    depends on itself alone gets identical values; rows are compared through a random
    projection (memory O(B) per tensor) within 1e-6 of the projection of their magnitudes,
    or of the median row's where that is larger (``differ``). What a layer shared by the
    batch reads, and the keyword tensors a layer without a rule gets as they are, must be
    the same in every run.
    A mismatch under autocast is compared again in fp32 (a model may take another dtype
    path for a batch, e.g. Hugging Face dropping an all-ones attention mask). Layer values,
    not only losses: a zero-initialised head gives every example the same loss at first.
    Checked on verification steps: mixing that only some batches show (an expert's capacity
    overflowing) can appear later.

    Then the batch with every example moved one place (dropout modules off; a forward that
    still draws random numbers is not compared): each example's values must move with it,
    or the forward depends on where an example sits in the batch. Where a layer is shared by
    the batch (the engines expand its output, ``spread``), the batch once more with those
    outputs expanded: the losses must not change."""
    batch = len(targets)
    if batch < 2:
        return
    per_example_loss = batch_losses(loss_fn)
    first = next(model.parameters(), None)
    device = first.device if first is not None else targets.device
    gen = (torch.cuda.default_generators[device.index if device.index is not None
                                         else torch.cuda.current_device()]
           if device.type == "cuda" else torch.random.default_generator)
    draws: dict[int, torch.Tensor] = {}
    reset = replayable(model)
    shared: list[str] = []  # the layers ``spread`` would expand, as the runs find them

    def direction(n: int) -> torch.Tensor:
        if n not in draws:
            draws[n] = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(device)
        return draws[n]

    def projected(t: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor, str]:
        """Per row of batch-first t [B, ..., L]: (Σ t·r, Σ |t|·|r|) with r = r_M ⊗ r_L, and
        what t is."""
        x = t.detach().float().reshape(batch, -1, t.shape[-1] if t.dim() > 1 else 1)
        r_m, r_l = direction(x.shape[1]), direction(x.shape[2])
        return (x @ r_l) @ r_m, (x.abs() @ r_l.abs()) @ r_m.abs(), where

    def fixed(t: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor, str]:
        """A tensor that must not depend on the batch, as ``projected`` gives a row: its
        (Σ t·r, Σ |t|·|r|) over all its values, the same for every row."""
        x = t.detach().float().reshape(-1)
        r = direction(x.numel())
        return (x @ r).expand(batch), (x.abs() @ r.abs()).expand(batch), where

    def run(index: torch.Tensor, context: Callable, seed: int | None = None,
            no_dropout: bool = False, widen: list | None = None) -> tuple[list, bool]:
        """The rows' projections of every batch-first floating tensor the planned layers
        take or give, then of the losses, for the batch ``inputs[index]``; and whether
        autocast was on. ``seed``: torch's, Python's, numpy's and the modules' generators
        reseeded (default: torch's seeded 0, the others as they were); ``no_dropout``: the
        dropout modules in eval mode (put back by the next ``reset``); ``widen``: the
        outputs of layers shared by the batch expanded (``spread``), the layers listed."""
        seen: list = []

        def record(module, args, kwargs, out):
            refuse_transformed(model, module, out)
            wide = spread(model, module, args, kwargs, out, batch, checked=True)
            if wide is not None:
                shared.append(_label(model, module))
                # what a layer shared by the batch reads must be the same for any batch: a
                # [1, F] summary of the batch (h.mean(0, keepdim=True)) is not shared but
                # mixes every example into each one's gradient (even where its weights are
                # 0, so that the forward does not show it)
                for t in (*tensors_in(args), *tensors_in(kwargs)):
                    seen.append(fixed(t, f"the input of layer {_label(model, module)} (a "
                                         "layer shared by the batch)"))
                if widen is not None:
                    widen.append(shared[-1])
                    return wide[0]
            # a rule reads keyword inputs as positional ones (batch first); the fallback
            # (no rule) gives them to every example as they are: they must not change with
            # the batch (h.mean(0) by keyword into a gate zero at θ mixed every example
            # into each one's gradient at a perturbed point, 49 C: the red-team review)
            named = kwargs.values() if rule_for(module) is not None else ()
            if rule_for(module) is None:  # (tensors given directly; a container the
                # layer fills holds its outputs)
                for t in (v for v in kwargs.values() if isinstance(v, torch.Tensor)):
                    seen.append(fixed(t, f"a keyword input of layer {_label(model, module)}, "
                                         "handed to every example as it is,"))
            for t in (*args, *named, out):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() \
                        and t.shape[0] == batch and t.numel():
                    side = "output" if t is out else "input"
                    seen.append(projected(t, f"the {side} of layer {_label(model, module)}"))

        xs = tuple(t[index.to(t.device)] if isinstance(t, torch.Tensor) else t for t in inputs)
        hooks = [m.register_forward_hook(record, with_kwargs=True, prepend=True) for m in plan]
        reset(seed)
        gen.manual_seed(seed or 0)
        for m in model.modules() if no_dropout else ():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.training = False
        try:
            with context():
                autocast = torch.is_autocast_enabled(device.type)
                losses = per_example_loss(model(*xs), targets[index.to(targets.device)])
        finally:
            for h in hooks:
                h.remove()
        return seen + [projected(losses, "the loss")], autocast

    rows = torch.arange(batch)
    shuffled = torch.randperm(batch, generator=torch.Generator().manual_seed(batch))
    halves = [rows < batch // 2, rows >= batch // 2]
    halves += [torch.isin(rows, shuffled[:batch // 2]), torch.isin(rows, shuffled[batch // 2:])]

    def differ(whole: list, other: list, rows_whole: torch.Tensor, rows_other: torch.Tensor
               ) -> str | None:
        """What differs between rows ``rows_whole`` of one run's projections and
        ``rows_other`` of another's (beyond 1e-6 of the row's magnitude, or of the median
        row's where that is larger: a row moved within the batch meets another matmul
        blocking, whose rounding follows the terms summed, not the result — a regression
        head's output near 0 differed by 4e-6 of itself; the median, not the largest row,
        so that one huge example cannot widen the tolerance for the rest): the first such
        tensor, "the layer calls" when the runs' calls differ, or None."""
        if len(other) != len(whole):
            return "the layer calls"
        return next((where for (f, s, where), (g, _, _) in zip(whole, other)
                     if bool(((f[rows_whole] - g[rows_other]).abs()
                              > 1e-6 * torch.maximum(s[rows_whole], s.median())
                              + 1e-30).any())), None)

    def checked(index: torch.Tensor, context: Callable, what: str, **options) -> list:
        try:
            return run(index, context, **options)[0]
        except Exception as e:
            if out_of_memory(e):
                raise
            raise GhostUnsupported(
                f"the model failed on the ghost engine's independence check, a batch of the "
                f"same shape with {what}: {e}. Use engine='vmap'") from e

    def mixing(context: Callable) -> tuple[str | None, bool, list]:
        """What changed for kept examples when the others were replaced, or None; whether
        autocast was on; the whole batch's projections."""
        whole, autocast = run(rows, context)
        for keep in halves:
            kept = rows[keep]
            index = rows.clone()
            index[~keep] = kept[torch.arange(int((~keep).sum())) % len(kept)]
            changed = differ(whole, checked(index, context,
                                            "some examples replaced by copies of others"),
                             kept, kept)
            if changed:
                return changed, autocast, whole
        return None, autocast, whole

    def positional(context: Callable) -> str | None:
        """What does not follow the examples when each moves one place in the batch (the
        dropout modules off), or None. A forward that still draws random numbers (other
        seeds change it) cannot be told apart: None."""
        base, _ = run(rows, context, no_dropout=True)
        # (a seed no one picks: a generator the model seeded itself with 1 or 42 would draw
        # the same numbers again and pass for one that draws none)
        if differ(base, checked(rows, context, "other random seeds", seed=1_000_003,
                                no_dropout=True), rows, rows):
            return None
        moved = rows.roll(1)
        return differ(base, checked(moved, context, "the examples moved", no_dropout=True),
                      moved, rows)

    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda"
                                                else []):
        try:
            verdict, autocast, whole = mixing(forward)
            if verdict and autocast:  # another dtype path for a batch: compared in fp32
                verdict, _, _ = mixing(contextlib.nullcontext)
            moves = None if verdict else positional(forward)
            if moves and autocast:
                moves = positional(contextlib.nullcontext)
            widened: list[str] = []
            if shared and not (verdict or moves):
                wide = checked(rows, forward, "the outputs of layers shared by the batch "
                               "expanded to it", widen=widened)[-1:]
                if not differ(whole[-1:], wide, rows, rows):  # the same forward's losses
                    widened = []
        finally:
            reset()
    if widened:
        raise GhostUnsupported(
            f"the losses changed when the output of {', '.join(sorted(set(widened)))}, a "
            "layer shared by the batch (an output of first dimension 1, no input with a "
            "dimension of the batch's size), was expanded to the batch: the ghost engine "
            "expands it so that its gradient arrives per example, and this model reads that "
            "output's shape (e.g. sums over its first dimension). Use engine='vmap'")
    if verdict:
        raise GhostUnsupported(
            f"{verdict} changed for some examples when the rest of the batch was replaced: "
            "the model's forward mixes examples (batch statistics, x - x.mean(0), "
            "x / x.abs().max(), attention across the batch, control flow over the batch), so "
            "one example would move the others' gradients past the clipping. The ghost "
            "engine needs each example's forward to depend on that example alone; "
            "engine='vmap' runs each example alone")
    if moves:
        raise GhostUnsupported(
            f"{moves} did not follow the examples when each moved one place in the batch: "
            "either the forward depends on an example's position (e.g. x + pe[:x.size(0)], "
            "a positional table indexed by the batch dimension of batch-first input), so "
            "removing one example would move the others and change their gradients past the "
            "clipping, or a layer input's first dimension has the batch's size without being "
            "the batch (e.g. pos(torch.arange(T)) with T = B). The ghost engine needs each "
            "example's forward to depend on that example alone; engine='vmap' runs each "
            "example alone (as a batch of one)")


def supports(model: nn.Module, trainable: dict[str, torch.Tensor], owners: dict | None = None
             ) -> bool:
    """True when every layer owning a trainable parameter has a rule (no vmap fallback)."""
    owners = plan_layers(model, trainable) if owners is None else owners
    return all(rule_for(m) is not None for m in owners)


def _fallback(module: nn.Module, owned: dict, params: dict, args: tuple, kwargs: dict,
              grad: torch.Tensor, label: Callable[[], str]) -> dict:
    """Per-example gradients of ``module``'s own parameters by vmap(vjp) over the batch
    (detached: a module with child layers reaches their weights, which keep their own rules).
    Mapped over the batch: the positional tensors (batch first, checked by the caller);
    anything else — an int, every keyword argument (a batch-first keyword tensor cannot be
    told from a shared [T, T] mask when T = B; one that is batched fails here, and the model
    is refused) — goes to every example as it is. vmap runs in randomness="error" mode: a
    layer drawing random numbers (dropout) would get other draws than its forward had, so it
    is refused."""
    own = {a: params[c].detach() for a, c in owned.items()}
    dims = tree_map(lambda t: 0 if isinstance(t, torch.Tensor) else None, args)

    def one(x, g):
        def f(p):
            x1 = tree_map(lambda t, d: t.unsqueeze(0) if d == 0 else t, x, dims,
                          is_leaf=lambda t: t is None)
            return functional_call(module, p, x1, kwargs,
                                   tie_weights=False)  # each attribute its own tensor
        return vjp(f, own)[1](g.unsqueeze(0))[0]

    try:
        return {a: g.detach() for a, g in vmap(one, in_dims=(dims, 0),
                                                randomness="error")(args, grad).items()}
    except Exception as e:  # any layer vmap/vjp cannot handle: say which one
        if out_of_memory(e):
            raise
        raise GhostUnsupported(f"the ghost engine cannot compute per-example gradients of "
                               f"layer {label()}: {e}. Use engine='vmap'") from e


def batch_losses(loss_fn: Callable) -> Callable[[object, torch.Tensor], torch.Tensor]:
    """``losses.per_example(loss_fn)`` for the ghost engine, which takes the B per-example
    losses from one batch output: an output that is not one tensor with the batch first
    (a dict, a tuple, sequence-first logits) is refused (``GhostUnsupported``) before the
    loss sees it; the vmap engine gives ``loss_fn`` each example's output as the model
    returns it."""
    per_example = losses_of(loss_fn)

    def losses(output: object, targets: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, torch.Tensor) or output.dim() == 0 \
                or output.shape[0] != len(targets):
            got = (f"a tensor of shape {tuple(output.shape)}" if isinstance(output, torch.Tensor)
                   else f"a {type(output).__name__}")
            raise GhostUnsupported(
                f"the model returns {got}; the ghost engine takes the per-example losses from "
                f"one tensor whose first dimension is the batch ({len(targets)}). Use "
                "engine='vmap'")
        return per_example(output, targets)
    return losses


def _label(model: nn.Module, module: nn.Module) -> str:
    """``module``'s name in ``model`` and its type, for error messages."""
    name = next((n for n, m in model.named_modules() if m is module), None)
    return f"{name or '<root>'} ({type(module).__name__})"


def layer_grads(model: nn.Module, module: nn.Module, rule, owned: dict, params: dict,
                args: tuple, kwargs: dict, dout: torch.Tensor, batch: int,
                saved: tuple | None = None) -> dict:
    """attribute -> per-example gradient part (Factor or [B, *shape]) of one layer call. A
    rule reads positional inputs: arguments given by keyword are bound to their positions
    first; the vmap fallback takes the call as it was made (keyword arguments unbatched).
    ``saved``: what the forward computed for the rule to reuse (``_Call.saved``), passed as
    ``saved=`` when not None."""
    label = functools.partial(_label, model, module)
    _check_batch((*args, dout), batch, label)
    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    try:
        if rule is None:
            raise Unsupported(type(module).__name__)
        inputs = detached
        if kwargs:
            try:
                bound = inspect.signature(module.forward).bind(*args, **kwargs)
            except TypeError as e:
                raise Unsupported(str(e)) from e
            inputs = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in bound.args)
            _check_batch(inputs, batch, label)
        return rule(module, inputs, dout) if saved is None else \
            rule(module, inputs, dout, saved=saved)
    except Unsupported:
        return _fallback(module, owned, params, detached, kwargs, dout, label)


def _check_batch(tensors: tuple, batch: int, label: Callable[[], str]) -> None:
    if any(isinstance(t, torch.Tensor) and t.shape[0] != batch for t in tensors):
        raise GhostUnsupported(f"layer {label()} got an input or output without the batch "
                               f"dimension {batch} first: per-example gradients need every "
                               "layer input to carry the batch")


def _reads(args: tuple, storages: set[int]) -> bool:
    """Whether a layer call's first argument is (a view of) one of the model's inputs."""
    return bool(args) and isinstance(args[0], torch.Tensor) \
        and args[0].untyped_storage().data_ptr() in storages


def inputs_kept(tensors: Sequence[torch.Tensor], seen: tuple[int, ...]) -> None:
    """Refuse (ValueError) a model that changed its input in place during a forward when
    K > 1 passes must see the same input; ``seen``: ``versions(tensors)`` before."""
    if versions(tensors) != seen:
        raise ValueError("the model changed its input in place during a forward (e.g. "
                         "x.mul_(2)): the K perturbed passes would not see the same input and "
                         "the recorded activations would be overwritten. Compute on a copy "
                         "in the model (x = x * 2 instead of x.mul_(2))")


def versions(tensors: tuple) -> tuple[int, ...]:
    """Version counters of the tensors among ``tensors`` (in-place detection; inference
    tensors have none)."""
    return tuple(t._version for t in tensors
                 if isinstance(t, torch.Tensor) and not t.is_inference())


@dataclasses.dataclass
class _Call:
    """One recorded call of a planned layer: what its rule reads and where its output's
    gradient comes from (``target``, see ``_gradient_target``: None for an output that
    needed no gradient when the layer returned it; ``shape``: the output's, when ``target``
    is the edge of its base), ``held`` the tensors whose ``seen`` versions an in-place op
    must not change; ``spread``: its output went to the model expanded to the batch;
    ``as_is``: autograd saved its tensors as they were (``saved_as_is``); ``saved``: what its
    forward computed that its rule may reuse (``layer_norm_stats``)."""

    module: nn.Module
    args: tuple
    kwargs: dict
    target: object
    shape: torch.Size | None
    held: tuple
    seen: tuple[int, ...]
    spread: bool = False
    as_is: bool = False
    saved: tuple | None = None


def _gradient_target(module: nn.Module, out: object) -> tuple[object, torch.Size | None]:
    """What to ask autograd for a layer output's gradient, so that the output itself is not
    held through the backward (autograd frees it once no backward needs it: a transformer's
    logits, the MLP's hidden layer), and the shape to view that gradient as:

    - the edge into the node that made it;
    - for ``nn.Linear`` on inputs of three or more dims, or GPT-2's ``Conv1D`` (the output
      a view of a 2-d matmul result no one else sees, ``_local_matmul``), the edge of that
      result, viewed back to the output's shape;
    - any other view, the tensor itself: an in-place op on a view replaces the node it
      came from, while the base's node keeps every gradient that reaches the view;
    - None for a tensor that needs no gradient (the call gets none, after
      ``refuse_hidden_backward``), and anything else as it is, for ``one_tensor`` to refuse.
    """
    if not isinstance(out, torch.Tensor):
        return out, None
    if not out.requires_grad:
        return None, None
    if not out._is_view():
        return get_gradient_edge(out), None
    base = out._base
    if (_local_matmul(module) and base.numel() == out.numel() and base.is_contiguous()
            and out.is_contiguous()):
        return get_gradient_edge(base), out.shape
    return out, None


_LOCAL_MATMUL_CLASSES = ("transformers.pytorch_utils.Conv1D",)  # GPT-2's: addmm, then view


def _local_matmul(module: nn.Module) -> bool:
    """Whether ``module`` runs a forward that returns a view of a matmul result it made
    itself, seen by no one else: ``nn.Linear``'s (on inputs of three or more dims), or
    Hugging Face GPT-2's ``Conv1D`` (not overridden by a subclass)."""
    forward = type(module).forward
    if forward is nn.Linear.forward:
        return True
    return any(f"{c.__module__}.{c.__qualname__}" in _LOCAL_MATMUL_CLASSES
               and forward is c.forward for c in type(module).__mro__)


def _expanded(t: object, batch: int) -> object:
    """A tensor with first dimension 1 as a [batch, ...] view (anything else as it is)."""
    return (t.expand(batch, *t.shape[1:]) if isinstance(t, torch.Tensor) and t.dim()
            and t.shape[0] == 1 else t)


def spread(model: nn.Module, module: nn.Module, args: tuple, kwargs: dict, out: object,
           batch: int, checked: bool) -> tuple[torch.Tensor, tuple, dict] | None:
    """A layer call shared by the batch — an output whose first dimension is 1, no tensor
    input whose first dimension is the batch's size, and unless ``checked`` none with a
    dimension of that size (Hugging Face's ``position_embeddings(position_ids)`` with
    position ids [1, T]; what it reads must not change with the batch, ``check_independent``
    checks) — gets its output expanded to the batch: a view with the values broadcasting
    would give the model, whose gradient holds each example's share; returned with the
    call's inputs expanded alike (for its rule). None for any other call. [1, T] with T = B
    looks like a sequence-first input [1, B, F] (T = 1), which is the batch in its second
    dimension; expanded, that one changes the model, which the verification refuses (its
    losses change, it fails, or its sums do not add up). So such a call is spread only when
    ``checked`` (the step runs the verification); ``PrivateTrainer`` runs a step that meets
    one unverified again, verified.
    Refused (``GhostUnsupported``) when the layer has forward hooks of its own: they run
    after the engine's and would see the expanded output, not the one they were written
    for."""
    inputs = (*tensors_in(args), *tensors_in(kwargs))
    if batch < 2 or not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != 1 \
            or any(t.dim() and t.shape[0] == batch for t in inputs) \
            or (not checked and any(batch in t.shape for t in inputs)):
        return None
    if len(module._forward_hooks) > 1:  # the engine's own is one of them
        raise GhostUnsupported(f"layer {_label(model, module)} is shared by the batch (its "
                               "output is expanded to the batch for per-example gradients) "
                               "and has forward hooks of its own, which would see the "
                               "expanded output. Remove them, or use engine='vmap'")
    return (_expanded(out, batch), tuple(_expanded(a, batch) for a in args),
            {k: _expanded(v, batch) for k, v in kwargs.items()})


def out_of_memory(error: Exception) -> bool:
    """Whether ``error`` is running out of memory (CUDA's ``torch.OutOfMemoryError``, Python's
    ``MemoryError``, the CPU allocator's RuntimeError): a condition of the moment, not of the
    model, so never taken as the ghost engine's refusal (which would run another engine for
    the rest of the run); it propagates, and the failed step changes nothing."""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate" in str(error))


@contextlib.contextmanager
def spread_refused(model: nn.Module, spread_layers: Callable[[], list]) -> Iterator[None]:
    """A forward that fails (not ``GhostUnsupported``, not ``out_of_memory``) after layers
    shared by the batch had their outputs expanded (``spread_layers()``, read on failure)
    raises ``GhostUnsupported``: the model does not take the expanded output. Verification
    steps find this first, in ``check_independent``."""
    try:
        yield
    except GhostUnsupported:
        raise
    except Exception as e:
        spread_layers = spread_layers()
        if not spread_layers or out_of_memory(e):
            raise
        raise GhostUnsupported(
            f"the model failed with the output of layer {_label(model, spread_layers[0])}, "
            "which is shared by the batch, expanded to the batch (so that its gradient "
            f"arrives per example): {e}. Use engine='vmap'") from e


@contextlib.contextmanager
def _recording(model: nn.Module, plan: dict, isolate: bool, batch: int, checked: bool
               ) -> Iterator[list[_Call]]:
    """Record every call of the planned layers (``_Call``).

    ``isolate``: the layer gets copies of its tensor inputs (positional and keyword) and the
    rest of the model a copy of its output, so an in-place op elsewhere
    (``ReLU(inplace=True)``) cannot change what was recorded; used only when such an op was
    seen, as it costs a copy per layer. (An in-place op on an output recorded by an edge
    changes nothing: the edge's gradient is that of the value the layer returned.)

    A layer shared by the batch hands the model its output expanded to the batch
    (``spread``; ``checked``: the step runs the verification), so its output gradient
    arrives per example; its inputs are recorded expanded alike.
    """
    calls: list[_Call] = []

    def copy(t):
        return t.clone() if isinstance(t, torch.Tensor) else t

    def before(module, args, kwargs):
        return tuple(copy(a) for a in args), {k: copy(v) for k, v in kwargs.items()}

    def after(module, args, kwargs, out):
        # the copies are new (version 0): one written since is the layer writing into its
        # own input, which the copy would keep from the rest of the model (e.g. a running
        # sum passed to every layer): the isolated run would not be the model's
        if isolate and any(versions((*args, *kwargs.values()))):
            raise GhostUnsupported(
                f"layer {_label(model, module)} writes into one of its tensor inputs in "
                "place, which a later op also changes: the ghost engine cannot keep a record "
                "of that input without changing the model. Use engine='vmap'")
        refuse_transformed(model, module, out)
        wide = spread(model, module, args, kwargs, out, batch, checked)
        if wide is not None:
            out, args, kwargs = wide
        target, shape = _gradient_target(module, out)
        # tensors inside lists and dicts are watched, not copied (the layer may fill the
        # container for the model to read): changed in place, they are refused
        held = (*tensors_in(args), *tensors_in(kwargs),
                *([target] if isinstance(target, torch.Tensor) else []))
        calls.append(_Call(module, args, kwargs, target, shape, held, versions(held),
                           wide is not None, saved_as_is()))
        return copy(out) if isolate else out if wide is not None else None

    hooks = [m.register_forward_hook(after, with_kwargs=True, prepend=True) for m in plan]
    if isolate:
        hooks += [m.register_forward_pre_hook(before, with_kwargs=True) for m in plan]
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def exact_fp32(device: torch.device) -> Iterator[None]:
    """On CUDA, TF32 off (cuBLAS matmuls, cuDNN convolutions) while the block runs, restored
    after: a layer's per-example norms and its share of the clipped sum come from different
    products (Gram matrices or a grouped convolution; one weighted matmul or convolution), and
    TF32's rounding (about 1e-3, cuDNN's default for convolutions) would let an example move
    the sum by more than C. Nothing to do on other devices."""
    if device.type != "cuda":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    try:  # the API the process set TF32 with: torch >= 2.9 refuses a mix of the two
        legacy = isinstance(matmul.allow_tf32, bool)
    except RuntimeError:  # set through the newer fp32_precision settings
        legacy = False
    flags = ([(matmul, "allow_tf32", False), (cudnn, "allow_tf32", False)] if legacy else
             [(matmul, "fp32_precision", "ieee"), (cudnn.conv, "fp32_precision", "ieee")])
    saved = [getattr(obj, name) for obj, name, _ in flags]
    try:
        for obj, name, value in flags:
            setattr(obj, name, value)
        yield
    finally:
        for (obj, name, _), value in zip(flags, saved):
            setattr(obj, name, value)


@contextlib.contextmanager
def parameters_restored(trainable: dict[str, torch.Tensor]) -> Iterator[None]:
    """Give the trainable parameters back their own storage when the block ends (also on
    error); inside, a pass points them at other values with ``.data``: no copy, and no
    version bump that would break an autograd graph the caller holds."""
    own = [p.data for p in trainable.values()]
    try:
        yield
    finally:
        for p, data in zip(trainable.values(), own):
            p.data = data


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
    """Σ_b clip_C(mean_k g_kb), flat fp32 [D] in ``trainable`` order, norms [B], losses [K, B].

    thetas: K dicts name -> parameter value (the perturbed points), or [None]: the model's own
    parameters (one unperturbed pass). For its pass the model's parameters point at a point's
    values (``.data``: cheaper than ``functional_call``'s re-parametrisation, and tied weights
    stay tied); they get their own storage back afterwards, also on error.
    ``forward()``: the context of the model's forward and
    loss (e.g. bf16 autocast); the norms and sums run outside it, in fp32. ``verify``: first
    refuse a model whose forward mixes examples (``check_independent``), then also
    take autograd's gradient of Σ_b w_b ℓ_b (one more backward, ``check_weights``) and check
    that Σ_b w_b g_b of the per-example gradients equals it, so a parameter used outside its
    layer, or a layer input whose first dimension is not the batch, cannot go unnoticed.
    ``backend``: of the ghost-norm kernel (``kernels.ghost_sq_norms``). ``owners``:
    ``plan_layers(model, trainable)`` when the caller has it already.
    """
    plan = plan_layers(model, trainable) if owners is None else owners
    refuse_unsupported(model, plan)
    if verify:
        check_independent(model, loss_fn, inputs, targets, plan, forward)
    rules = {m: rule_for(m) for m in plan}
    batch, k = len(targets), len(thetas)
    device = next(iter(trainable.values())).device
    weights = check_weights(batch, device) if verify else None
    budget = Budget()
    grads = {n: ParamGrad(p.shape, 1.0 / k, backend, budget) for n, p in trainable.items()}
    batch_grad: dict[str, torch.Tensor] = {}
    losses = []
    per_example_loss = batch_losses(loss_fn)
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    model_inputs = {t.untyped_storage().data_ptr() for t in tensors}

    autocast: list[bool] = []  # whether the forward ran under autocast (check_sums)

    def run(isolate: bool) -> tuple[list, torch.Tensor]:
        with forward(), _recording(model, plan, isolate, batch, verify) as calls:
            autocast.append(torch.is_autocast_enabled(device.type))
            with spread_refused(model, lambda: [c.module for c in calls if c.spread]):
                return calls, per_example_loss(model(*inputs), targets)

    def one_pass() -> torch.Tensor:
        """Forward + backward at the model's current parameters: every layer's per-example
        gradient parts go to ``grads`` (autograd's batch gradient / k to ``batch_grad``)."""
        calls, loss = run(isolate=False)
        # a later in-place op changed a record: run again, the layers isolated
        if any(versions(c.held) != c.seen for c in calls):
            calls, loss = run(isolate=True)
            changed = next((c for c in calls if versions(c.held) != c.seen), None)
            if changed is not None:  # a tensor inside a list or dict, not copied
                raise GhostUnsupported(
                    f"an input of layer {_label(model, changed.module)} inside a list or "
                    "dict was changed in place after the layer read it: the ghost engine "
                    "would read the changed value. Use engine='vmap'")
        for c in calls:
            if c.target is not None and not isinstance(c.target, GradientEdge):
                one_tensor(model, c.module, c.target)
        # a call that needed no gradient gets none (unless some backward may run it again)
        silent = next((c for c in calls if c.target is None), None)
        if silent is not None:
            refuse_hidden_backward(model, loss, silent.module)
        calls = [c for c in calls if c.target is not None]
        wrt = [c.target for c in calls]
        for c in calls:  # the rules read inputs (and what the backward would free) only
            if c.as_is and isinstance(c.target, GradientEdge):
                c.saved = layer_norm_stats(c.module, c.args, c.target.node)
            c.target = c.held = None
        if not loss.requires_grad:  # no trainable parameter reaches the loss: zero gradients,
            return loss.detach()  # as the vmap and loop engines give
        if verify:  # autograd's gradient of Σ w_b ℓ_b, to check the per-example ones against;
            # first, while no output gradient is held yet (a lower peak)
            weighted = torch.autograd.grad((loss * weights).sum(), list(trainable.values()),
                                           allow_unused=True, retain_graph=True)
            for n, g in zip(trainable, weighted):
                if g is not None:
                    batch_grad[n] = batch_grad.get(n, 0) + g.float() / k
            del weighted
        # no planned layer called (its parameters used outside it): nothing to record; the
        # check then finds the gradients missing
        found = torch.autograd.grad(loss.sum(), wrt, allow_unused=True) if wrt else []
        del wrt
        for c, dout in zip(calls, found):
            if dout is not None:
                module, args, kwargs = c.module, c.args, c.kwargs
                dout = dout if c.shape is None else dout.view(c.shape)
                parts = layer_grads(model, module, rules[module], plan[module], trainable,
                                    args, kwargs, dout, batch, c.saved)
                if _reads(args, model_inputs):  # the same input in every perturbed pass
                    for part in parts.values():
                        if isinstance(part, Factor):
                            part.invariant = True
                for attr, part in parts.items():
                    if attr in plan[module]:
                        grads[plan[module][attr]].add(part)
        return loss.detach()

    inputs_seen = versions(tensors)
    with parameters_restored(trainable):
        for done, point in enumerate(thetas, 1):
            if point is not None:
                for p, value in zip(trainable.values(), point.values()):
                    p.data = value
            losses.append(one_pass())
            if done < k:  # parameters formed explicitly are formed now: one pass held at a time
                with exact_fp32(device):
                    for g in grads.values():
                        g.settle(k / done)
    if k > 1:
        inputs_kept(tensors, inputs_seen)
    losses = torch.stack(losses)
    with exact_fp32(device):  # the norms and the sum from the same factors, in IEEE fp32
        sq = {name: g.finish() for name, g in grads.items() if not g.empty}
        norms, c = clip_of(list(sq.values()), batch, losses, max_grad_norm)
        if verify:
            sums = torch.split(_clipped_sums(grads, weights),
                               [g.shape.numel() for g in grads.values()])
            check_sums(dict(zip(grads, sums)), batch_grad,
                       sums_tolerance(trainable, any(autocast)),
                       {name: float((weights.square() @ v).sqrt()) for name, v in sq.items()},
                       sq)
        return _clipped_sums(grads, c), norms, losses


@contextlib.contextmanager
def attention_fastpath_off() -> Iterator[None]:
    """torch's fast path for attention off, around a whole private step (``private_step``;
    the check's forwards run inside it): an ``nn.TransformerEncoder`` in eval mode with a
    padding mask otherwise turns the batch into nested tensors — under no_grad (the check's
    forwards: no batch size to compare, and not the layers a training forward calls) and
    under vmap (no batching rule)."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def saved_as_is() -> bool:
    """Whether autograd now saves tensors for the backward as they are: no
    ``saved_tensors_hooks`` in effect (a non-reentrant activation checkpoint's, whose
    unpacking before the backward would run the recomputation early and hold its tensors;
    ``save_on_cpu``'s, which would copy them back). False where torch has no way to ask."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is None


def one_tensor(model: nn.Module, module: nn.Module, output: object) -> None:
    """Refuse a layer whose output is not one tensor (its output gradient is what we use)."""
    if not isinstance(output, torch.Tensor):
        raise GhostUnsupported(f"the ghost engine needs layer {_label(model, module)} to "
                               f"return one tensor, got {type(output).__name__}. Use "
                               "engine='vmap'")


def refuse_transformed(model: nn.Module, module: nn.Module, output: object) -> None:
    """Refuse a layer called inside a ``torch.func`` transform (``torch.vmap`` in the
    model's forward): its output is a functorch wrapper, whose ``requires_grad`` says
    nothing of the gradient the layer gets, and its per-example gradients are not the
    rules' to take."""
    if isinstance(output, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(
            output):
        raise GhostUnsupported(f"layer {_label(model, module)} is called inside a torch.func "
                               "transform (torch.vmap, torch.func.grad) in the model's "
                               "forward: the ghost engine cannot take its per-example "
                               "gradients. Use engine='vmap'")


def refuse_hidden_backward(model: nn.Module, loss: torch.Tensor, module: nn.Module,
                           allowed: tuple[type, ...] = ()) -> None:
    """``module`` (a planned layer) ran without gradient: under ``torch.no_grad()`` its
    parameters get no gradient from that call, as autograd says. But inside a custom
    autograd function (a reentrant checkpoint, ``checkpoint(..., use_reentrant=True)``;
    a reversible layer, as in Reformer) it may run again in that function's own backward,
    which no ``autograd.grad`` reaches, and its true gradient would silently become zero:
    refused when the loss's graph holds such a function (other than ``allowed``)."""
    seen, nodes = set(), [loss.grad_fn]
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        if (isinstance(node, torch.autograd.function.BackwardCFunction)
                and getattr(node, "_forward_cls", None) not in allowed):
            raise GhostUnsupported(
                f"layer {_label(model, module)} ran without gradient, and the loss depends "
                f"on a custom autograd function ({type(node).__name__}) that may run it "
                "again in its own backward (a reentrant activation checkpoint, a reversible "
                "layer), which autograd.grad cannot reach: use checkpoint(..., "
                "use_reentrant=False), or engine='vmap' (with low_memory=False)")
        seen.add(node)
        nodes.extend(n for n, _ in node.next_functions)


def tensors_in(obj: object) -> Iterator[torch.Tensor]:
    """The tensors in ``obj``, also inside lists, tuples and dicts (a layer's inputs)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from tensors_in(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from tensors_in(item)


def clip_of(sq: list[torch.Tensor], batch: int, losses: torch.Tensor, max_grad_norm: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example norms [B] from the parameters' squared norms [B] each, and the clip
    factors c_b = min(1, C / norm); a NaN or infinite loss ([K, B] or [B], checked first:
    the cause, the norms its consequence) or norm raises ``NonFiniteError``."""
    refuse_non_finite_losses(losses)
    norms = (torch.stack(sq).sum(0) if sq else losses.new_zeros(batch, dtype=torch.float32)
             ).sqrt()
    refuse_non_finite(norms, "gradients", ", or their squared norm overflows float32")
    return norms, clip_factors(norms, max_grad_norm)


def _clipped_sums(grads: dict[str, ParamGrad], c: torch.Tensor) -> torch.Tensor:
    """Σ_b c_b g_b of every parameter, flat fp32 [D] in ``grads`` order."""
    sizes = [g.shape.numel() for g in grads.values()]
    flat = torch.empty(sum(sizes), device=c.device)
    for g, part in zip(grads.values(), torch.split(flat, sizes)):
        if g.empty:  # an unused parameter: zeros
            part.zero_()
        else:
            g.clipped_sum(c, part)
    return flat


def sums_tolerance(trainable: dict[str, torch.Tensor], autocast: bool) -> tuple[float, float]:
    """``check_sums``' tolerances (of the batch gradient's norm, of the examples' root sum of
    squares (Σ_b w_b² ‖g_b‖²)^½). fp32: 1 % and 0 (the two sums differ by rounding only: at
    most 1.1e-6 measured on the tests' and the bench's models; TF32 convolutions on CUDA,
    cuDNN's default, about 5e-4). Under autocast or with bf16/fp16 parameters: 5 % (up to
    1.5e-2 measured) and 2 bf16 rounding units, 0.8 %: each example's terms carry their own
    rounding, independent from example to example, so where the terms cancel the difference
    follows their root sum of squares, not the batch gradient (11 % of it measured on a
    convolution's bias, 0.7 % of the root sum of squares; a parameter used 0.05x outside
    its layer is still caught, as with 5 % alone, at B = 8, 64 and 256)."""
    low = autocast or any(p.dtype in (torch.bfloat16, torch.float16) for p in trainable.values())
    return (0.05, 2 * 2.0**-8) if low else (0.01, 0.0)


def check_sums(sums: dict[str, torch.Tensor], batch_grad: dict,
               tolerance: tuple[float, float] = (0.05, 0.0),
               magnitudes: dict[str, float] | None = None,
               squares: dict[str, torch.Tensor] | None = None) -> None:
    """The weighted per-example gradients must add up to autograd's weighted batch gradient:
    ``sums`` name -> Σ_b w_b g_b (flat fp32), ``batch_grad`` name -> autograd's gradient of
    Σ_b w_b ℓ_b (None: zeros), w = ``check_weights``; within ``tolerance[0]`` of its norm plus
    ``tolerance[1]`` of ``magnitudes`` name -> (Σ_b w_b² ‖g_b‖²)^½ (``sums_tolerance``),
    plus 1e-6 of median_b ‖g_b‖·√B over the examples' whole-model norms (from ``squares``,
    name -> each example's squared norm ‖g_b‖² [B] of that parameter; at least 1e-6): a
    parameter whose gradient is zero by construction (a convolution's bias before a norm of
    one channel per group) gets two sums of rounding, which grow with the model's gradient,
    not its own. The median, so that one huge example cannot widen it (the whole batch
    gradient's norm grows with it squared, a misattributed part linearly). For the same
    reason, a parameter's batch gradient's norm counts at most 1.5·B·s and its root sum of
    squares at most 1.5·√B·s, s the second largest ‖g_b‖ (all examples aligned, at the
    largest weight, but one): one example's own huge gradient widened the 1 % to let a
    misattributed part of the others' through (4.7 C).

    A parameter also used outside the layers that own it (e.g. ``F.linear(x, emb.weight)`` in a
    parent's forward), or a layer input whose first dimension has the batch's size without
    being the batch (``pos_emb(torch.arange(T))`` with T = B), would otherwise get a silently
    wrong per-example gradient.
    """
    bad = []
    whole = torch.stack(list(squares.values())).sum(0).sqrt() if squares else None
    typical = 0.0 if whole is None else float(whole.float().median()) * len(whole) ** 0.5
    for name, ours in sums.items():
        ref = batch_grad.get(name)
        ref = torch.zeros_like(ours) if ref is None else ref.reshape(-1)
        size, scatter = float(ref.norm()), (magnitudes or {}).get(name, 0.0)
        if squares is not None and name in squares and len(squares[name]) > 1:
            # the second largest example: robust to one, and unlike the median not below
            # what a batch of mostly fitted examples (tiny gradients) and a few others gives
            second = float(squares[name].float().topk(2).values[1].sqrt())
            count = len(squares[name])
            size = min(size, 1.5 * second * count)
            scatter = min(scatter, 1.5 * second * count ** 0.5)
        allowed = tolerance[0] * size + 1e-6 * max(1.0, typical) + tolerance[1] * scatter
        if float((ours - ref).norm()) > allowed:
            bad.append(name)
    if bad:
        raise GhostUnsupported(f"per-example gradients of {bad} do not add up to the batch "
                               "gradient: these parameters are used outside the layers that "
                               "own them (e.g. F.linear(x, module.weight) in a parent's "
                               "forward), or a layer input's first dimension is not the batch "
                               "(e.g. pos_emb(torch.arange(T)) with T equal to the batch "
                               "size). Use engine='vmap'")
