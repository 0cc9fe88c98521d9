"""Errors that say what was wrong and where: model outputs the ghost engine cannot slice,
torch.vmap failures named by layer, parameters no engine can take."""

import pytest
import torch
from test_private_grad import assert_close
from torch import nn
from torch.nn import functional as F

import dplis
from dplis.ghost import GhostUnsupported
from dplis.reference import naive_private_grad

ZERO = dict(noise_multiplier=0.0, max_grad_norm=0.3)


class DictOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x):
        return {"logits": self.lin(x)}


class SequenceFirst(nn.Module):
    """[B, T, 6] -> [T, B, 3]: the loss reads the batch from dim 1."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x):
        return self.lin(x).transpose(0, 1)


CASES = {
    "dict": (DictOutput, lambda o, y: F.cross_entropy(o["logits"], y), (5, 6),
             r"returns a dict; the ghost engine takes the per-example losses from one tensor "
             r"whose first dimension is the batch \(5\)"),
    "sequence-first": (SequenceFirst, lambda o, y: F.cross_entropy(o.mean(0), y), (5, 4, 6),
                       r"returns a tensor of shape \(4, 5, 3\)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_ghost_refuses_an_output_it_cannot_take_per_example_losses_from(case):
    """It used to fail inside the loss (AttributeError: 'dict' object has no attribute
    'unsqueeze'; a vmap size error), which "auto" did not take as a reason to run vmap."""
    make, loss, shape, message = CASES[case]
    torch.manual_seed(0)
    model, x, y = make(), torch.randn(*shape), torch.randint(0, 3, (5,))
    for low_memory in (False, True):
        with pytest.raises(GhostUnsupported, match=message):
            dplis.private_step(model, loss, x, y, engine="ghost", low_memory=low_memory, **ZERO)
    step = dplis.private_step(model, loss, x, y, **ZERO)
    assert step.engine == "vmap"
    assert_close(step.grads, naive_private_grad(model, loss, x, y, max_grad_norm=0.3))


class Gate(nn.Module):
    def forward(self, x):
        return x * float(x.sum() > 0)  # data-dependent Python control flow: vmap cannot


class AttentionWithGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)  # returns a tuple
        self.gate, self.head = Gate(), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.gate(self.att(x, x, x)[0].mean(1)))


def test_a_vmap_failure_names_the_layer_and_auto_runs_the_loop_engine_saying_why():
    """"auto" used to end with torch's vmap error (the ghost reason only in the chain)."""
    torch.manual_seed(0)
    model, x, y = AttentionWithGate(), torch.randn(5, 4, 8), torch.randint(0, 3, (5,))
    expected = naive_private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.3)
    with pytest.warns(UserWarning, match=r"engine='auto' runs the loop engine for this model "
                                         r"\(one example at a time, slower\): the ghost engine "
                                         r"could not: the ghost engine needs layer att "
                                         r"\(MultiheadAttention\) to return one tensor, got "
                                         r"tuple; and torch.vmap could not: vmap: It looks "
                                         r"like you're either \(1\) calling .item") as caught:
        auto = dplis.private_step(model, F.cross_entropy, x, y, **ZERO)
    # the ghost refusal's own advice (use vmap) is what "auto" just tried: not repeated
    assert not any("Use engine='vmap'" in str(w.message) for w in caught)
    assert auto.engine == "loop"
    assert_close(auto.grads, expected)
    with pytest.raises(RuntimeError) as raised:
        dplis.private_step(model, F.cross_entropy, x, y, engine="vmap", **ZERO)
    assert raised.value.__notes__ == [
        "dplis: raised inside layer gate (Gate) while the vmap engine ran the model under "
        "torch.vmap; engine='loop' runs each example alone without it (slower)"]


class Broken(nn.Module):
    """Fails on a batch of one (as the vmap engine runs each example), not on the batch."""

    def forward(self, x):
        if x.shape[0] == 1:
            raise ValueError("a bug in the model")
        return x


class AttentionThenBroken(AttentionWithGate):
    def __init__(self):
        super().__init__()
        self.gate = Broken()


def test_an_error_vmap_did_not_cause_is_raised_by_auto_with_the_ghost_reason():
    model, x, y = AttentionThenBroken(), torch.randn(5, 4, 8), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match="a bug in the model") as raised:
        dplis.private_step(model, F.cross_entropy, x, y, **ZERO)
    notes = "\n".join(raised.value.__notes__)
    assert "raised inside layer gate (Broken) while the vmap engine ran" in notes
    assert "engine='auto' ran the vmap engine because the ghost engine could not: the ghost " \
           "engine needs layer att (MultiheadAttention) to return one tensor" in notes


def test_lazy_and_complex_parameters_are_refused_naming_the_parameter():
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    lazy = nn.Sequential(nn.LazyLinear(3))
    with pytest.raises(ValueError, match="parameter 0.weight belongs to a lazy module that has "
                                         "not run yet: call the model once"):
        dplis.private_step(lazy, F.cross_entropy, x, y, **ZERO)
    lazy(x)  # shapes set: now it runs
    assert_close(dplis.private_step(lazy, F.cross_entropy, x, y, **ZERO).grads,
                 naive_private_grad(lazy, F.cross_entropy, x, y, max_grad_norm=0.3))
    with pytest.warns(UserWarning, match="Complex modules"):
        complex_model = nn.Linear(4, 3).to(torch.complex64)
    with pytest.raises(TypeError, match=r"parameter weight is complex \(torch.complex64\)"):
        dplis.private_step(complex_model, F.cross_entropy, x.to(torch.complex64), y, **ZERO)


class SameError(nn.Module):
    """Raises one exception object at every call (a cached failure)."""

    def __init__(self):
        super().__init__()
        self.lin, self.error = nn.Linear(4, 3), RuntimeError("cached failure")

    def forward(self, x):
        raise self.error


def test_a_note_is_added_once_to_an_exception_raised_again():
    model, x, y = SameError(), torch.randn(5, 4), torch.randint(0, 3, (5,))
    for _ in range(3):
        with pytest.raises(RuntimeError, match="cached failure") as raised:
            dplis.private_step(model, F.cross_entropy, x, y, engine="vmap", **ZERO)
    assert raised.value.__notes__ == [
        "dplis: raised inside layer <root> (SameError) while the vmap engine ran the model "
        "under torch.vmap; engine='loop' runs each example alone without it (slower)"]


def test_a_vmap_failure_outside_any_layer_says_so():
    """torch's vmap of a bf16 autocast backward through layer_norm fails inside the backward,
    where no layer is running: the error carried no note (the acceptance review)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with pytest.raises(RuntimeError, match="expected scalar type BFloat16") as raised:
        dplis.private_step(model, F.cross_entropy, x, y, engine="vmap", precision="bf16",
                           **ZERO)
    assert raised.value.__notes__ == [VMAP_OUTSIDE_LAYERS]


VMAP_OUTSIDE_LAYERS = (
    "dplis: raised under torch.vmap outside any layer's forward: in the loss (are the "
    "targets' values, dtype and shape what it takes?) or in a backward (torch's vmap of a "
    "bf16 autocast backward through layer_norm fails so); engine='ghost' or 'loop' runs "
    "without vmap, where torch's errors are plainer")


def test_a_target_out_of_range_under_vmap_points_at_the_targets():
    """A class index beyond the logits failed under vmap with torch's gather error and a note
    that blamed bf16 layer_norm (the failing-step audit); the note names the targets first,
    and the loop engine gives torch's plain error."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 7, 2, 1])
    with pytest.raises(RuntimeError, match="out of bounds") as raised:
        dplis.private_step(model, F.cross_entropy, x, y, engine="vmap", **ZERO)
    assert raised.value.__notes__ == [VMAP_OUTSIDE_LAYERS]
    with pytest.raises(IndexError, match="Target 7 is out of bounds"):
        dplis.private_step(model, F.cross_entropy, x, y, engine="loop", **ZERO)
