"""PrivateTrainer: a thin stateful layer over ``private_step``, the accountant and the sampler.

One ``step`` = private gradient -> accountant records it -> ``p.grad`` -> ``optimizer.step()``.
Everything that can fail before the noisy gradient exists runs before the first state change,
so such a failing step changes nothing (model, optimizer, accountant, RNG) and spends no
privacy. Once the noisy gradient exists it is released: the step counts even if
``optimizer.step()`` then raises, so no later step reuses its noise.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import secrets
import warnings
import weakref
from collections.abc import Callable

import torch
from torch import nn

from . import __version__, checks, distributed, kernels
from .accounting import ACCOUNTANTS, Accountant, compute_epsilon, find_noise_multiplier
from .ghost import GhostUnsupported
from .model_state import replayable
from .private_grad import (
    PRECISIONS,
    compile_applies,
    private_step,
    resolve_engine,
    step_noise_seed,
    trainable,
)
from .sampling import poisson_batches, steps_per_epoch
from .validation import validate

PRIVACY_KEYS = ("sample_rate", "max_grad_norm", "noise_multiplier", "num_perturbations",
                "smoothing_std", "smoothing_radius", "smoothing_schedule", "sat_rho",
                "expected_batch_size", "accountant", "secure_rng", "precision")
SCHEDULES = ("constant", "lr", "linear")


UNSUPPORTED_OPTIMIZERS = (torch.optim.LBFGS, torch.optim.SparseAdam)


class BudgetExceededError(RuntimeError):
    """The next step would push ε past ``target_epsilon``."""


class PrivateTrainer:
    """DP-SGD / DPlis training of ``model`` with any ``torch.optim`` optimizer.

    Give ``noise_multiplier`` σ, or ``target_epsilon`` + ``target_delta`` + ``epochs`` or
    ``steps`` to calibrate σ (then at most that many steps are taken: ``max_steps``); an
    epoch is one pass of ``data_loader``, round(1/q) steps (``steps_per_epoch``).
    Smoothing: ``smoothing_std`` s, or ``smoothing_radius`` r meaning s = r·lr·σ·C / E|B|
    (the DPlis authors' unit: r times the std of one step's noise on the weights, at the
    initial learning rate). ``smoothing_schedule``: "constant", "lr" (s follows the current
    learning rate: s·lr_t/lr_0) or "linear" (s decays linearly to 0 over ``steps``/``epochs``).
    ``engine``: "auto" (ghost, or vmap where the first step finds that ghost cannot handle
    the model, or loop where torch.vmap cannot either; ``engine`` then says which ran),
    "ghost", "vmap" or "loop" (the vmap engine's gradients one example at a time, for a model
    torch.vmap cannot run);
    ``max_physical_batch_size`` bounds memory: the Poisson batch is processed in chunks and
    the noise added once per logical step (Opacus's virtual steps). ``compile=True`` (vmap
    engine) runs the per-example gradients through ``torch.compile`` (``dplis.compiled``).
    ``low_memory=True`` (ghost engine, K = 1; ``dplis.ghost_low_memory``): the clipped sum
    from a second backward, so the step's peak memory stays near the non-private step's.
    ``precision="bf16"``: forward and backward under bf16 autocast; per-example norms,
    clipping and noise stay in fp32. Under torch.distributed (``torchrun``) see
    ``dplis.distributed``: the privacy accounting is that of the single-process run.
    ``secure_rng=True`` draws the noise from os.urandom (see ``secure_noise``; no seed allowed);
    otherwise ``seed`` (an int in [0, 2**63); None: a random one) seeds everything, and step
    t's noise comes from seed ``step_noise_seed(seed, t)``: consecutive seeds, so no two
    steps of a run share noise (on CPU too, where mt19937 reads 32 bits of a seed).
    ``sat_rho`` ρ > 0 adds DP-SAT (Park et al. 2023): gradients are taken at
    θ + ρ·g_prev/‖g_prev‖, g_prev the previous (already private) gradient; no privacy cost.
    The expected batch size E|B| = q·N comes from ``dataset_size`` (or ``expected_batch_size``),
    or from the dataset given to ``data_loader``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        sample_rate: float,
        max_grad_norm: float,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        target_delta: float | None = None,
        epochs: float | None = None,
        steps: int | None = None,
        smoothing_std: float = 0.0,
        smoothing_radius: float | None = None,
        smoothing_schedule: str = "constant",
        sat_rho: float = 0.0,
        num_perturbations: int = 1,
        accountant: str = "prv",
        seed: int | None = None,
        dataset_size: int | None = None,
        expected_batch_size: float | None = None,
        engine: str = "auto",
        max_physical_batch_size: int | None = None,
        perturbation_chunk_size: int | None = None,
        backend: str | None = None,
        secure_rng: bool = False,
        precision: str = "fp32",
        compile: bool = False,
        low_memory: bool = False,
    ):
        validate(model)
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
        if isinstance(optimizer, UNSUPPORTED_OPTIMIZERS):
            raise TypeError(f"{type(optimizer).__name__} is not supported: a private step "
                            "gives one dense gradient per step (LBFGS re-evaluates the loss "
                            "through a closure; SparseAdam needs sparse gradients)")
        self.params = self._trainable()
        self.structure = _structure(model)  # the modules the checks saw
        self.sample_rate = checks.rate("sample_rate", sample_rate)
        self.max_grad_norm = checks.positive("max_grad_norm", max_grad_norm)
        self.smoothing_std = checks.non_negative("smoothing_std", smoothing_std)
        if smoothing_radius is not None:
            if smoothing_std:
                raise ValueError("give smoothing_std or smoothing_radius, not both")
            smoothing_radius = checks.non_negative("smoothing_radius", smoothing_radius)
        self.smoothing_radius = smoothing_radius
        self.smoothing_schedule = checks.choice("smoothing_schedule", smoothing_schedule,
                                                SCHEDULES)
        self.sat_rho = checks.non_negative("sat_rho", sat_rho)
        self.prev_grad: torch.Tensor | None = None  # DP-SAT's g_prev, flat [D]
        self.prev_grad_names: tuple[str, ...] = ()  # the trainable parameters it spans
        self.initial_lr = float(optimizer.param_groups[0]["lr"])
        checks.choice("accountant", accountant, ACCOUNTANTS)
        self.target_delta = None if target_delta is None else checks.delta(target_delta)
        self.num_perturbations = checks.integer("num_perturbations", num_perturbations, 1)
        self.low_memory = checks.flag("low_memory", low_memory)
        self.precision = checks.choice("precision", precision, PRECISIONS)
        self.engine = resolve_engine(engine, model, self.params, None, self.low_memory,
                                     self.num_perturbations, compile, precision)
        self.compile = compile_applies(compile, engine, self.engine)
        # "auto" on ghost: the first step may find that ghost cannot handle the model and run
        # the vmap engine (GhostUnsupported); its engine is then kept for the later steps
        self._engine_arg = "auto" if engine == "auto" and self.engine == "ghost" else self.engine
        self._engine_initial = self._engine_arg  # again when the trainable set changes
        self._verified = False  # the ghost engine's checks: first step of 2+ examples
        # refused here rather than at the first step (which would change nothing either)
        self.max_physical_batch_size = None if max_physical_batch_size is None else \
            checks.integer("max_physical_batch_size", max_physical_batch_size, 1)
        self.perturbation_chunk_size = None if perturbation_chunk_size is None else \
            checks.integer("perturbation_chunk_size", perturbation_chunk_size, 1)
        device = next(iter(self.params.values())).device
        kernels.resolve_backend(backend, device)
        self.backend = backend
        self.rank, self.world_size = distributed.world()
        self.dataset_size = None
        self.expected_batch_size = None
        if dataset_size is not None and expected_batch_size is not None:
            raise ValueError("give dataset_size or expected_batch_size, not both")
        if dataset_size is not None:
            self._set_dataset_size(dataset_size)
        elif expected_batch_size is not None:
            self.expected_batch_size = checks.positive("expected_batch_size", expected_batch_size)
        self.target_epsilon, self.planned_steps = None, None
        self.noise_multiplier = self._noise(noise_multiplier, target_epsilon, epochs, steps,
                                            accountant)
        # the budget guard: with target_epsilon, no step beyond the calibrated length
        self.max_steps = self.planned_steps if self.target_epsilon is not None else None
        if smoothing_schedule == "linear" and self.planned_steps is None:
            raise ValueError('smoothing_schedule="linear" needs steps or epochs (the decay length)')
        self.accountant = Accountant(accountant)
        self.secure_rng = checks.flag("secure_rng", secure_rng)
        if secure_rng and seed is not None:
            raise ValueError("secure_rng=True takes no seed: its noise must not be replayable")
        given = seed is not None
        seed = (checks.integer("seed", seed, 0, 2**63 - 1) if given
                else int.from_bytes(os.urandom(7), "little"))
        if self.world_size > 1:  # the ranks draw the same perturbations: one seed for all
            rows = distributed.all_gather(torch.tensor([seed, int(given)]), device)
            seeds, givens = [int(r[0]) for r in rows], [bool(r[1]) for r in rows]
            if any(givens) and (not all(givens) or len(set(seeds)) > 1):
                shown = [s if g else None for s, g in zip(seeds, givens)]
                raise ValueError(f"the ranks were given different seeds {shown}: give every "
                                 "rank the same seed (or None: rank 0 draws one for all)")
            seed = seeds[0]
        self.seed = seed
        self.generator = torch.Generator(device=device).manual_seed(self.seed)
        self.sampler_generator = torch.Generator().manual_seed(self.seed + 1 + self.rank)

    def _noise(self, sigma, target_epsilon, epochs, steps, accountant) -> float:
        if (sigma is None) == (target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier or target_epsilon")
        if epochs is not None and steps is not None:
            raise ValueError("give epochs or steps, not both")
        if steps is not None:
            self.planned_steps = checks.integer("steps", steps, 1)
        elif epochs is not None:  # an epoch: one pass of ``data_loader``
            self.planned_steps = max(1, math.ceil(checks.positive("epochs", epochs)
                                                  * steps_per_epoch(self.sample_rate)))
        if sigma is not None:
            return checks.non_negative("noise_multiplier", sigma)
        self.target_epsilon = checks.positive("target_epsilon", target_epsilon)
        if self.target_delta is None or self.planned_steps is None:
            raise ValueError("target_epsilon needs target_delta and epochs or steps to calibrate σ")
        return find_noise_multiplier(self.target_epsilon, self.target_delta, self.sample_rate,
                                     self.planned_steps, accountant)

    def _check_dataset_size(self, n: int) -> int:
        n = checks.integer("dataset_size", n, 1)
        if self.dataset_size not in (None, n):
            raise ValueError(f"dataset_size is {self.dataset_size}, got a dataset of {n}")
        if self.dataset_size is None and self.expected_batch_size is not None \
                and not math.isclose(self.expected_batch_size, self.sample_rate * n):
            raise ValueError(f"expected_batch_size={self.expected_batch_size} was given, but "
                             f"a dataset of {n} gives q·N = {self.sample_rate} × {n} = "
                             f"{self.sample_rate * n:g}: pass dataset_size= instead")
        if self.sample_rate * n < 1:
            raise ValueError(f"sample_rate × dataset size = {self.sample_rate} × {n} < 1: batches "
                             "would be almost always empty; raise sample_rate")
        return n

    def _set_dataset_size(self, n: int) -> None:
        self.dataset_size = self._check_dataset_size(n)
        self.expected_batch_size = self.sample_rate * self.dataset_size

    def _trainable(self) -> dict[str, nn.Parameter]:
        """The model's trainable parameters now; each must be in the optimizer (else its
        gradient would count toward the clipping norm but never be applied)."""
        params = trainable(self.model)
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [n for n, p in params.items() if id(p) not in held]
        if missing:
            raise ValueError(f"trainable parameters {missing} are not in the optimizer: add "
                             "them to it or set requires_grad=False")
        return params

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def current_smoothing_std(self) -> float:
        """s for the next step: the base std (or radius at the initial lr) times the schedule."""
        base = self.smoothing_std
        if self.smoothing_radius is not None:
            base = (self.smoothing_radius * self.initial_lr * self.noise_multiplier
                    * self.max_grad_norm / self._divisor())
        if self.smoothing_schedule == "lr":
            return base * self.lr / self.initial_lr
        if self.smoothing_schedule == "linear":
            return base * max(0.0, 1 - self.accountant.steps / self.planned_steps)
        return base

    def sat_offset(self) -> torch.Tensor | None:
        """DP-SAT's ascent ρ·g_prev/‖g_prev‖ (None on the first step, with ρ = 0, or once the
        trainable parameters are no longer those g_prev spans: the ascent then restarts)."""
        if not self.sat_rho or self.prev_grad is None \
                or self.prev_grad_names != tuple(trainable(self.model)):
            return None
        norm = float(self.prev_grad.norm())
        return None if norm == 0 else self.prev_grad * (self.sat_rho / norm)

    def _divisor(self) -> float:
        if self.expected_batch_size is None:
            raise ValueError("the expected batch size is unknown: pass dataset_size= or "
                             "expected_batch_size= to PrivateTrainer, or call data_loader first")
        return self.expected_batch_size

    def data_loader(self, dataset, *, steps: int | None = None):
        """Poisson-sampled batches of ``dataset`` (each example kept with prob. q; may be empty).

        One pass = ``steps`` batches, by default round(1/q) (one expected epoch), ending early
        where the planned steps of a ``target_epsilon`` run end (``max_steps``), so a loop over
        ``epochs`` passes never hits the budget. Under torch.distributed each rank samples its
        own shard; the union is the logical batch (every rank passes the whole dataset: sizes
        that differ between ranks, or fewer examples than ranks, are refused on every rank).
        Raises BudgetExceededError when no step is left, and ValueError if ``dataset``
        contradicts ``dataset_size`` or an explicit ``expected_batch_size`` (q · len(dataset)).
        """
        n = len(dataset)
        if self.world_size > 1:  # first: a check failing on one rank alone would leave the
            # others waiting in the step's collective
            sizes = [int(t) for t in distributed.all_gather(torch.tensor([n]),
                                                             self.generator.device)]
            if len(set(sizes)) > 1:
                raise ValueError(f"the ranks passed datasets of {sizes} examples: every rank "
                                 "passes the whole dataset (each samples its own shard of it)")
            if n < self.world_size:
                raise ValueError(f"a dataset of {n} examples cannot be shared by "
                                 f"{self.world_size} ranks: each samples its own shard, so "
                                 "give at least one example per rank")
        n = self._check_dataset_size(n)
        if steps is None:
            steps = steps_per_epoch(self.sample_rate)
            if self.max_steps is not None:
                left = self.max_steps - self.accountant.steps
                if left <= 0:
                    raise BudgetExceededError(f"the {self.max_steps} planned steps are taken")
                steps = min(steps, left)
        self._set_dataset_size(n)
        return poisson_batches(distributed.shard(dataset, self.rank, self.world_size),
                               self.sample_rate, generator=self.sampler_generator, steps=steps)

    def step(self, inputs: torch.Tensor | tuple, targets: torch.Tensor) -> float:
        """One private step on a batch; returns its mean loss (non-private, for logging).

        A failure before the noisy gradient exists (bad input, NaN/inf loss or gradient,
        exhausted budget, a parameter missing from the optimizer) changes nothing. If
        ``optimizer.step()`` raises, the step still counts (accountant, RNG, ``p.grad``):
        its noisy gradient was released, and its noise must not serve another batch.
        The trainable parameters are read at every step: freezing a layer mid-run is fine,
        and a new trainable set, or a module swapped in, is checked again (engine choice,
        the ghost engine's checks); one unfrozen must be in the optimizer. Every optimizer
        parameter outside the set gets ``grad = None``, so no non-private gradient left from
        elsewhere is ever applied.
        """
        if self.max_steps is not None and self.accountant.steps >= self.max_steps:
            raise BudgetExceededError(
                f"{self.max_steps} steps taken: one more would exceed target_epsilon="
                f"{self.target_epsilon} at delta={self.target_delta}")
        state = self.generator.get_state()
        # under torch.distributed a rank whose part succeeded undoes it when another failed
        undo = replayable(self.model) if self.world_size > 1 else None
        try:
            params, structure = self._trainable(), _structure(self.model)
            # a new trainable set or a module swapped: the engine is chosen and checked again
            same = params.keys() == self.params.keys() and _same_structure(structure,
                                                                            self.structure)
            engine, verify = ((self._engine_arg, not self._verified) if same
                              else (self._engine_initial, True))
            try:
                result = self._private_step(inputs, targets, engine, verify)
            except GhostUnsupported:
                if verify:
                    raise
                # a call only a verified step takes (a layer shared by the batch whose input
                # now has the batch's size: Hugging Face's [1, T] positions at T = B)
                result = self._private_step(inputs, targets, self._engine_initial, True)
            error = None
        except Exception as e:  # under torch.distributed every rank must hear of it
            result, error = None, e
        try:
            self._agree(error)
        except Exception:
            self.generator.set_state(state)
            if undo is not None:
                undo()  # the modules' attributes and generators, Python's and numpy's RNGs
            raise
        grads, loss = result.grads, result.loss
        if self.world_size > 1:
            flat = distributed.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads.values()]))
            flat /= self._divisor()
            grads = dict(zip(grads, torch.split(flat, [g.numel() for g in grads.values()])))
            stats = torch.tensor([0.0 if math.isnan(loss) else loss * len(targets),
                                  float(len(targets))], device=flat.device)
            total, count = distributed.all_reduce_sum(stats).tolist()
            loss = total / count if count else float("nan")
        # released: from here the step counts, whatever happens next
        self.accountant.step(self.noise_multiplier, self.sample_rate)
        if len(targets) >= 2:  # the engine decided and the checks ran: kept for later steps
            self.engine = self._engine_arg = result.engine
            self._verified = True
        elif not same:  # a batch of 0 or 1 checks little (no other example to tell it
            # apart from): the next step of two or more examples checks again
            self._engine_arg, self._verified = self._engine_initial, False
        self.params, self.structure = params, structure
        private = {id(p) for p in params.values()}
        for group in self.optimizer.param_groups:  # no other gradient is applied (e.g. a
            for p in group["params"]:  # frozen layer's from an earlier, non-private backward)
                if id(p) not in private:
                    p.grad = None
        for name, p in params.items():
            p.grad = grads[name].view(p.shape)
        if self.sat_rho:
            self.prev_grad = torch.cat([p.grad.reshape(-1) for p in params.values()])
            self.prev_grad_names = tuple(params)
        self.optimizer.step()
        return loss

    def _private_step(self, inputs, targets, engine: str | None = None,
                      verify: bool | None = None):
        """This rank's part: the private gradient, or under torch.distributed the clipped sum
        of its examples (noise on rank 0 only), to be all-reduced and divided by E|B|.
        ``engine`` / ``verify``: by default the trainer's current choice."""
        alone = self.world_size == 1
        return private_step(
            self.model, self.loss_fn, inputs, targets, max_grad_norm=self.max_grad_norm,
            noise_multiplier=self.noise_multiplier if alone or self.rank == 0 else 0.0,
            smoothing_std=self.current_smoothing_std(),
            num_perturbations=self.num_perturbations,
            expected_batch_size=self._divisor() if alone else 1.0,
            generator=self.generator,
            engine=self._engine_arg if engine is None else engine,
            max_physical_batch_size=self.max_physical_batch_size,
            perturbation_chunk_size=self.perturbation_chunk_size, backend=self.backend,
            offset=self.sat_offset(), secure_rng=self.secure_rng, precision=self.precision,
            verify=not self._verified if verify is None else verify, compile=self.compile,
            dropout_stream=self.rank,  # the ranks share perturbations, not dropout masks
            noise_seed=None if self.secure_rng else step_noise_seed(self.seed,
                                                                    self.accountant.steps),
            low_memory=self.low_memory)

    def epsilon(self, delta: float | None = None) -> float:
        """ε spent so far at ``delta`` (default: target_delta)."""
        delta = self.target_delta if delta is None else delta
        if delta is None:
            raise ValueError("epsilon() needs delta (or target_delta set on the trainer)")
        return self.accountant.epsilon(delta)

    def planned_epsilon(self, steps: int, delta: float | None = None) -> float:
        """ε after ``steps`` steps in total with this trainer's σ and q."""
        delta = self.target_delta if delta is None else delta
        if delta is None:
            raise ValueError("planned_epsilon() needs delta (or target_delta set on the trainer)")
        return compute_epsilon(self.noise_multiplier, self.sample_rate, steps, delta,
                               self.accountant.mechanism)

    def privacy_config(self) -> dict:
        return {k: getattr(self, k) if k != "accountant" else self.accountant.mechanism
                for k in PRIVACY_KEYS}

    def _local_state(self) -> dict:
        """``state_dict`` without the other ranks' sampler states (no collective)."""
        return {
            "version": __version__,
            "config": self.privacy_config(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "optimizer_type": _type_name(self.optimizer),
            "accountant": self.accountant.state_dict(),
            "generator": self.generator.get_state(),
            "sampler_generator": self.sampler_generator.get_state(),
            "dataset_size": self.dataset_size,
            "prev_grad": self.prev_grad,
            "prev_grad_names": list(self.prev_grad_names),
            "world_size": self.world_size,
            "seed": self.seed,
        }

    def state_dict(self) -> dict:
        """A snapshot: copies of the model and optimizer states, the accountant history, RNG
        states and the seed, privacy config and version (``load_state_dict`` of it after more
        steps restores the model and optimizer; the privacy state carries on, see ``_apply``).

        Under torch.distributed it is a collective (call it on every rank): it holds every
        rank's sampler state (``sampler_generators``), each rank's own Poisson stream."""
        return copy.deepcopy(self._state())

    def _state(self) -> dict:
        """``state_dict`` sharing the model's and optimizer's tensors (to write a file)."""
        state = self._local_state()
        if self.world_size > 1:
            state["sampler_generators"] = distributed.all_gather(
                self.sampler_generator.get_state(), self.generator.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict``; a different privacy config, number of ranks or dataset
        size is refused, and a load that fails part-way is undone (nothing changes)."""
        self._restore(state, self._checked(state))

    def _checked(self, state: dict) -> torch.Tensor:
        """This rank's sampler state from ``state``, once every check before a change passed."""
        keys = ("config", "model", "optimizer", "accountant", "generator", "sampler_generator")
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"not a PrivateTrainer state: missing {missing}")
        theirs, ours = state["config"], self.privacy_config()
        diff = {k: (theirs.get(k), ours[k]) for k in ours
                if k != "expected_batch_size" and theirs.get(k) != ours[k]}
        if diff:
            raise ValueError(f"checkpoint privacy config differs (checkpoint, trainer): {diff}")
        world = state.get("world_size", 1)
        if world != self.world_size:
            raise ValueError(f"the checkpoint was written by {world} ranks, this run has "
                             f"{self.world_size}: resume with {world} (each rank continues "
                             "its own Poisson stream)")
        if state.get("dataset_size") is not None:
            self._check_dataset_size(state["dataset_size"])
        prev = state.get("prev_grad")
        if prev is not None and not (isinstance(prev, torch.Tensor) and prev.dim() == 1
                                     and prev.is_floating_point()):
            raise ValueError("the checkpoint's prev_grad is not a flat float tensor")
        kind = state.get("optimizer_type")  # (older checkpoints have none)
        if kind is not None and kind != _type_name(self.optimizer):
            raise ValueError(f"the checkpoint's optimizer is a {kind}, this trainer's a "
                             f"{_type_name(self.optimizer)}: resume with the optimizer the run "
                             "was saved with (another one's state would fail in its step, "
                             "after the step was counted)")
        saved = state["generator"]
        if not isinstance(saved, torch.Tensor) or saved.shape != self.generator.get_state().shape:
            raise ValueError(
                f"the checkpoint's noise generator state does not fit this trainer's "
                f"{self.generator.device.type} generator (a state of another device type: CPU "
                "and CUDA generators differ); resume on the device type the run was saved on")
        seed = state.get("seed", 0)  # older checkpoints have none
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"the checkpoint's seed is not an int in [0, 2**63): {seed!r}")
        return state["sampler_generators"][self.rank] if world > 1 else \
            state["sampler_generator"]

    def _restore(self, state: dict, sampler: torch.Tensor) -> None:
        """``_apply`` the checked ``state``; undone if it fails part-way."""
        backup = copy.deepcopy(self._local_state())
        try:
            self._apply(state, sampler)
        except BaseException:
            self._apply(backup, backup["sampler_generator"], undo=True)
            raise
        # the next step of two or more examples chooses the engine and checks the model again
        self._engine_arg, self._verified = self._engine_initial, False

    def _apply(self, state: dict, sampler_state: torch.Tensor, undo: bool = False) -> None:
        """Restore ``state``; ``undo``: the trainer's own state put back after a failed load.

        A state of fewer steps than this trainer has taken (a rollback) restores the model,
        the optimizer and DP-SAT's ascent only: the accountant and the RNGs carry on, so the
        privacy spent is never given back and no random draw (noise, Poisson mask,
        perturbation) is repeated, with a warning."""
        taken = self.accountant.steps
        loaded = Accountant(state["accountant"]["mechanism"])
        loaded.load_state_dict(state["accountant"])
        back = loaded.steps < taken and not undo
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if not back:
            self.accountant.load_state_dict(state["accountant"])
            self.generator.set_state(state["generator"])
            self.sampler_generator.set_state(sampler_state)
        self.prev_grad = state.get("prev_grad")
        names = state.get("prev_grad_names")
        if names is None:  # older checkpoints: ours, if the sizes agree (else the ascent restarts)
            fits = self.prev_grad is not None and self.prev_grad.numel() == sum(
                p.numel() for p in self.params.values())
            names = self.params if fits else ()
        self.prev_grad_names = tuple(names)
        if state.get("dataset_size") is not None:
            self.dataset_size = state["dataset_size"]
            self.expected_batch_size = self.sample_rate * self.dataset_size
        theirs = state.get("seed")  # kept: two runs forked from one file must not share noise
        fork = theirs is not None and theirs != self.seed and not (undo or back)
        if fork:  # its own Poisson masks, perturbations and dropout from here too (the file's
            # generator states would replay the other run's: its batches, released again
            # with other noise, are two releases of one subsample, which the two runs'
            # accountants, composed, would count as independent)
            self.generator.manual_seed(_fork_seed(self.seed, loaded.steps, "generator"))
            self.sampler_generator.manual_seed(
                _fork_seed(self.seed, loaded.steps, f"sampler {self.rank}"))
        if fork and not self.secure_rng:
            warnings.warn(f"the checkpoint was written by a run seeded {theirs}; this trainer "
                          f"keeps its own seed {self.seed}, so its noise and Poisson batches "
                          f"from here differ from that run's (a fork, not an exact resume): "
                          f"build it with "
                          f"seed={theirs} to resume that run bit for bit", stacklevel=4)
        if back:
            warnings.warn(f"load went back from step {taken} to {loaded.steps}: the model and "
                          f"optimizer are step {loaded.steps}'s, but the accountant keeps the "
                          f"{taken} steps taken (privacy spent is not given back) and the RNGs "
                          "carry on (no noise, Poisson mask or perturbation is drawn again)",
                          stacklevel=4)

    def save(self, path: str | os.PathLike, extra: dict | None = None) -> None:
        """Write ``state_dict`` atomically (a temporary file in the same folder, then rename;
        through a symbolic link to its target; a path that is a folder, device or pipe is
        refused). ``extra``: the caller's own record (plain values: what ``torch.load`` with
        ``weights_only=True`` reads), stored as the file's ``"extra"`` and read back by
        ``read_checkpoint(path)["extra"]``; ``load`` ignores it.

        Under torch.distributed call it on every rank (``state_dict`` is a collective): rank 0
        alone writes the file, and every rank returns once it is written (or raises if the
        write failed), so each may ``load`` it at once."""
        state, error = self._state(), None
        if extra is not None:
            state["extra"] = extra
        if self.rank == 0:
            try:
                _write_atomically(state, os.fspath(path))
            except Exception as e:  # under torch.distributed every rank must hear of it
                error = e
        self._agree(error)

    def load(self, path: str | os.PathLike) -> None:
        """Resume from a file written by ``save``; corrupted or truncated files raise ValueError,
        and so does a file saved on another device type (CPU and CUDA noise generators keep
        different states). The next step of two or more examples checks the model again.

        Under torch.distributed call it on every rank: each reads and checks the file, and
        if any rank cannot, every rank raises before any changes its state."""
        state, sampler, error = None, None, None
        try:
            state = read_checkpoint(path)
            sampler = self._checked(state)
        except Exception as e:  # under torch.distributed every rank must hear of it
            error = e
        self._agree(error)
        self._restore(state, sampler)

    def _agree(self, error: BaseException | None) -> None:
        """Raise ``error``; under torch.distributed (a collective) raise on every rank if any
        rank had one."""
        if self.world_size > 1:
            distributed.agree(error, self.generator.device)
        elif error is not None:
            raise error


def _type_name(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _fork_seed(seed: int, step: int, stream: str) -> int:
    """A seed in [0, 2**63) for ``stream`` of a run seeded ``seed`` forked at step ``step``:
    hashed, so forks whose seeds differ only above the low 32 bits (all CPU's mt19937 reads)
    still draw apart."""
    digest = hashlib.blake2b(f"dplis fork {stream} {seed} {step}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") % 2**63


def _structure(model: nn.Module) -> list[tuple[str, weakref.ref]]:
    """Which module object sits at each name, by weak reference (an id could be reused by a
    module swapped in after the old one was freed; a reference would keep the old alive)."""
    return [(name, weakref.ref(module)) for name, module in model.named_modules()]


def _same_structure(a: list[tuple[str, weakref.ref]], b: list[tuple[str, weakref.ref]]) -> bool:
    """The same module objects at the same names: a module swapped in (one without
    parameters too, which the trainable set does not show) makes them differ."""
    return len(a) == len(b) and all(
        n == m and r() is not None and r() is s() for (n, r), (m, s) in zip(a, b))


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The state dict in a file ``PrivateTrainer.save`` wrote (with ``"extra"`` if saved);
    a damaged file, or one of another kind, raises ValueError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):  # the system's message
        raise
    except Exception as e:  # torch.load raises many types for damaged files; its message
        # advises weights_only=False, which no checkpoint of ours needs (nor should anyone)
        raise ValueError(f"checkpoint {path} is truncated, corrupted or not written by "
                         f"PrivateTrainer.save ({type(e).__name__})") from e
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} does not hold a PrivateTrainer state")
    return state


def replaceable(path: str | os.PathLike) -> str:
    """``path`` with symbolic links resolved; ValueError if it exists and is not a regular
    file (a folder, device, pipe or socket), which a file renamed over it would replace."""
    real = os.path.realpath(path)
    if os.path.exists(real) and not os.path.isfile(real):
        raise ValueError(f"{real} exists and is not a regular file (a folder, device, pipe or "
                         "socket): refusing to replace it")
    return real


def _write_atomically(state: dict, path: str) -> None:
    """``torch.save`` to a fresh file beside ``path`` (the umask's permissions), then rename;
    a symbolic link is followed (its target replaced), a path that exists and is not a
    regular file refused (ValueError): renaming over it would replace a folder's entry for
    a device (``/dev/null``), a pipe or a socket with a file."""
    path = replaceable(path)
    tmp = os.path.join(os.path.dirname(path), f".dplis-ckpt-{secrets.token_hex(8)}")
    try:
        with open(tmp, "xb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before it takes the name
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
