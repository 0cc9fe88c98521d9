"""Batched per-example losses equal the loss called on each example alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dplis.losses import per_example
from dplis.models import lm_loss


def one_by_one(loss_fn, out, t):
    return torch.stack([loss_fn(out[b:b + 1], t[b:b + 1]) for b in range(len(out))]).float()


def classes(ignore_first=False):
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(0, 5, (7,), generator=gen)
    if ignore_first:
        t[0] = -100
    return torch.randn(7, 5, generator=gen), t


def tokens():
    gen = torch.Generator().manual_seed(1)
    t = torch.randint(0, 11, (4, 6), generator=gen)
    t[1, 3:] = -100  # padding
    t[2] = -100  # a sequence without targets: loss 0
    return torch.randn(4, 6, 11, generator=gen), t


def regression(shape):
    gen = torch.Generator().manual_seed(2)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


CASES = {
    "cross_entropy": (F.cross_entropy, classes()),
    "cross_entropy ignored target": (F.cross_entropy, classes(ignore_first=True)),
    "CrossEntropyLoss smoothing": (nn.CrossEntropyLoss(label_smoothing=0.1), classes()),
    "CrossEntropyLoss weighted": (nn.CrossEntropyLoss(weight=torch.rand(5) + 0.5), classes()),
    "cross_entropy on sequences": (F.cross_entropy, (tokens()[0].transpose(1, 2),
                                                     tokens()[1].clamp(min=0))),
    "mse_loss [B]": (F.mse_loss, regression((6,))),
    "MSELoss [B, 3, 2]": (nn.MSELoss(), regression((6, 3, 2))),
    "lm_loss with padding": (lm_loss, tokens()),
    "custom (vmap)": (lambda o, t: (o - t).abs().amax(), regression((6, 3))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_per_example_losses_equal_one_example_at_a_time(case):
    loss_fn, (out, t) = CASES[case]
    got = per_example(loss_fn)(out, t)
    assert got.shape == (len(out),) and got.dtype == torch.float32
    torch.testing.assert_close(got, one_by_one(loss_fn, out, t), equal_nan=True)


def test_a_loss_can_bring_its_own_batched_twin():
    def loss_fn(out, t):
        return (out - t).pow(2).sum()

    loss_fn.per_example = lambda out, t: (out - t).pow(2).sum(1) * 0 + 42.0
    out, t = regression((3, 2))
    torch.testing.assert_close(per_example(loss_fn)(out, t), torch.full((3,), 42.0))


class ScaledCrossEntropy(nn.CrossEntropyLoss):
    def forward(self, output, target):
        return 3 * super().forward(output, target) + output.pow(2).mean()


class ShiftedMSE(nn.MSELoss):
    def forward(self, output, target):
        return super().forward(output + 1, target)


@pytest.mark.parametrize("loss_fn, target", [
    (ScaledCrossEntropy(), torch.tensor([0, 2, 1, 4])),
    (ShiftedMSE(), torch.randn(4, 5)),
])
def test_a_subclass_of_a_builtin_loss_keeps_its_own_forward(loss_fn, target):
    """The batched twin of nn.CrossEntropyLoss / nn.MSELoss once served their subclasses too."""
    out = torch.randn(4, 5)
    one_by_one = torch.stack([loss_fn(out[b:b + 1], target[b:b + 1]) for b in range(4)])
    torch.testing.assert_close(per_example(loss_fn)(out, target), one_by_one)


@pytest.mark.parametrize("engine", ["ghost", "vmap", "loop"])
def test_a_one_value_loss_counts_as_a_scalar_and_several_values_are_refused(engine):
    """reduction="none" on a batch of one gives shape [1]: the same loss as a scalar. Over an
    example's positions it gives several: refused, naming the shape, in every engine."""
    import dplis
    from dplis.reference import naive_private_grad

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    grads = dplis.private_grad(model, nn.CrossEntropyLoss(reduction="none"), x, y,
                               max_grad_norm=0.5, noise_multiplier=0.0, engine=engine)
    expected = naive_private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.5)
    for name, g in grads.items():
        torch.testing.assert_close(g.double(), expected[name], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"loss_fn must return one value .* got \(2,\)"):
        dplis.private_grad(model, lambda o, t: (o - t.unsqueeze(-1)).pow(2)[0, :2], x, y,
                           max_grad_norm=0.5, noise_multiplier=0.0, engine=engine)


def test_a_batched_twin_of_the_wrong_shape_is_refused():
    def loss(out, t):
        return F.cross_entropy(out, t)

    loss.per_example = lambda out, t: F.cross_entropy(out, t, reduction="none")[:, None]
    out, t = classes()
    with pytest.raises(ValueError, match=r"per_example must return the B = 7 losses \[B\], "
                                         r"got shape \(7, 1\)"):
        per_example(loss)(out, t)


def test_a_loss_vmap_cannot_run_is_taken_one_example_at_a_time():
    """Python control flow on an example's values (an all-padding example's early exit):
    vmap refuses it, and the ghost engine under "auto" failed with torch's raw error; the
    losses now come from B calls on batches of one, and the gradient is the reference's."""
    import dplis
    from dplis.reference import naive_private_grad

    def loss(logits, t):
        valid = t != -100
        if not valid.any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits[valid], t[valid])

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 8), nn.Tanh(), nn.Linear(8, 20))
    tokens = torch.randint(0, 20, (4, 5))
    targets = tokens.clone()
    targets[1, 3:], targets[3] = -100, -100
    out = torch.randn(4, 5, 20)
    one_by_one = torch.stack([loss(out[b:b + 1], targets[b:b + 1]) for b in range(4)])
    torch.testing.assert_close(per_example(loss)(out, targets), one_by_one)
    assert per_example(loss)(out[:0], targets[:0]).shape == (0,)
    step = dplis.private_step(model, loss, tokens, targets, max_grad_norm=0.5,
                              noise_multiplier=0.0)
    assert step.engine == "ghost"
    expected = naive_private_grad(model, loss, tokens, targets, max_grad_norm=0.5)
    for name, g in step.grads.items():
        torch.testing.assert_close(g.double(), expected[name], rtol=1e-5, atol=1e-7)
