"""The private gradient: per-example gradients by torch.func, K-averaged, clipped, noised.

grad = ( Σ_i clip_C( (1/K) Σ_k ∇ℓ(θ + u_k; x_i) ) + N(0, (σC)² I) ) / expected_batch_size
with u_k ~ N(0, s² I) drawn once per call and shared by the batch (s = 0, K = 1: DP-SGD).

Three engines compute the clipped sum. "vmap": the trainable parameters are ONE flat vector
θ [D], so vmap(grad) yields one contiguous [K, B, D] buffer that ``kernels.fused_dp_step``
clips, sums, noises and scales in one launch. "loop": the same buffer from a Python loop of
one-example forwards and backwards, for models torch.vmap cannot run (slow: B·K passes).
"ghost" (``dplis.ghost``): one forward and backward per perturbation, per-example norms from
layer activations and output gradients, no [B, D] buffer; its noise goes through
``kernels.add_noise``. Sums are accumulated in fp32.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from . import checks, compiled, diagnose, ghost, ghost_low_memory, kernels, recurrent
from .kernels import NonFiniteError
from .kernels.errors import refuse_non_finite_losses
from .losses import scalar_loss
from .model_state import state_kept
from .secure_noise import secure_gaussian
from .validation import validate

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_SEED_MAX = 2**62  # seeds drawn per step; a dropout stream is added to its seed
ENGINES = ("auto", "vmap", "ghost", "loop")
PER_EXAMPLE_ENGINES = ("vmap", "loop")  # a [K, B, D] buffer of per-example gradients
PRECISIONS = ("fp32", "bf16")


Context = Callable[[], contextlib.AbstractContextManager]


def forward_context(precision: str, device: torch.device) -> Context:
    """What the model's forward runs under: bf16 autocast, or nothing; never the DP maths."""
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@dataclass
class PrivateStep:
    """What one private step computed.

    grads: name -> private gradient (parameter shape and dtype); loss: mean per-example loss over
    the batch and the K perturbed points (non-private, for logging; NaN for an empty batch);
    norms: fp32 [B] norms of the K-averaged per-example gradients before clipping; engine:
    the engine that computed them, "ghost", "vmap" or "loop" (what "auto" chose).
    """

    grads: dict[str, torch.Tensor]
    loss: float
    norms: torch.Tensor
    engine: str


def as_batch(inputs: torch.Tensor | tuple, targets: torch.Tensor) -> tuple[tuple, int]:
    """Normalise ``inputs`` to a tuple and check every tensor has the same batch length."""
    if not isinstance(inputs, torch.Tensor | tuple | list):
        raise TypeError(f"inputs must be a tensor or a tuple or list of tensors (the model's "
                        f"positional arguments), got {type(inputs).__name__}")
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if not inputs:
        raise ValueError("inputs must be a tensor or a non-empty tuple of tensors")
    for t in (*inputs, targets):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"inputs and targets must be tensors, got {type(t).__name__}")
        if t.dim() == 0:
            raise ValueError("inputs and targets need a leading batch dimension, got a 0-d tensor")
    lengths = {len(t) for t in (*inputs, targets)}
    if len(lengths) != 1:
        shapes = [tuple(t.shape) for t in inputs]
        raise ValueError(
            f"mismatched batch sizes: inputs {shapes} vs targets {tuple(targets.shape)}; "
            "every tensor needs the same first dimension"
        )
    return inputs, lengths.pop()


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The private parameters: those with requires_grad=True (shared ones listed once)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the model has no trainable parameter (requires_grad=True)")
    for n, p in params.items():
        if isinstance(p, nn.parameter.UninitializedParameter):
            raise ValueError(f"parameter {n} belongs to a lazy module that has not run yet: "
                             "call the model once on a batch (its shapes are set then) "
                             "before the private step")
        if p.is_complex():
            raise TypeError(f"parameter {n} is complex ({p.dtype}): per-example clipping "
                            "here takes real parameters; hold the real and imaginary parts as "
                            "two real parameters (torch.view_as_complex in forward)")
    kinds = {(p.dtype, p.device) for p in params.values()}
    if len(kinds) > 1:
        raise ValueError(f"trainable parameters must share one dtype and device, got {kinds}")
    return params


def draw_seeds(generator: torch.Generator | None, n: int) -> list[int]:
    """n seeds in [0, 2**62) from ``generator`` (or torch's global RNG)."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, _SEED_MAX, (n,), generator=generator, device=device).tolist()


def step_noise_seed(seed: int, step: int) -> int:
    """The noise seed of step ``step`` (0, 1, ...) of a run seeded ``seed``: a base hashed
    from the seed plus the step number, modulo 2**63. Consecutive seeds never repeat within
    2**32 steps, even in their low 32 bits (all that CPU's mt19937 reads), so no two steps of
    a run share their noise."""
    digest = hashlib.blake2b(f"dplis noise {seed}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") + step) % kernels.SEED_MAX


@contextlib.contextmanager
def restore_on_error(generator: torch.Generator | None,
                     cuda_devices: Sequence[torch.device] = ()) -> Iterator[None]:
    """Give ``generator`` back its state if the body raises; without one, the global CPU RNG
    and those of ``cuda_devices`` (whose dropout masks the body draws then)."""
    state = generator.get_state() if generator is not None else torch.get_rng_state()
    devices = [] if generator is not None else [(d, torch.cuda.get_rng_state(d))
                                                 for d in cuda_devices]
    try:
        yield
    except BaseException:
        if generator is not None:
            generator.set_state(state)
        else:
            torch.set_rng_state(state)
        for device, kept in devices:
            torch.cuda.set_rng_state(kept, device)
        raise


def _per_example_grads(model, loss_fn, names, shapes, thetas, frozen, inputs, targets, forward,
                       compile, loop=False):
    """[k, B, D] flat gradients and [k, B] losses at the k parameter points ``thetas`` [k, D]
    (``compile``: through ``torch.compile``, see ``dplis.compiled``; ``loop``: one example at
    a time instead of vmap, ``_looped``)."""
    sizes = [s.numel() for s in shapes]

    def loss_one(flat, xs, y):
        views = {n: v.view(s) for n, v, s in zip(names, torch.split(flat, sizes), shapes)}
        with forward():
            out = functional_call(model, {**frozen, **views}, tuple(x.unsqueeze(0) for x in xs),
                                  tie_weights=True)
            loss = scalar_loss(loss_fn, out, y.unsqueeze(0)).float()
        return loss, loss.detach()

    if loop:
        with _modules_restored(model), torch.enable_grad():
            try:
                return _looped(loss_one, thetas, inputs, targets)
            except Exception as e:
                diagnose.note_layer(e, model, "while the loop engine ran the model on one "
                                              "example")
                raise
    per_example = vmap(grad(loss_one, has_aux=True), in_dims=(None, 0, 0), randomness="different")

    def batched(ths: torch.Tensor, xs: tuple, y: torch.Tensor):
        return vmap(per_example, in_dims=(0, None, None), randomness="different")(ths, xs, y)

    with _modules_restored(model), recurrent.vmap_ready(model):
        try:
            if compile:
                return compiled.run_padded(batched, thetas, inputs, targets)
            return batched(thetas, inputs, targets)
        except Exception as e:  # torch's vmap errors name no layer: say which one ran
            diagnose.note_layer(e, model, "while the vmap engine ran the model under "
                                          "torch.vmap; engine='loop' runs each example alone "
                                          "without it (slower)",
                                "dplis: raised under torch.vmap outside any layer's "
                                "forward: in the loss (are the targets' values, dtype and "
                                "shape what it takes?) or in a backward (torch's vmap of a "
                                "bf16 autocast backward through layer_norm fails so); "
                                "engine='ghost' or 'loop' runs without vmap, where torch's "
                                "errors are plainer")
            raise


def _looped(loss_one: Callable, thetas: torch.Tensor, inputs: tuple, targets: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """[k, B, D] gradients and [k, B] fp32 losses of ``loss_one(flat θ, one example's inputs,
    its target) -> (loss, value)`` at each of the k points ``thetas`` [k, D], one example at a
    time with autograd (B·k forwards and backwards): what the vmap engine computes, for a
    model torch.vmap cannot run (data-dependent control flow, transformers' padding masks)."""
    k, batch = thetas.shape[0], len(targets)
    grads = thetas.new_zeros(k, batch, thetas.shape[1])
    losses = torch.zeros(k, batch, device=thetas.device)
    seen = ghost.versions(inputs)
    for i in range(k):
        flat = thetas[i].detach().requires_grad_()
        for b in range(batch):
            loss, losses[i, b] = loss_one(flat, tuple(x[b] for x in inputs), targets[b])
            if loss.requires_grad:  # else no trainable parameter reached it: zeros
                (g,) = torch.autograd.grad(loss, flat, allow_unused=True)
                if g is not None:
                    grads[i, b] = g
        if k > 1:  # every point must see the same examples
            ghost.inputs_kept(inputs, seen)
    return grads, losses


@contextlib.contextmanager
def _modules_restored(model: nn.Module) -> Iterator[None]:
    """Put every module's own parameter and buffer objects back when the block ends:
    ``functional_call`` swaps them in and out, and restores the wrong one when a module is
    registered twice (``nn.Sequential(lin, act, lin)``), leaving a plain tensor in place of
    the optimizer's Parameter."""
    saved = [(m, dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    try:
        yield
    finally:
        for module, params, buffers in saved:
            module._parameters.update(params)
            module._buffers.update(buffers)


def resolve_engine(engine: str, model: nn.Module, params: dict[str, torch.Tensor],
                   plan: dict | None = None, low_memory: bool = False,
                   num_perturbations: int = 1, compile: bool = False,
                   precision: str = "fp32") -> str:
    """"ghost", "vmap" or "loop". "auto" means ghost, its layers without a rule through the vmap
    fallback (faster than the vmap engine on every model measured, even one without any
    rule); ``private_step`` then runs the vmap engine where ghost raises
    ``ghost.GhostUnsupported``. With ``compile``, "auto" is vmap unless every layer owning a
    trainable has a rule (compiling applies to the vmap engine); with ``low_memory`` ghost
    (only it has that mode, for one pass: K = 1, and in fp32: under bf16 its second
    backward rounds differently from the first, so an example could move the sum by more
    than C).

    ``plan``: ``ghost.plan_layers(model, params)`` when the caller has it already."""
    checks.choice("engine", engine, ENGINES)
    if checks.flag("low_memory", low_memory):
        if engine in PER_EXAMPLE_ENGINES:
            raise ValueError(f'low_memory=True is a mode of the ghost engine; engine="{engine}" '
                             'materialises [B, D] per-example gradients: use engine="ghost" '
                             'or "auto"')
        if num_perturbations != 1:
            raise ValueError(f"low_memory=True takes one pass per step (num_perturbations=1), "
                             f"got num_perturbations={num_perturbations}: the norm of a "
                             "K-averaged gradient needs all K passes' activations at once")
        if precision != "fp32":
            raise ValueError(f"low_memory=True runs in fp32 only, got precision={precision!r}: "
                             "its clipped sum comes from a second backward, which in bf16 "
                             "rounds differently from the one the norms came from, so an "
                             "example could move the sum by more than max_grad_norm")
        return "ghost"
    if engine == "auto":
        return "vmap" if checks.flag("compile", compile) and not ghost.supports(
            model, params, plan) else "ghost"
    return engine


def compile_applies(compile: bool, requested: str, engine: str) -> bool:
    """Whether ``compile`` takes effect: the vmap engine compiles; asking the ghost engine to
    raises, and "auto" resolved to ghost warns that ``compile`` does nothing."""
    if checks.flag("compile", compile) and engine == "loop":
        raise ValueError('compile=True applies to engine="vmap"; the loop engine runs eager')
    if checks.flag("compile", compile) and engine == "ghost":
        if requested == "ghost":
            raise ValueError('compile=True applies to engine="vmap"; the ghost engine runs eager')
        warnings.warn('compile=True has no effect: engine="auto" chose the ghost engine for '
                      'this model; pass engine="vmap" to compile the per-example gradients',
                      stacklevel=3)
        return False
    return compile


def private_step(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor | tuple,
    targets: torch.Tensor,
    *,
    max_grad_norm: float,
    noise_multiplier: float,
    smoothing_std: float = 0.0,
    num_perturbations: int = 1,
    expected_batch_size: float | None = None,
    generator: torch.Generator | None = None,
    engine: str = "auto",
    max_physical_batch_size: int | None = None,
    perturbation_chunk_size: int | None = None,
    backend: str | None = None,
    offset: torch.Tensor | None = None,
    secure_rng: bool = False,
    precision: str = "fp32",
    verify: bool = True,
    compile: bool = False,
    dropout_stream: int = 0,
    noise_seed: int | None = None,
    low_memory: bool = False,
) -> PrivateStep:
    """``private_grad`` plus the logging loss, per-example norms and engine; see
    ``private_grad``.

    ``engine``: "vmap" (per-example gradients by vmap(grad), fused kernel clip + noise),
    "loop" (the same gradients from one-example forwards and backwards in a Python loop, B·K
    of them: for a model torch.vmap cannot run, such as data-dependent control flow or
    transformers' padding-mask code), "ghost" (``dplis.ghost``: one forward + backward per
    perturbation, no [B, D] buffer) or "auto": ghost, and the vmap engine if ghost raises
    ``ghost.GhostUnsupported`` (a layer returning a tuple, a layer input without the batch
    dimension, a parameter used outside its layer: found by running it, so such a model pays
    a ghost attempt per call), and the loop engine, with a warning, if the vmap engine then
    fails with a RuntimeError (torch.func refusing the model: data-dependent control flow, an
    op without a batching rule, packing sequences; the loop computes exactly what vmap would,
    so a model it runs gets the same result;
    ``PrivateTrainer`` remembers the outcome of its first step; with ``compile=True``, see
    ``resolve_engine``). ``max_physical_batch_size`` splits the batch into chunks whose
    clipped sums are added up before the noise is added once (a logical batch larger than
    memory).
    ``offset`` (flat [D], trainable parameters in ``named_parameters`` order) moves the point
    where gradients are taken to θ + offset (DP-SAT's ascent step); the model is not changed.
    ``secure_rng`` draws the Gaussian noise from os.urandom (``secure_noise``) instead of the
    seeded RNG; ``generator`` then only drives perturbations and dropout. ``precision="bf16"``
    runs the model's forward (and so its backward) under bf16 autocast; per-example norms,
    clipping, sums and noise stay in fp32. ``verify`` (ghost engine): also check that the
    per-example gradients add up to autograd's batch gradient (one more weight-gradient pass;
    ``PrivateTrainer`` does it on its first step only). ``compile`` (vmap engine): run the
    per-example gradients through ``torch.compile`` (``dplis.compiled``: one compilation per
    batch-size bucket, same results); refused with engine="ghost", ignored with a warning
    when "auto" picks ghost (see ``compile_applies``). ``dropout_stream``: which of the
    generator's dropout-mask streams this call draws from (0 ≤ stream < 2³¹; the step's
    dropout seed + stream, so streams differ in the low 32 bits CPU's mt19937 reads; noise and
    perturbations do not depend on it): ``PrivateTrainer`` passes its rank, so ranks that
    share a generator (for the perturbations) still draw independent dropout masks.
    ``noise_seed`` (int in [0, 2**63)): the seed of this call's noise; by default one drawn
    from the generator. On CPU the noise generator (mt19937) reads a seed's low 32 bits only,
    so random seeds repeat, and two steps share their noise, with probability about
    n²/2³³ over n steps (0.1 % at 3 000 steps, 69 % at 100 000): ``PrivateTrainer``
    passes consecutive seeds (a base + the step number), which never repeat within 2³²
    steps.
    ``low_memory`` (ghost engine, K = 1; see ``ghost_low_memory``): per-example norms inside
    the backward and the clipped sum from a second backward of Σ_b c_b ℓ_b, so no layer's
    output gradient is held past its use: peak memory near the non-private step's, for one
    more backward; "auto" then means the ghost engine.
    """
    call = dict(locals())  # the arguments, to run again with an engine chosen below
    max_grad_norm = checks.positive("max_grad_norm", max_grad_norm)
    sigma = checks.non_negative("noise_multiplier", noise_multiplier)
    std = checks.non_negative("smoothing_std", smoothing_std)
    k = checks.integer("num_perturbations", num_perturbations, 1)
    stream = checks.integer("dropout_stream", dropout_stream, 0, 2**31 - 1)
    checks.flag("verify", verify)
    checks.generator(generator)
    if offset is not None and not isinstance(offset, torch.Tensor):
        raise TypeError(f"offset must be a flat tensor over the trainable parameters or None, "
                        f"got {type(offset).__name__}")
    if checks.flag("secure_rng", secure_rng) and noise_seed is not None:
        raise ValueError("secure_rng=True takes no noise_seed: its noise comes from "
                         "os.urandom and must not be replayable")
    if noise_seed is not None:
        noise_seed = checks.integer("noise_seed", noise_seed, 0, kernels.SEED_MAX - 1)
    chunk = k if perturbation_chunk_size is None else checks.integer(
        "perturbation_chunk_size", perturbation_chunk_size, 1)
    inputs, batch = as_batch(inputs, targets)
    physical = max(batch, 1) if max_physical_batch_size is None else checks.integer(
        "max_physical_batch_size", max_physical_batch_size, 1)
    if expected_batch_size is None:
        if batch == 0:
            raise ValueError("an empty batch needs expected_batch_size (q·N for Poisson sampling)")
        expected_batch_size = batch
    divisor = checks.positive("expected_batch_size", expected_batch_size)
    # the clipped sum is at most B·C, a Gaussian draw below 64 standard deviations
    if (64 * sigma + batch) * max_grad_norm / divisor > torch.finfo(torch.float32).max:
        raise ValueError(f"the private gradient's scale (64·noise_multiplier + B)·max_grad_norm"
                         f" / expected_batch_size = (64·{sigma:g} + {batch})·{max_grad_norm:g} / "
                         f"{divisor:g} overflows float32")
    validate(model)
    params = trainable(model)
    plan = ghost.plan_layers(model, params)
    requested, engine = engine, resolve_engine(engine, model, params, plan, low_memory, k,
                                               compile, precision)
    compile = compile_applies(compile, requested, engine)
    if requested == "auto" and engine == "ghost" and not low_memory:
        try:  # a failing step changes nothing: the vmap engine then starts from the same state
            return private_step(**{**call, "engine": "ghost", "compile": False})
        except ghost.GhostUnsupported as unsupported:
            # (its advice to use vmap is what "auto" does next: not repeated)
            advice = re.compile(r"(\. Use|, or use) engine='vmap'$")
            reason = f"the ghost engine could not: {advice.sub('', str(unsupported))}"
            try:
                return private_step(**{**call, "engine": "vmap", "compile": False})
            except Exception as e:
                diagnose.add_note(e, f"dplis: engine='auto' ran the vmap engine because {reason}")
                if not isinstance(e, RuntimeError):  # a bad argument, a non-finite loss
                    raise
                refused = e
            warnings.warn(f"engine='auto' runs the loop engine for this model (one example at a "
                          f"time, slower): {reason}; and torch.vmap could not: "
                          f"{str(refused).splitlines()[0]}. Pass engine='loop' to choose it",
                          stacklevel=2)
            try:
                return private_step(**{**call, "engine": "loop", "compile": False})
            except Exception as e:
                diagnose.add_note(e, f"dplis: engine='auto' ran the loop engine because {reason}, "
                                     f"and torch.vmap could not: {refused}")
                raise
    first = next(iter(params.values()))
    device, dtype = first.device, first.dtype
    forward = forward_context(checks.choice("precision", precision, PRECISIONS), device)
    kernels.resolve_backend(backend, device)  # reject a bad backend name early
    shapes = [p.shape for p in params.values()]
    sizes = [s.numel() for s in shapes]
    if offset is not None and offset.shape != (sum(sizes),):
        raise ValueError(f"offset must be flat [{sum(sizes)}], got {tuple(offset.shape)}")
    floats = [t for t in inputs if t.is_floating_point()]
    devices = {t.device for t in floats}
    if devices - {device}:
        raise ValueError(f"inputs are on {devices} but the trainable parameters on {device}")
    dtypes = {t.dtype for t in floats} - {dtype}
    if dtypes:
        raise TypeError(f"floating inputs are {sorted(map(str, dtypes))} but the trainable "
                        f"parameters are {dtype}: cast the batch to {dtype}")

    if engine == "vmap" and chunk > 1 and any(isinstance(m, nn.PReLU) for m in model.modules()):
        if perturbation_chunk_size is not None:
            warnings.warn(f"perturbation_chunk_size={perturbation_chunk_size} is taken as 1: "
                          "the model holds an nn.PReLU, whose input gradients torch.vmap gets "
                          "wrong when several perturbations are batched", stacklevel=2)
        chunk = 1  # torch's nested vmap through prelu: wrong input gradients (3.6e-3 at K=B=3)
    plain = k == 1 and std == 0 and offset is None  # gradients at θ itself
    direct = plain and engine == "ghost"  # the model runs at its own parameters: no flat θ
    theta, frozen = None, {}
    if not direct:
        theta = torch.cat([p.detach().reshape(-1) for p in params.values()])
        if offset is not None:
            theta = theta + offset.to(theta)
    if engine in PER_EXAMPLE_ENGINES:
        frozen = {n: t.detach() for n, t in (*model.named_parameters(), *model.named_buffers())
                  if n not in params}

    def unflatten(flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: v.view(s) for n, v, s in zip(params, torch.split(flat, sizes), shapes)}

    def vmap_grads(x: tuple, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[1 or K, b, D] per-example gradients (K-averaged when chunked) and [K, b] losses."""
        parts = [_per_example_grads(model, loss_fn, list(params), shapes, thetas[i:i + chunk],
                                    frozen, x, y, forward, compile, engine == "loop")
                 for i in range(0, k, chunk)]
        losses = torch.cat([p[1] for p in parts])
        if len(parts) == 1:
            return parts[0][0], losses
        # K-average chunk by chunk so at most `chunk` perturbations are ever stored
        return (sum(p[0].sum(0) for p in parts) / k).unsqueeze(0), losses

    def clipped(x: tuple, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Σ_b clip_C(mean_k g_kb) flat fp32 [D], norms [b], losses [K, b] for one chunk."""
        if engine == "ghost":
            points = [None] if direct else [unflatten(t) for t in thetas]
            engine_module = ghost_low_memory if low_memory else ghost
            return engine_module.clipped_sum(model, loss_fn, params, points, x, y,
                                             max_grad_norm, forward, verify, backend, plan)
        grads, losses = vmap_grads(x, y)
        refuse_non_finite_losses(losses)  # the cause, before the norms it makes NaN
        (total,), norms = kernels.fused_dp_step([grads.float()], max_grad_norm=max_grad_norm,
                                                noise_std=0.0, divisor=1.0, batch_dims=2,
                                                backend=backend)
        return total, norms, losses

    noise_std = 0.0 if secure_rng else sigma * max_grad_norm
    fork_devices = [device] if device.type == "cuda" else []
    with state_kept(model, verify), restore_on_error(generator, fork_devices), \
            ghost.attention_fastpath_off():
        drawn, perturb_seed, dropout_seed = draw_seeds(generator, 3)
        noise_seed = drawn if noise_seed is None else noise_seed
        thetas = None if direct else theta.unsqueeze(0).expand(k, -1)
        if std > 0:
            thetas = kernels.perturb([theta], std=std, num_perturbations=k, seed=perturb_seed,
                                     backend=backend)[0]
        with torch.random.fork_rng(devices=fork_devices, enabled=generator is not None):
            if generator is not None:  # dropout masks from the generator's stream
                # one seed per (step, stream): consecutive, so the ranks of a step differ
                # also in the low 32 bits, all that CPU's mt19937 reads
                dropout_seed += stream
                torch.random.default_generator.manual_seed(dropout_seed)
                if fork_devices:
                    torch.cuda.manual_seed(dropout_seed)
            if engine in PER_EXAMPLE_ENGINES and 0 < batch <= physical:
                # the common case: one fused kernel pass clips, sums, noises and scales
                flat, losses = vmap_grads(inputs, targets)
                refuse_non_finite_losses(losses)
                (out,), norms = kernels.fused_dp_step(
                    [flat], max_grad_norm=max_grad_norm, noise_std=noise_std, divisor=divisor,
                    seed=noise_seed, backend=backend, batch_dims=2)
            else:
                total = None
                norms, losses = [torch.zeros(0, device=device)], []
                for i in range(0, batch, physical):
                    try:  # (every engine's ``clipped`` checks its losses, then norms)
                        part, n, lo = clipped(tuple(t[i:i + physical] for t in inputs),
                                              targets[i:i + physical])
                    except NonFiniteError as e:
                        if physical < batch:
                            diagnose.add_note(e, f"dplis: in the physical batch of examples "
                                                 f"{i} to {min(i + physical, batch) - 1} of "
                                                 f"the {batch} (max_physical_batch_size="
                                                 f"{physical}): add {i} to the indices above "
                                                 "for their place in the whole batch")
                        raise
                    total = part if total is None else total.add_(part)
                    norms, losses = norms + [n], losses + [lo]
                if total is None:  # an empty batch: the noise alone
                    total = torch.zeros(sum(sizes), device=device)
                norms = torch.cat(norms)
                losses = torch.cat(losses, 1) if losses else torch.full((1, 1), float("nan"))
                (out,) = kernels.add_noise([total], noise_std=noise_std, divisor=divisor,
                                           seed=noise_seed, backend=backend)
                out = out.to(dtype)
        if secure_rng and sigma > 0:
            noise = secure_gaussian(out.numel(), sigma * max_grad_norm / divisor, out.device)
            out = out + noise.to(out.dtype)
    if batch and not bool(norms.any()):
        warnings.warn(f"every example's gradient is zero ({engine} engine), so this step's "
                      "gradient is the noise alone: does the loss reach the trainable "
                      "parameters (not under torch.no_grad, not detached, every layer "
                      "called)?", RuntimeWarning, stacklevel=2)
    return PrivateStep(grads=unflatten(out), loss=float(losses.mean()), norms=norms,
                       engine=engine)


def private_grad(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor | tuple,
    targets: torch.Tensor,
    *,
    max_grad_norm: float,
    noise_multiplier: float,
    smoothing_std: float = 0.0,
    num_perturbations: int = 1,
    expected_batch_size: float | None = None,
    generator: torch.Generator | None = None,
    **options,
) -> dict[str, torch.Tensor]:
    """Private (DPlis-smoothed) gradient of the mean loss: name -> tensor over trainable params.

    ``loss_fn(output, target)`` is called as on a batch of one example; ``inputs`` is a tensor or
    a tuple of tensors passed to the model positionally, each [B, ...]; ``targets`` is [B, ...].
    Result = (Σ_i clip_C((1/K) Σ_k ∇ℓ(θ + u_k; x_i)) + N(0, (σC)² I)) / expected_batch_size with
    u_k ~ N(0, smoothing_std² I) shared by the batch; ``expected_batch_size`` defaults to B
    (fixed-size batches; under Poisson sampling pass q·N: the realised B is not private).
    ``generator`` makes noise, perturbations and dropout masks reproducible. On error (bad
    argument, NaN/inf loss or gradient) nothing changes, the generator included.
    ``options`` (see ``private_step``): ``engine`` ("auto" | "vmap" | "ghost" | "loop"),
    ``max_physical_batch_size``, ``perturbation_chunk_size`` (vmap: how many of the K batched
    perturbed passes are stored at once), ``backend``, ``offset``, ``secure_rng``,
    ``precision``, ``compile`` (vmap engine: ``torch.compile``, see ``dplis.compiled``),
    ``dropout_stream``, ``noise_seed``, ``low_memory`` (ghost engine, K = 1: the clipped sum
    from a second backward, no output gradient held; see ``ghost_low_memory``).
    """
    return private_step(
        model, loss_fn, inputs, targets, max_grad_norm=max_grad_norm,
        noise_multiplier=noise_multiplier, smoothing_std=smoothing_std,
        num_perturbations=num_perturbations, expected_batch_size=expected_batch_size,
        generator=generator, **options,
    ).grads
