"""Benchmark cases shared by ``python -m bench`` and the pytest-benchmark suite.

A case is (model, mode, batch size): ``make_step`` builds the model from a fixed seed, a fixed
synthetic batch and the optimizer, and returns a closure that runs ONE full training step on that
batch (forward, backward, clip + noise for the private modes, ``optimizer.step()``). Only that
closure is timed: no data loading, no Poisson sampling.

Every mode uses the same batch, the same SGD learning rate, the same clipping bound C and the
same noise multiplier σ (``Settings``). Opacus is imported lazily, only by the ``opacus_*`` modes:
it is a benchmark-only dependency (``pip install dplis[bench]``) and the library never imports it.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

import dplis
from dplis.models import TinyTransformer, lm_loss, mlp, paper_cnn

MODES = (
    "nonprivate",
    "dplis_k1",
    "dplis_k4",
    "dplis_k8",
    "dplis_k1_secure",
    "dplis_k1_lowmem",
    "dplis_k1_compiled",
    "dplis_k4_compiled",
    "opacus_hooks",
    "opacus_functorch",
    "opacus_ew",
    "opacus_ghost",
)
DPLIS_MODES = {"dplis_k1": 1, "dplis_k4": 4, "dplis_k8": 8, "dplis_k1_secure": 1,
               "dplis_k1_lowmem": 1, "dplis_k1_compiled": 1, "dplis_k4_compiled": 4}
SECURE_MODES = ("dplis_k1_secure",)  # noise from os.urandom (secure_rng=True): its cost
# the ghost engine with low_memory=True (norms in the backward, the clipped sum from a second)
LOW_MEMORY_MODES = ("dplis_k1_lowmem",)
# the vmap engine with compile=True (torch.compile), whatever Settings.dplis_engine says
COMPILED_MODES = ("dplis_k1_compiled", "dplis_k4_compiled")
OPACUS_MODES = {
    "opacus_hooks": "hooks",
    "opacus_functorch": "functorch",
    "opacus_ew": "ew",
    "opacus_ghost": "ghost",
}
DATASET_SIZE = 60_000  # only sets the sample rate q = B / N the trainer records; no data is read


@dataclass(frozen=True)
class Settings:
    """What every private mode shares: clipping bound C, noise multiplier σ, SGD lr, seed.

    ``smoothing_std`` is the DPlis perturbation std s used by the K > 1 modes (K = 1 is plain
    DP-SGD, s = 0). ``dplis_engine`` ("auto" | "vmap" | "ghost") is passed to dplis as
    ``engine=`` when set (the ``*_compiled`` modes always run ``engine="vmap", compile=True``).
    """

    max_grad_norm: float = 1.0
    noise_multiplier: float = 1.0
    lr: float = 0.05
    smoothing_std: float = 1e-3
    seed: int = 0
    dplis_engine: str | None = None  # None: the library default ("auto")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelCase:
    """A model built in code plus a synthetic batch of the shape it trains on."""

    name: str
    description: str
    build: Callable[[], nn.Module]
    make_batch: Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    sequence: bool = False  # logits [B, T, V] and targets [B, T] (per-sequence privacy unit)


def _classification_batch(shape: tuple[int, ...], num_classes: int = 10):
    def make(batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(batch_size, *shape, generator=gen)
        y = torch.randint(0, num_classes, (batch_size,), generator=gen)
        return x, y

    return make


VOCAB, SEQ_LEN = 256, 32


def _token_batch(vocab: int, seq_len: int):
    def make(batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        data = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=gen)
        return data[:, :-1].contiguous(), data[:, 1:].contiguous()  # next-token prediction

    return make


MODELS: dict[str, ModelCase] = {
    case.name: case
    for case in (
        ModelCase(
            "mlp",
            "MLP 40-256-256-10 (ReLU) on MNIST-1D-shaped input [B, 40]",
            lambda: mlp(40, (256, 256), 10),
            _classification_batch((40,)),
            F.cross_entropy,
        ),
        ModelCase(
            "cnn",
            "paper CNN: conv 16@8x8/2, conv 32@4x4/2, FC 32, FC 10 (tanh) on [B, 1, 28, 28]",
            lambda: paper_cnn(1, 10, 28),
            _classification_batch((1, 28, 28)),
            F.cross_entropy,
        ),
        ModelCase(
            "transformer",
            f"GPT-style causal LM: vocab {VOCAB}, T={SEQ_LEN}, dim 64, 4 heads, 2 pre-LN blocks, "
            "head tied to the embedding",
            lambda: TinyTransformer(VOCAB, SEQ_LEN, dim=64, heads=4, layers=2, causal=True,
                                    tied=True),
            _token_batch(VOCAB, SEQ_LEN),
            lm_loss,
            sequence=True,
        ),
        ModelCase(
            "transformer_t128",
            "GPT-style causal LM: vocab 512, T=128, dim 128, 4 heads, 4 pre-LN blocks, head "
            "tied to the embedding (0.88 M parameters; not run by default)",
            lambda: TinyTransformer(512, 128, dim=128, heads=4, layers=4, causal=True,
                                    tied=True),
            _token_batch(512, 128),
            lm_loss,
            sequence=True,
        ),
    )
}
MODEL_NAMES = tuple(MODELS)  # every model; "--models all"
DEFAULT_MODELS = ("mlp", "cnn", "transformer")  # what a run without --models measures


def get_case(name: str) -> ModelCase:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None


def build_model(name: str, device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
    """The model ``name`` with weights drawn from ``seed`` (identical for every mode)."""
    torch.manual_seed(seed)
    return get_case(name).build().to(device)


def make_batch(name: str, batch_size: int, device: str | torch.device = "cpu",
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed synthetic batch for ``name`` (identical for every mode)."""
    gen = torch.Generator().manual_seed(seed + 1)
    x, y = get_case(name).make_batch(batch_size, gen)
    return x.to(device), y.to(device)


# --------------------------------------------------------------------------------------------
# Opacus (lazy import: benchmark-only dependency)


def import_opacus():
    try:
        import opacus
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "opacus is not installed: the opacus_* modes need `pip install dplis[bench]` "
            "(opacus==1.6.0)"
        ) from e
    return opacus


def make_opacus(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                grad_sample_mode: str, *, max_grad_norm: float, noise_multiplier: float,
                lr: float, seed: int = 0):
    """Wrap ``model`` with Opacus ``PrivacyEngine.make_private`` for ``grad_sample_mode``.

    The data loader handed to Opacus holds exactly the batch (``poisson_sampling=False``), so
    Opacus' expected batch size is B, as for dplis; the step itself runs on the fixed batch.
    Returns ``(module, dp_optimizer, loss_of)``; ``loss_of(output)`` is the loss to call
    ``.backward()`` on (for ``ghost``, the wrapped criterion doing the two backward passes).
    """
    opacus = import_opacus()
    from torch.utils.data import DataLoader, TensorDataset

    case = get_case(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    engine = opacus.PrivacyEngine(accountant="rdp")
    noise_gen = torch.Generator(device=x.device).manual_seed(seed + 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure-RNG / sampling notices, not errors
        wrapped = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            poisson_sampling=False, grad_sample_mode=grad_sample_mode,
            criterion=nn.CrossEntropyLoss(), noise_generator=noise_gen,
        )
    if grad_sample_mode == "ghost":
        module, dp_optimizer, criterion, _ = wrapped

        def loss_of(out: torch.Tensor):
            if case.sequence:  # per-sequence privacy unit: Opacus needs the [B, T, V] shape
                return criterion(out.flatten(0, 1), y.flatten(), shape=out.shape)
            return criterion(out, y)
    else:
        module, dp_optimizer, _ = wrapped

        def loss_of(out: torch.Tensor):
            return case.loss_fn(out, y)

    return module, dp_optimizer, loss_of


# --------------------------------------------------------------------------------------------
# Steps


def dplis_options(settings: Settings) -> dict:
    """Keyword arguments selecting the dplis engine (none: the library default)."""
    return {} if settings.dplis_engine is None else {"engine": settings.dplis_engine}


def dplis_engine_used(name: str, settings: Settings | None = None) -> str:
    """The engine ``dplis.PrivateTrainer`` resolves for model ``name`` ("vmap" | "ghost" ...)."""
    s = settings or Settings()
    model = build_model(name, "cpu", s.seed)
    trainer = dplis.PrivateTrainer(
        model, torch.optim.SGD(model.parameters(), lr=s.lr), get_case(name).loss_fn,
        sample_rate=0.5, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=1,
        seed=0, **dplis_options(s))
    return str(getattr(trainer, "engine", "vmap"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(name: str, mode: str, batch_size: int, *, device: str | torch.device = "cpu",
              settings: Settings | None = None) -> Callable[[], None]:
    """A closure running one training step of ``mode`` on ``name`` (fixed batch, fixed seed).

    The closure waits for the device to finish (CUDA), so wall-clock time around it is the
    step time. A ``*_compiled`` mode takes its first step (the compilation) here; the other
    dplis modes take theirs in the measured warm-up, so their peaks include the trainer's
    one-off batch-gradient check (one more backward). Builder
    errors (e.g. an Opacus mode that does not support the model) propagate.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    s = settings or Settings()
    device = torch.device(device)
    case = get_case(name)
    model = build_model(name, device, s.seed)
    x, y = make_batch(name, batch_size, device, s.seed)

    if mode == "nonprivate":
        optimizer = torch.optim.SGD(model.parameters(), lr=s.lr)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            case.loss_fn(model(x), y).backward()
            optimizer.step()
            _sync(device)

    elif mode in DPLIS_MODES:
        k, secure = DPLIS_MODES[mode], mode in SECURE_MODES
        options = ({"engine": "vmap", "compile": True} if mode in COMPILED_MODES
                   else {"engine": "ghost", "low_memory": True} if mode in LOW_MEMORY_MODES
                   else dplis_options(s))
        trainer = dplis.PrivateTrainer(
            model, torch.optim.SGD(model.parameters(), lr=s.lr), case.loss_fn,
            sample_rate=min(1.0, batch_size / DATASET_SIZE), max_grad_norm=s.max_grad_norm,
            noise_multiplier=s.noise_multiplier, num_perturbations=k,
            smoothing_std=s.smoothing_std if k > 1 else 0.0,
            expected_batch_size=batch_size, seed=None if secure else s.seed,
            secure_rng=secure, **options,
        )

        def step() -> None:
            trainer.step(x, y)
            _sync(device)

        if mode in COMPILED_MODES:
            step()  # compiles: a one-off cost kept out of the timed steps and the memory peak

    else:
        module, dp_optimizer, loss_of = make_opacus(
            name, model, x, y, OPACUS_MODES[mode], max_grad_norm=s.max_grad_norm,
            noise_multiplier=s.noise_multiplier, lr=s.lr, seed=s.seed)

        def step() -> None:
            dp_optimizer.zero_grad(set_to_none=True)
            loss_of(module(x)).backward()
            dp_optimizer.step()
            _sync(device)

    return step


def fresh_copy(model: nn.Module) -> nn.Module:
    """A deep copy (tied weights stay tied): several wrappers start from the same weights."""
    return copy.deepcopy(model)
