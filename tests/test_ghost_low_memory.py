"""low_memory=True: norms inside the backward, the clipped sum from a second backward."""

import copy

import pytest
import torch
from helpers import CASES, OutsideUse, Twice, gpt_case, transformer_case
from test_ghost import Padded
from test_private_grad import assert_close
from torch import nn
from torch.nn import functional as F

import dplis
from dplis.memory import peak_tensor_bytes
from dplis.reference import naive_private_grad

LOW = dict(noise_multiplier=0.0, low_memory=True)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("clip", [0.05, 100.0])
def test_matches_naive_reference(case, clip):
    """Frozen layers (mlp, embed), convolutions and GroupNorm (cnn), LayerNorm (embed), tied
    weights, padding and attention (gpt), clipping active (0.05) or not (100)."""
    model, loss_fn, x, y = CASES[case]()
    got = dplis.private_grad(model, loss_fn, x, y, max_grad_norm=clip, **LOW)
    assert_close(got, naive_private_grad(model, loss_fn, x, y, max_grad_norm=clip))


class Reuse(nn.Module):
    """One layer called twice (its uses add up) and one whose output is discarded."""

    def __init__(self):
        super().__init__()
        self.lin, self.unused, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        self.unused(x)  # no gradient reaches this call: its parameters' gradient is zero
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


def test_sequence_layers_reused_layers_and_unused_outputs():
    """Conv1d, RMSNorm and an Embedding with padding_idx on padded sequences; a layer called
    twice; a layer whose output no loss reads."""
    torch.manual_seed(1)
    model = Padded()
    tokens, mask = torch.randint(1, 11, (4, 9)), torch.ones(4, 9)
    tokens[1, 6:], mask[1, 6:] = 0, 0
    y = torch.randint(0, 4, (4,))
    got = dplis.private_grad(model, F.cross_entropy, (tokens, mask), y, max_grad_norm=0.3,
                             **LOW)
    assert_close(got, naive_private_grad(model, F.cross_entropy, (tokens, mask), y,
                                         max_grad_norm=0.3))
    model, x, y = Reuse(), torch.randn(5, 4), torch.randint(0, 2, (5,))
    got = dplis.private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.2, **LOW)
    assert_close(got, naive_private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.2))
    assert float(got["unused.weight"].abs().max()) == 0


@pytest.mark.parametrize("causal", [True, False])
def test_equals_the_bookkeeping_engine_at_a_perturbed_point(causal):
    model, loss_fn, inputs, targets = transformer_case(causal, batch=4, seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = {}
    for low in (False, True):
        out[low] = dplis.private_step(
            model, loss_fn, inputs, targets, max_grad_norm=0.2, noise_multiplier=0.0,
            smoothing_std=0.01, engine="ghost", low_memory=low,
            generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out[True].norms, out[False].norms)
    assert out[True].loss == pytest.approx(out[False].loss)
    assert_close(out[True].grads, {n: t.double() for n, t in out[False].grads.items()})
    # the perturbed point was the model's for the pass; its own values are back, bit for bit
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_physical_chunks_add_up_to_the_logical_batch():
    model, loss_fn, x, y = gpt_case(batch=5)
    kw = dict(max_grad_norm=0.1, noise_multiplier=1.0, low_memory=True)
    whole = dplis.private_grad(model, loss_fn, x, y, noise_seed=7, **kw)
    chunked = dplis.private_grad(model, loss_fn, x, y, noise_seed=7, max_physical_batch_size=2,
                                 **kw)
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("inplace", [False, True])
def test_fallback_layers_and_in_place_activations(inplace):
    """A layer without a rule gets vmap per-example gradients inside the backward; with
    ReLU(inplace=True) rewriting a layer's output, autograd refuses the tap's view and the
    forward runs again with the taps copying: still exact."""
    torch.manual_seed(0)
    model = nn.Sequential(Twice(), nn.Linear(4, 6), nn.ReLU(inplace=inplace), nn.Linear(6, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    got = dplis.private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.4, **LOW)
    assert set(got) == {"0.scale", "1.weight", "1.bias", "3.weight", "3.bias"}
    assert_close(got, naive_private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.4))


def test_the_engine_refuses_what_it_cannot_do():
    model, loss_fn, x, y = gpt_case()
    kw = dict(max_grad_norm=1.0, **LOW)
    with pytest.raises(ValueError, match=r"\(num_perturbations=1\), got num_perturbations=2"):
        dplis.private_grad(model, loss_fn, x, y, num_perturbations=2, smoothing_std=0.01, **kw)
    with pytest.raises(ValueError, match='low_memory=True is a mode of the ghost engine'):
        dplis.private_grad(model, loss_fn, x, y, engine="vmap", **kw)
    with pytest.raises(TypeError, match="low_memory must be True or False"):
        dplis.private_grad(model, loss_fn, x, y, max_grad_norm=1.0, noise_multiplier=0.0,
                           low_memory=1)
    # bf16: the second backward rounds otherwise than the first (an example moved the sum by
    # up to 1.007·C), so it is refused, by the function and by the trainer
    with pytest.raises(ValueError, match="fp32 only"):
        dplis.private_grad(model, loss_fn, x, y, precision="bf16", **kw)
    with pytest.raises(ValueError, match="fp32 only"):
        dplis.PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn,
                             sample_rate=0.1, max_grad_norm=1.0, noise_multiplier=1.0,
                             low_memory=True, precision="bf16")
    torch.manual_seed(0)
    t, labels = torch.randint(0, 10, (3, 5)), torch.randint(0, 10, (3,))
    with pytest.raises(ValueError, match=r"\['emb.weight'\] do not add up"):
        dplis.private_grad(OutsideUse(), F.cross_entropy, t, labels, **kw)

    class Pair(nn.Module):  # owns a parameter, returns a tuple: no output gradient to tap
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.w, x

    class UsesPair(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair, self.head = Pair(), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.pair(x)[0])

    with pytest.raises(ValueError, match=r"layer pair \(Pair\) to return one tensor"):
        dplis.private_grad(UsesPair(), F.cross_entropy, torch.randn(3, 4),
                           torch.zeros(3, dtype=torch.long), **kw)


def test_a_failing_step_changes_nothing():
    model, loss_fn, inputs, targets = gpt_case(batch=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(2)
    state = gen.get_state()

    def fails(out, t):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        dplis.private_grad(model, fails, inputs, targets, max_grad_norm=0.1, smoothing_std=0.05,
                           generator=gen, **LOW)
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.blocks[0].fc1.weight[0, 0] = float("nan")
    with pytest.raises(dplis.NonFiniteError):
        dplis.private_grad(bad, loss_fn, inputs, targets, max_grad_norm=0.1, generator=gen,
                           **LOW)
    assert torch.equal(gen.get_state(), state)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


class Deep(nn.Module):
    """Long sequences through narrow layers: activations dwarf the parameters."""

    def __init__(self, width: int = 32, depth: int = 6):
        super().__init__()
        self.emb = nn.Embedding(50, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 5)

    def forward(self, tokens):
        h = self.emb(tokens)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return self.head(self.norm(h).mean(1))


def test_peak_memory_stays_near_the_non_private_step():
    """The book-keeping engine holds every layer's output gradient to the end of the
    backward; low_memory holds one at a time: measured tensor memory, not time."""
    torch.manual_seed(0)
    model = Deep()
    tokens, y = torch.randint(0, 50, (16, 512)), torch.randint(0, 5, (16,))

    def nonprivate():
        F.cross_entropy(model(tokens), y).backward()
        model.zero_grad(set_to_none=True)

    def private(low):
        return lambda: dplis.private_grad(model, F.cross_entropy, tokens, y, max_grad_norm=1.0,
                                          noise_multiplier=1.0, engine="ghost", verify=False,
                                          low_memory=low)

    base, bookkeeping, low = (peak_tensor_bytes(f) for f in (nonprivate, private(False),
                                                             private(True)))
    layer_output = 16 * 512 * 32 * 4  # one layer's output (or output gradient): 1 MiB
    assert bookkeeping > base + 6 * layer_output, (base, bookkeeping)  # 6+ held gradients
    assert low < 1.3 * base, (base, low)
    assert low < base + 2 * layer_output, (base, low)
    # a verification step (a trainer's first): the independence check keeps half the batch's
    # layer values at most, the weighted check runs before any output gradient is held
    verified = peak_tensor_bytes(lambda: dplis.private_grad(
        model, F.cross_entropy, tokens, y, max_grad_norm=1.0, noise_multiplier=1.0,
        engine="ghost", low_memory=True))
    assert verified < 1.3 * base, (base, verified)


def test_trainer_with_low_memory_takes_the_same_steps():
    runs = {}
    for low in (False, True):
        model, loss_fn, inputs, targets = gpt_case(batch=4)
        trainer = dplis.PrivateTrainer(
            model, torch.optim.SGD(model.parameters(), lr=0.5), loss_fn, sample_rate=0.1,
            max_grad_norm=0.5, noise_multiplier=1.0, expected_batch_size=4, seed=11,
            smoothing_std=0.01, low_memory=low)
        losses = [trainer.step(inputs, targets) for _ in range(3)]
        runs[low] = (losses, torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    torch.testing.assert_close(runs[True][1], runs[False][1], atol=1e-5, rtol=1e-5)
    model, loss_fn, _, _ = gpt_case()
    with pytest.raises(ValueError, match="num_perturbations=1"):
        dplis.PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn,
                             sample_rate=0.1, max_grad_norm=1.0, noise_multiplier=1.0,
                             num_perturbations=4, low_memory=True)


class NaNOnSecondBackward(nn.Module):
    """Passes its input through; the gradient through it turns NaN on the second backward
    of a step (a hook acting on its second call)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, h):
        if h.requires_grad:
            h.register_hook(self.hook)
        return h

    def hook(self, grad):
        self.calls += 1
        return grad * float("nan") if self.calls == 2 else grad


def test_a_non_finite_clipped_sum_from_the_second_backward_is_refused():
    """The norms come from the first backward and the clipped sum from a second: a NaN in
    the second only was released into the model, with the step counted (the failing-step
    audit). It is refused, and the step changes nothing."""
    torch.manual_seed(0)
    probe = NaNOnSecondBackward()
    model = nn.Sequential(nn.Linear(6, 8), probe, nn.Tanh(), nn.Linear(8, 3))
    trainer = dplis.PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                   F.cross_entropy, sample_rate=0.1, max_grad_norm=1.0,
                                   noise_multiplier=1.0, seed=0, expected_batch_size=8.0,
                                   low_memory=True)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    trainer.step(x, y)
    before = {n: p.clone() for n, p in model.named_parameters()}
    probe.calls = 0
    with pytest.raises(dplis.NonFiniteError, match="second backward"):
        trainer.step(x, y)
    assert trainer.accountant.steps == 1
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
