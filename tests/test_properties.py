"""Property-based tests (hypothesis) of the private step: the bounds the accountant assumes."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import dplis

cases = st.fixed_dictionaries({
    "features": st.integers(1, 9),
    "hidden": st.integers(1, 13),
    "classes": st.integers(2, 5),
    "batch": st.integers(1, 7),
    "clip": st.floats(1e-3, 1e3),
    "k": st.integers(1, 3),
    "std": st.sampled_from([0.0, 1e-3, 0.1]),
    "scale": st.sampled_from([1e-3, 1.0, 1e3]),  # input scale: tiny to huge gradients
    "seed": st.integers(0, 2**16),
})


def build(c):
    torch.manual_seed(c["seed"])
    model = nn.Sequential(nn.Linear(c["features"], c["hidden"]), nn.Tanh(),
                          nn.Linear(c["hidden"], c["classes"]))
    x = torch.randn(c["batch"], c["features"]) * c["scale"]
    y = torch.randint(0, c["classes"], (c["batch"],))
    return model, x, y


def run(model, x, y, c, **kw):
    args = dict(max_grad_norm=c["clip"], noise_multiplier=0.0, smoothing_std=c["std"],
                num_perturbations=c["k"], expected_batch_size=4.0,
                generator=torch.Generator().manual_seed(c["seed"])) | kw
    return dplis.private_step(model, F.cross_entropy, x, y, **args)


def flat(grads):
    return torch.cat([g.flatten() for g in grads.values()]).double()


@settings(max_examples=30, deadline=None)
@given(cases)
def test_each_contribution_is_clipped_and_the_result_finite(c):
    model, x, y = build(c)
    step = run(model, x, y, c, noise_multiplier=1.0)
    factors = torch.clamp(c["clip"] / (step.norms + 1e-6), max=1.0)
    assert bool((factors * step.norms <= c["clip"] * (1 + 1e-6)).all())
    assert bool(torch.isfinite(flat(step.grads)).all())
    single = run(model, x[:1], y[:1], c)
    assert float(flat(single.grads).norm()) * 4.0 <= c["clip"] * (1 + 1e-5)


@settings(max_examples=30, deadline=None)
@given(cases)
def test_removing_one_example_moves_the_gradient_by_at_most_c_over_batch(c):
    model, x, y = build(c)
    full = flat(run(model, x, y, c).grads)
    drop = c["seed"] % c["batch"]
    keep = [i for i in range(c["batch"]) if i != drop]
    less = flat(run(model, x[keep], y[keep], c).grads)  # may be the empty batch
    assert float((full - less).norm()) <= c["clip"] / 4.0 * (1 + 1e-5) + 1e-7
    assert math.isfinite(float(full.norm()))
