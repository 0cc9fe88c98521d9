"""Poisson sampler and loader."""

from __future__ import annotations

import itertools
import math
from collections import namedtuple

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from dplis.sampling import PoissonLoader, PoissonSampler, poisson_batches


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_mean_batch_size_matches_qn():
    n, q, steps = 1000, 0.05, 400
    sizes = torch.tensor([len(b) for b in PoissonSampler(n, q, steps=steps, generator=gen())])
    # total ~ Binomial(n * steps, q): mean 20000, std ~138; allow 6 std
    total_std = math.sqrt(n * steps * q * (1 - q))
    assert abs(sizes.sum().item() - n * steps * q) < 6 * total_std
    # per-batch variance ~ nq(1-q) = 47.5
    assert 30 < sizes.float().var().item() < 70


@pytest.mark.parametrize("q", [6.02e-7, 3.01e-7, 1.5 * 2**-24, 1e-4, 0.3, 1 - 2**-40, 1.0])
def test_an_example_is_kept_with_probability_at_most_q(q):
    """float32 uniforms are multiples of 2^-24: ``u < q`` kept an example with probability
    ceil(q·2^24)/2^24, up to 9 % above q at q = 6e-7 (the accountant assumes q). float64
    uniforms below q rounded down to their 2^-53 grid keep it with probability in
    (q - 2^-53, q]: the threshold's bounds for every q, and the masks exactly those (which
    the float32 draws fail at q = 0.3; at the tiny rates 1000 examples give empty masks
    either way, and the excess itself would need ~1e9 draws to show)."""
    threshold = math.floor(q * 2**53) / 2**53
    assert q - 2**-53 < threshold <= q
    n = 1000
    sampler = PoissonSampler(n, q, steps=3, generator=torch.Generator().manual_seed(7))
    again = torch.Generator().manual_seed(7)
    for batch in sampler:
        u = torch.rand(n, dtype=torch.float64, generator=again)
        assert torch.equal(batch, (u < threshold).nonzero().squeeze(1))


def test_batches_are_sorted_unique_int64_indices():
    for batch in PoissonSampler(50, 0.3, steps=20, generator=gen()):
        assert batch.dtype == torch.int64 and batch.ndim == 1
        assert torch.all(batch[1:] > batch[:-1])
        assert batch.numel() == 0 or (batch.min() >= 0 and batch.max() < 50)


def test_empty_batches_are_yielded():
    sampler = PoissonSampler(10, 0.01, steps=50, generator=gen())
    batches = list(sampler)
    assert len(batches) == 50 == len(sampler)
    empty = [b for b in batches if b.numel() == 0]
    assert len(empty) > 30  # P(empty) = 0.99**10 ~ 0.90
    assert all(b.dtype == torch.int64 and b.shape == (0,) for b in empty)


def test_default_steps_is_one_epoch():
    assert len(PoissonSampler(100, 0.01)) == 100
    assert len(PoissonSampler(100, 0.3)) == 3
    assert len(PoissonSampler(100, 1.0)) == 1
    assert all(len(b) == 7 for b in PoissonSampler(7, 1.0, steps=3))


def test_reproducible_with_seeded_generator():
    a = list(PoissonSampler(100, 0.1, steps=10, generator=gen(3)))
    b = list(PoissonSampler(100, 0.1, steps=10, generator=gen(3)))
    c = list(PoissonSampler(100, 0.1, steps=10, generator=gen(4)))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_default_generator_follows_torch_manual_seed():
    torch.manual_seed(5)
    a = list(PoissonSampler(100, 0.1, steps=5))
    torch.manual_seed(5)
    b = list(PoissonSampler(100, 0.1, steps=5))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_consecutive_passes_differ():
    sampler = PoissonSampler(100, 0.2, steps=5, generator=gen())
    first, second = list(sampler), list(sampler)
    assert len(second) == 5
    assert not all(torch.equal(x, y) for x, y in zip(first, second, strict=True))


def test_state_dict_resumes_mid_pass():
    reference = PoissonSampler(100, 0.1, steps=8, generator=gen(1))
    expected = list(reference) + list(reference)

    sampler = PoissonSampler(100, 0.1, steps=8, generator=gen(1))
    it = iter(sampler)
    got = [next(it) for _ in range(3)]
    state = sampler.state_dict()
    assert state["position"] == 3

    resumed = PoissonSampler(100, 0.1, steps=8, generator=gen(99))
    resumed.load_state_dict(state)
    got += list(resumed)  # the 5 remaining batches of the pass
    assert len(got) == 8
    got += list(resumed)  # then a full pass
    assert len(got) == 16
    assert all(torch.equal(x, y) for x, y in zip(got, expected, strict=True))


def test_state_dict_at_pass_boundary():
    sampler = PoissonSampler(100, 0.1, steps=4, generator=gen(2))
    list(sampler)
    state = sampler.state_dict()
    assert state["position"] == 0
    expected = list(sampler)
    resumed = PoissonSampler(100, 0.1, steps=4, generator=gen(0))
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(list(resumed), expected, strict=True))


def test_abandoned_pass_does_not_shorten_next():
    sampler = PoissonSampler(100, 0.1, steps=6, generator=gen())
    assert len(list(itertools.islice(sampler, 2))) == 2
    assert len(list(sampler)) == 6


def test_state_saved_after_an_abandoned_pass_resumes_with_a_full_pass():
    """Its position once stayed at the abandoned pass's: the restored sampler's next pass
    was short, unlike the original's."""
    sampler = PoissonSampler(100, 0.1, steps=5, generator=gen(3))
    for i, _ in enumerate(sampler):
        if i == 1:
            break
    state = sampler.state_dict()
    resumed = PoissonSampler(100, 0.1, steps=5, generator=gen(0))
    resumed.load_state_dict(state)
    expected, got = list(sampler), list(resumed)
    assert len(got) == 5 and all(torch.equal(x, y) for x, y in zip(got, expected, strict=True))


def test_load_state_dict_rejects_mismatch():
    state = PoissonSampler(100, 0.1, steps=4, generator=gen()).state_dict()
    with pytest.raises(ValueError, match="num_examples=100"):
        PoissonSampler(50, 0.1, steps=4).load_state_dict(state)
    with pytest.raises(ValueError, match="sample_rate"):
        PoissonSampler(100, 0.2, steps=4).load_state_dict(state)
    with pytest.raises(ValueError, match="position"):
        PoissonSampler(100, 0.1, steps=4).load_state_dict({**state, "position": 4})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_examples": 0, "sample_rate": 0.1}, ValueError, "num_examples must be an int >= 1"),
        ({"num_examples": 5.0, "sample_rate": 0.1}, TypeError, "num_examples must be an int"),
        ({"num_examples": True, "sample_rate": 0.1}, TypeError, "num_examples"),
        ({"num_examples": 5, "sample_rate": 0.0}, ValueError, r"sample_rate .* \(0, 1\]"),
        ({"num_examples": 5, "sample_rate": 1.5}, ValueError, r"\(0, 1\], got 1.5"),
        ({"num_examples": 5, "sample_rate": -0.1}, ValueError, "sample_rate"),
        ({"num_examples": 5, "sample_rate": math.nan}, ValueError, "finite"),
        ({"num_examples": 5, "sample_rate": "0.1"}, TypeError, "sample_rate must be a real"),
        ({"num_examples": 5, "sample_rate": 0.1, "steps": 0}, ValueError, "steps must be"),
        ({"num_examples": 5, "sample_rate": 0.1, "steps": 2.5}, TypeError, "steps must be"),
        ({"num_examples": 5, "sample_rate": 0.1, "generator": 0}, TypeError, "torch.Generator"),
    ],
)
def test_bad_args(kwargs, error, match):
    with pytest.raises(error, match=match):
        PoissonSampler(**kwargs)


def test_numpy_scalars_accepted():
    sampler = PoissonSampler(np.int64(10), np.float32(0.5), steps=np.int32(2))
    assert len(sampler) == 2 and sampler.num_examples == 10


# ----------------------------------------------------------------------------------------- loader

def test_loader_tensor_dataset():
    x = torch.randn(30, 3, 4)
    y = torch.arange(30)
    loader = poisson_batches(TensorDataset(x, y), 0.2, generator=gen(), steps=12)
    assert isinstance(loader, PoissonLoader)
    assert len(loader) == 12 and loader.sampler.steps == 12
    expected = list(PoissonSampler(30, 0.2, steps=12, generator=gen()))
    for (bx, by), idx in zip(loader, expected, strict=True):
        assert bx.shape == (len(idx), 3, 4) and by.dtype == torch.int64
        assert torch.equal(by, idx) and torch.equal(bx, x[idx])


def test_loader_tensor_dataset_empty_batch():
    x = torch.randn(10, 5, dtype=torch.float64)
    y = torch.zeros(10, dtype=torch.int32)
    batches = list(poisson_batches(TensorDataset(x, y), 0.01, generator=gen(), steps=20))
    empty = [b for b in batches if b[1].numel() == 0]
    assert len(batches) == 20 and empty
    bx, by = empty[0]
    assert bx.shape == (0, 5) and bx.dtype == torch.float64
    assert by.shape == (0,) and by.dtype == torch.int32


class Squares(Dataset):
    """Map-style dataset of dicts: {"x": float32 [2, 3], "y": int, "name": str}."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> dict:
        return {"x": torch.full((2, 3), float(i * i)), "y": i, "name": f"item{i}"}


def test_loader_custom_dataset():
    batches = list(poisson_batches(Squares(), 0.5, generator=gen(), steps=10))
    expected = list(PoissonSampler(12, 0.5, steps=10, generator=gen()))
    for batch, idx in zip(batches, expected, strict=True):
        assert batch["x"].shape == (len(idx), 2, 3)
        assert torch.equal(batch["y"], idx)
        assert batch["name"] == [f"item{i}" for i in idx.tolist()]


def test_loader_custom_dataset_empty_batch():
    batches = list(poisson_batches(Squares(), 0.001, generator=gen(), steps=5))
    assert len(batches) == 5
    batch = next(b for b in batches if b["y"].numel() == 0)
    assert batch["x"].shape == (0, 2, 3) and batch["x"].dtype == torch.float32
    assert batch["y"].shape == (0,) and batch["y"].dtype == torch.int64
    assert batch["name"] == []


Pair = namedtuple("Pair", ["x", "y"])


class Tuples(Dataset):
    """Map-style dataset of (namedtuple(x float32 [4], y int), float) items."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> tuple:
        return Pair(torch.ones(4) * i, i), 0.5 * i


def test_loader_empty_batch_nested_structure():
    batch = next(iter(poisson_batches(Tuples(), 1e-9, generator=gen(), steps=1)))
    pair, weight = batch
    assert isinstance(pair, Pair)
    assert pair.x.shape == (0, 4) and pair.y.shape == (0,) and pair.y.dtype == torch.int64
    assert weight.shape == (0,) and weight.dtype == torch.float64


def test_loader_tensor_dataset_subclass_uses_its_getitem():
    class Doubled(TensorDataset):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return 2 * x, y

    x = torch.randn(8, 2)
    for bx, by in poisson_batches(Doubled(x, torch.arange(8)), 1.0, steps=1):
        assert torch.equal(bx, 2 * x[by])


def test_loader_rejects_bad_datasets():
    with pytest.raises(ValueError, match="empty"):
        poisson_batches(TensorDataset(torch.zeros(0, 3)), 0.1)
    with pytest.raises(TypeError, match="map-style"):
        poisson_batches(iter(range(3)), 0.1)
    with pytest.raises(ValueError, match="sample_rate"):
        poisson_batches(TensorDataset(torch.zeros(4, 3)), 2.0)


def test_a_dropped_second_iterator_leaves_the_running_pass_position_alone():
    sampler = PoissonSampler(100, 0.1, steps=5, generator=gen(4))
    running = iter(sampler)
    next(running), next(running)
    peek = iter(sampler)
    next(peek)  # a second pass starts (it owns the position now) ...
    del peek  # ... and is abandoned: the position is reset, being that pass's
    assert sampler.state_dict()["position"] == 0
    next(running)  # the older pass goes on and owns the position again ...
    third = iter(sampler)
    next(third)
    del running  # ... but dropping it now leaves the newest pass's position alone
    assert sampler.state_dict()["position"] == 1
