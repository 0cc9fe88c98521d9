"""compile=True (torch.compile of the vmap engine): the same private gradients as eager."""

import pytest
import torch
from helpers import cnn_case, mlp_case
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch._dynamo.utils import counters
from torch.nn import functional as F

import dplis
from dplis.compiled import bucket


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles anew: past dynamo's per-function cache limit it would run eager."""
    torch._dynamo.reset()
    counters.clear()
    yield


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


@given(st.integers(1, 100_000))
def test_bucket_pads_little_and_is_stable(b):
    size = bucket(b)
    assert b <= size < b + max(8, b / 4)
    assert bucket(size) == size  # a padded batch is not padded again


def test_four_buckets_per_doubling():
    for low in (32, 64, 1024):  # sizes in (low, 2·low]
        assert len({bucket(b) for b in range(low + 1, 2 * low + 1)}) == 4


def dropout_case(batch: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    return model, F.cross_entropy, torch.randn(batch, 10), torch.randint(0, 3, (batch,))


def grads(case, batch, k, compile, **options):
    model, loss_fn, x, y = case(batch)
    out = dplis.private_grad(
        model, loss_fn, x, y, max_grad_norm=0.5, noise_multiplier=1.0,
        smoothing_std=0.05 if k > 1 else 0.0, num_perturbations=k,
        generator=torch.Generator().manual_seed(3), engine="vmap", compile=compile, **options)
    return torch.cat([g.flatten() for g in out.values()])


@pytest.mark.parametrize("case,batch,k", [
    (mlp_case, 13, 1),  # padded to 16
    (mlp_case, 8, 3),  # a full bucket
    (cnn_case, 5, 1),  # convolutions and GroupNorm, padded to 8
    (dropout_case, 11, 1),  # dropout masks from the generator, as eager
])
def test_compiled_equals_eager(case, batch, k):
    eager, compiled = grads(case, batch, k, False), grads(case, batch, k, True)
    assert eager.abs().max() > 0 and compiled_graphs() == 1
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_compiled_physical_and_perturbation_chunks_equal_eager():
    # chunks of 5, 5, 3 examples (buckets 8, 8) and of 2 + 1 perturbations
    options = dict(max_physical_batch_size=5, perturbation_chunk_size=2)
    eager = grads(mlp_case, 13, 3, False, **options)
    compiled = grads(mlp_case, 13, 3, True, **options)
    assert compiled_graphs() == 2  # 2 or 1 perturbations, each padded to 8 examples
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_trainer_compiles_over_varying_batch_sizes():
    losses, params = {}, {}
    for compile in (False, True):
        model, loss_fn, x, y = mlp_case(batch=20)
        trainer = dplis.PrivateTrainer(
            model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, sample_rate=0.5,
            max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=10, seed=0,
            engine="vmap", compile=compile)
        assert trainer.compile is compile
        losses[compile] = [trainer.step(x[:b], y[:b]) for b in (9, 20, 3)]
        params[compile] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert compiled_graphs() == 3  # one per bucket: 16, 24, 8
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    torch.testing.assert_close(params[True], params[False], rtol=1e-5, atol=1e-6)


def test_compile_must_be_a_bool():
    model, loss_fn, x, y = mlp_case()
    with pytest.raises(TypeError, match="compile must be True or False"):
        dplis.private_grad(model, loss_fn, x, y, max_grad_norm=1.0, noise_multiplier=1.0,
                           engine="vmap", compile=1)


def test_compile_with_the_ghost_engine_is_refused_or_warned():
    model, loss_fn, x, y = mlp_case()
    kw = dict(max_grad_norm=1.0, noise_multiplier=1.0, compile=True)
    with pytest.raises(ValueError, match='compile=True applies to engine="vmap"'):
        dplis.private_grad(model, loss_fn, x, y, engine="ghost", **kw)
    with pytest.warns(UserWarning, match="compile=True has no effect"):
        trainer = dplis.PrivateTrainer(
            model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, sample_rate=0.5,
            expected_batch_size=6, **kw)
    assert trainer.engine == "ghost" and trainer.compile is False
