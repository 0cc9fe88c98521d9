"""Poisson sampling for DP-SGD.

Each step includes every example independently with probability ``q`` (the sample rate), so a
batch has a random size with mean ``q * N`` and may be empty. The privacy analysis of DP-SGD
(subsampled Gaussian mechanism) assumes exactly this: batches are never resampled, padded or
dropped, and an empty batch is still a step (it releases pure noise).

``PoissonSampler`` yields index batches; ``PoissonLoader`` (built by ``poisson_batches``) turns them
into batches of tensors for a map-style dataset.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset, default_collate

from . import checks

__all__ = ["PoissonSampler", "PoissonLoader", "poisson_batches", "steps_per_epoch"]


def steps_per_epoch(sample_rate: float) -> int:
    """Batches in one expected epoch of Poisson sampling at rate q: max(1, round(1/q))."""
    return max(1, round(1.0 / sample_rate))


class PoissonSampler:
    """Poisson-sampled index batches over ``range(num_examples)``.

    Every batch includes each index independently with probability ``sample_rate``; a batch is
    a 1-D ``torch.int64`` tensor of sorted indices (on the generator's device), possibly empty.
    Empty batches are yielded like any other: dropping them would break the DP guarantee.
    ``sample_rate * num_examples < 1`` is allowed (most batches are then empty).

    Args:
        num_examples: dataset size N >= 1.
        sample_rate: inclusion probability q in (0, 1].
        steps: batches per pass (``len(sampler)``); defaults to ``max(1, round(1 / q))``, one
            expected epoch.
        generator: source of randomness. Default: a new CPU generator seeded from torch's global
            RNG (so ``torch.manual_seed`` makes runs reproducible). ``torch.Generator`` is not a
            cryptographic RNG; DP guarantees formally assume unpredictable sampling.

    ``state_dict()`` records the generator state and how many batches of the current pass were
    already yielded; after ``load_state_dict`` the next pass yields only the remaining batches of
    that pass, identical to the ones the original run produced, and later passes are full again.
    A pass abandoned early (``break``) does not shorten the next one. Concurrent iterators over
    one sampler share its generator.
    """

    def __init__(self, num_examples: int, sample_rate: float, *, steps: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        self.num_examples = checks.integer("num_examples", num_examples, 1)
        self.sample_rate = checks.rate("sample_rate", sample_rate)
        self.steps = (steps_per_epoch(self.sample_rate) if steps is None
                      else checks.integer("steps", steps, 1))
        self._threshold = math.floor(self.sample_rate * 2**53) / 2**53  # exact in float64
        if checks.generator(generator) is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
            generator = torch.Generator().manual_seed(seed)
        self.generator = generator
        self._position = 0  # batches of the current pass already yielded
        self._pass: object | None = None  # the iterator whose pass that is
        self._resume_from = 0  # where the next pass starts (set by load_state_dict)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[torch.Tensor]:
        start, self._resume_from = self._resume_from, 0
        self._pass = token = object()  # the latest pass owns the position
        finished = False
        try:
            for position in range(start, self.steps):
                # float64 uniforms (multiples of 2^-53) below a threshold rounded down to that
                # grid: each example is kept with probability at most q (q - 2^-53 or more);
                # float32 ones (multiples of 2^-24) kept it with up to 9 % more at q = 6e-7
                mask = torch.rand(self.num_examples, generator=self.generator,
                                  dtype=torch.float64,
                                  device=self.generator.device) < self._threshold
                self._position = position + 1
                yield mask.nonzero().squeeze(1)
            finished = True
        finally:
            # abandoned (``break``): the next pass is a full one; an older iterator dropped
            # while a newer pass runs leaves that pass's position alone
            if not finished and self._pass is token:
                self._position = 0

    def state_dict(self) -> dict[str, Any]:
        """Generator state (uint8 tensor), position in the current pass and the sampling args."""
        return {
            "generator_state": self.generator.get_state(),
            "position": self._position % self.steps,
            "num_examples": self.num_examples,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict()``; the sampling args must match this sampler's."""
        for key in ("num_examples", "sample_rate", "steps"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"state_dict was saved with {key}={state[key]!r}, but this sampler has "
                    f"{key}={getattr(self, key)!r}"
                )
        position = checks.integer("state_dict position", state["position"], 0)
        if position >= self.steps:
            raise ValueError(f"state_dict position must be < steps={self.steps}, got {position}")
        self.generator.set_state(state["generator_state"])
        self._position = self._resume_from = position


def _empty_batch(one: Any) -> Any:
    """Turn a collated batch of one item into the matching batch of zero items."""
    if isinstance(one, torch.Tensor):
        return one[:0]
    if isinstance(one, Mapping):
        return {key: _empty_batch(value) for key, value in one.items()}
    if isinstance(one, Sequence) and not isinstance(one, (str, bytes)):
        if all(isinstance(v, (str, bytes)) for v in one):  # default_collate leaves strings as is
            return []
        fields = [_empty_batch(v) for v in one]
        return type(one)(*fields) if hasattr(one, "_fields") else type(one)(fields)
    raise TypeError(f"cannot build an empty batch from a collated {type(one).__name__}")


class PoissonLoader:
    """Poisson-sampled batches of a map-style dataset (``__len__`` + integer ``__getitem__``).

    For a plain ``TensorDataset`` the tensors are indexed directly and each batch is a tuple
    ``(t_1[idx], ..., t_k[idx])`` with shapes ``[B, *t_j.shape[1:]]`` and the tensors' dtypes.
    Any other dataset is collated with ``torch.utils.data.default_collate``. An empty sample
    (B = 0) gives tensors with 0 rows and the same trailing shapes and dtypes (for a generic
    dataset they are derived from ``dataset[0]``).

    ``len(loader)`` is the number of steps per pass; ``loader.sampler`` is the underlying
    ``PoissonSampler`` (checkpoint it with ``loader.sampler.state_dict()``).
    """

    def __init__(self, dataset: Dataset, sample_rate: float, *, steps: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise TypeError(
                "dataset must be map-style (define __len__ and __getitem__), got "
                f"{type(dataset).__name__}"
            )
        if len(dataset) == 0:
            raise ValueError("dataset is empty: Poisson sampling needs at least one example")
        self.dataset = dataset
        self.sampler = PoissonSampler(len(dataset), sample_rate, steps=steps, generator=generator)
        self._tensors = (
            dataset.tensors
            if isinstance(dataset, TensorDataset)
            and type(dataset).__getitem__ is TensorDataset.__getitem__
            else None
        )

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Any]:
        for idx in self.sampler:
            if self._tensors is not None:
                yield tuple(t[idx.to(t.device)] for t in self._tensors)
            elif idx.numel() == 0:
                yield _empty_batch(default_collate([self.dataset[0]]))
            else:
                yield default_collate([self.dataset[i] for i in idx.tolist()])


def poisson_batches(dataset: Dataset, sample_rate: float, *,
                    generator: torch.Generator | None = None,
                    steps: int | None = None) -> PoissonLoader:
    """Poisson-sampled batches of ``dataset``; see ``PoissonLoader``."""
    return PoissonLoader(dataset, sample_rate, steps=steps, generator=generator)
