"""engine="loop": the vmap engine's per-example gradients from a Python loop of one-example
forwards and backwards, for models torch.vmap cannot run."""

import pytest
import torch
from helpers import cnn_case, embed_case, gpt_case, mlp_case
from test_diagnostics import AttentionWithGate
from test_private_grad import assert_close
from torch.nn import functional as F

import dplis
from dplis.reference import naive_private_grad

CASES = {"mlp": mlp_case, "cnn": cnn_case, "gpt": gpt_case, "embed": embed_case}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loop_matches_the_reference_and_the_vmap_engine(case):
    model, loss, x, y = CASES[case]()
    step = dplis.private_step(model, loss, x, y, max_grad_norm=0.3, noise_multiplier=0.0,
                              engine="loop")
    assert step.engine == "loop"
    assert_close(step.grads, naive_private_grad(model, loss, x, y, max_grad_norm=0.3))
    # K = 3 perturbed points, noise and physical chunks: the same step as vmap's
    options = dict(max_grad_norm=0.3, noise_multiplier=1.0, num_perturbations=3,
                   smoothing_std=0.01, max_physical_batch_size=2)
    loop = dplis.private_grad(model, loss, x, y, engine="loop",
                              generator=torch.Generator().manual_seed(0), **options)
    vmap = dplis.private_grad(model, loss, x, y, engine="vmap",
                              generator=torch.Generator().manual_seed(0), **options)
    for name in loop:
        torch.testing.assert_close(loop[name], vmap[name], atol=1e-6, rtol=1e-5)


def test_loop_runs_what_vmap_cannot():
    """Data-dependent Python control flow: vmap fails ("calling .item()"), the loop runs."""
    torch.manual_seed(0)
    model, x, y = AttentionWithGate(), torch.randn(5, 4, 8), torch.randint(0, 3, (5,))
    with pytest.raises(RuntimeError, match="calling .item"):
        dplis.private_step(model, F.cross_entropy, x, y, max_grad_norm=0.3,
                           noise_multiplier=0.0, engine="vmap")
    step = dplis.private_step(model, F.cross_entropy, x, y, max_grad_norm=0.3,
                              noise_multiplier=0.0, engine="loop")
    assert_close(step.grads, naive_private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.3))


def test_loop_refuses_compile_and_low_memory():
    model, loss, x, y = mlp_case()
    with pytest.raises(ValueError, match='compile=True applies to engine="vmap"; the loop '
                                         'engine runs eager'):
        dplis.private_step(model, loss, x, y, max_grad_norm=1.0, noise_multiplier=0.0,
                           engine="loop", compile=True)
    with pytest.raises(ValueError, match='low_memory=True is a mode of the ghost engine; '
                                         'engine="loop" materialises'):
        dplis.private_step(model, loss, x, y, max_grad_norm=1.0, noise_multiplier=0.0,
                           engine="loop", low_memory=True)


def test_a_trainer_on_the_loop_engine_takes_the_vmap_trainers_steps():
    def make(engine):
        model, loss, x, y = mlp_case()
        trainer = dplis.PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loss,
                                       sample_rate=0.1, max_grad_norm=1.0, noise_multiplier=1.0,
                                       seed=0, expected_batch_size=6, engine=engine)
        return trainer, x, y

    (loop, x, y), (vmap, _, _) = make("loop"), make("vmap")
    for _ in range(2):
        assert loop.step(x, y) == pytest.approx(vmap.step(x, y), rel=1e-6)
    assert loop.engine == "loop"
    for a, b in zip(loop.model.parameters(), vmap.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


class ExampleGate(torch.nn.Module):
    """Per example (as the loop runs it): the layer's output if the example sums above 0,
    else constant zeros, whose loss reaches no parameter."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.lin(x) if x.sum() > 0 else torch.zeros(x.shape[0], 3)


def test_an_example_whose_loss_reaches_no_parameter_gets_a_zero_gradient():
    """autograd.grad refused a loss without a graph ("element 0 of tensors does not require
    grad"), also under torch.no_grad() for every example."""
    torch.manual_seed(0)
    model, x, y = ExampleGate(), torch.randn(5, 6), torch.randint(0, 3, (5,))
    assert not all(x.sum(1) > 0)
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(5):
        if x[i].sum() > 0:
            grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]),
                                        list(model.parameters()))
            norm = float(torch.sqrt(sum(g.square().sum() for g in grads)))
            for (n, _), g in zip(model.named_parameters(), grads):
                expected[n] += g * min(1.0, 0.3 / (norm + 1e-6)) / 5
    with torch.no_grad():  # the loop takes its own gradients
        got = dplis.private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.3,
                                 noise_multiplier=0.0, engine="loop")
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], atol=1e-7, rtol=1e-5)


class ScalesItsInput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 3)

    def forward(self, x):
        x.mul_(2.0)
        return self.lin(x)


def test_loop_refuses_an_input_changed_in_place_with_k_passes_and_names_failing_layers():
    torch.manual_seed(0)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match="the model changed its input in place during a forward"):
        dplis.private_step(ScalesItsInput(), F.cross_entropy, x.clone(), y, max_grad_norm=1.0,
                           noise_multiplier=0.0, engine="loop", num_perturbations=3,
                           smoothing_std=0.01)
    wrong = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(5, 3))
    with pytest.raises(RuntimeError, match="cannot be multiplied") as raised:
        dplis.private_step(wrong, F.cross_entropy, x, y, max_grad_norm=1.0,
                           noise_multiplier=0.0, engine="loop")
    assert raised.value.__notes__ == [
        "dplis: raised inside layer 1 (Linear) while the loop engine ran the model on one "
        "example"]
