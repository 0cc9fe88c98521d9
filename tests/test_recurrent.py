"""torch's recurrent layers (nn.RNN, nn.GRU, nn.LSTM) on the vmap engine: against the naive
per-example reference, with and without an initial state; dropout between layers refused."""

import pytest
import torch
from test_private_grad import assert_close
from test_trainer import same, snapshot
from torch import nn
from torch.nn import functional as F

import dplis
from dplis.reference import naive_private_grad


class Recurrent(nn.Module):
    """[B, T, 6] -> logits [B, 3] through one recurrent layer, called as ``call`` says:
    "none" (no state), "none_pos" / "none_kw" (hx=None), "input_kw" (input by keyword),
    "given" (a state that depends on the example), "unbatched" (one example as [T, 6])."""

    def __init__(self, kind: type, call: str, **options):
        super().__init__()
        self.call, self.batch_first = call, options.get("batch_first", False)
        self.rnn = kind(6, 7, **options)
        out = options.get("proj_size") or 7
        self.head = nn.Linear(out * (2 if options.get("bidirectional") else 1), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.call == "unbatched":  # the vmap engine gives each example as a batch of one
            return self.head(torch.stack([self.rnn(s)[0][-1] for s in x]))
        seq = x if self.batch_first else x.transpose(0, 1)
        if self.call == "none":
            out = self.rnn(seq)
        elif self.call == "none_pos":
            out = self.rnn(seq, None)
        elif self.call == "none_kw":
            out = self.rnn(seq, hx=None)
        elif self.call == "input_kw":
            out = self.rnn(input=seq)
        else:
            lead = self.rnn.num_layers * (2 if self.rnn.bidirectional else 1)
            h = x.mean((1, 2))[None, :, None].expand(lead, -1, self.rnn.hidden_size)
            out = self.rnn(seq, (h, h.contiguous()) if isinstance(self.rnn, nn.LSTM) else h)
        seq_out = out[0]
        return self.head(seq_out[:, -1] if self.batch_first else seq_out[-1])


CASES = [
    (kind, call, options)
    for kind in (nn.RNN, nn.GRU, nn.LSTM)
    for call in ("none", "none_pos", "none_kw", "input_kw", "given", "unbatched")
    for options in ({}, {"num_layers": 2, "bidirectional": True, "batch_first": True})
    if not (call == "unbatched" and options)
] + [
    (nn.LSTM, "none", {"proj_size": 4}),
    (nn.LSTM, "none", {"proj_size": 4, "num_layers": 2, "bidirectional": True}),
    (nn.RNN, "none", {"nonlinearity": "relu", "bias": False}),
]


@pytest.mark.parametrize("kind, call, options", CASES,
                         ids=["-".join([k.__name__, c, *(f"{a}={v}" for a, v in o.items())])
                              for k, c, o in CASES])
def test_recurrent_layers_match_the_naive_reference(kind, call, options):
    """Without a state, nn.RNN / nn.GRU (and nn.LSTM with proj_size) used to fail inside
    torch's fused op under vmap; "auto" runs the vmap engine for them (the ghost engine
    refuses a layer returning a tuple)."""
    torch.manual_seed(0)
    model, x, y = Recurrent(kind, call, **options), torch.randn(5, 4, 6), torch.randint(0, 3, (5,))
    expected = naive_private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.3)
    for engine in ("auto", "vmap"):
        step = dplis.private_step(model, F.cross_entropy, x, y, max_grad_norm=0.3,
                                  noise_multiplier=0.0, engine=engine)
        assert step.engine == "vmap"
        assert_close(step.grads, expected)
    assert not model.rnn._forward_pre_hooks  # the hooks are gone afterwards


def test_recurrent_layers_with_perturbation_passes_and_a_frozen_layer():
    """K = 3 passes at one point equal one pass; a frozen GRU feeding a trainable head runs
    on the ghost engine (the GRU owns no trainable, so it is not a planned layer)."""
    torch.manual_seed(0)
    model, x, y = Recurrent(nn.GRU, "none"), torch.randn(5, 4, 6), torch.randint(0, 3, (5,))
    one = dplis.private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.3,
                             noise_multiplier=0.0, engine="vmap")
    three = dplis.private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.3,
                               noise_multiplier=0.0, engine="vmap", num_perturbations=3)
    assert_close(three, {n: g.double() for n, g in one.items()})
    model.rnn.requires_grad_(False)
    step = dplis.private_step(model, F.cross_entropy, x, y, max_grad_norm=0.3,
                              noise_multiplier=0.0)
    assert step.engine == "ghost"
    assert_close(step.grads, naive_private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.3))


def test_dropout_between_recurrent_layers_is_refused_by_vmap_and_auto_runs_the_loop():
    torch.manual_seed(0)
    model = Recurrent(nn.GRU, "none", num_layers=2, dropout=0.2)
    x, y = torch.randn(5, 4, 6), torch.randint(0, 3, (5,))

    def trainer(engine):
        return dplis.PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                    F.cross_entropy, sample_rate=0.1, max_grad_norm=1.0,
                                    noise_multiplier=1.0, seed=0, expected_batch_size=5,
                                    engine=engine)

    forced = trainer("vmap")
    before = snapshot(forced)
    with pytest.raises(RuntimeError, match=r"layer rnn \(GRU\) applies dropout=0.2 between "
                                           r"its stacked layers"):
        forced.step(x, y)
    assert same(before, snapshot(forced)) and forced.accountant.steps == 0
    assert not model.rnn._forward_pre_hooks
    auto = trainer("auto")
    with pytest.warns(UserWarning, match="runs the loop engine"):
        auto.step(x, y)
    assert auto.engine == "loop" and auto.accountant.steps == 1
    model.eval()  # no dropout: the same model now runs
    assert_close(dplis.private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.3,
                                    noise_multiplier=0.0),
                 naive_private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.3))


class OutputOnlyLSTM(nn.LSTM):
    """A subclass whose forward takes the input only (and returns the outputs only)."""

    def forward(self, x):
        return super().forward(x)[0]


def test_a_recurrent_subclass_with_its_own_forward_is_left_as_it_is():
    """The hook gave every recurrent layer hx=, which this forward does not take
    (TypeError); it now applies to torch's own forwards only (nn.LSTM works under vmap
    as it is)."""
    torch.manual_seed(0)
    model = nn.Sequential(OutputOnlyLSTM(6, 7, batch_first=True), nn.Flatten(), nn.Linear(28, 3))
    x, y = torch.randn(5, 4, 6), torch.randint(0, 3, (5,))
    step = dplis.private_step(model, F.cross_entropy, x, y, max_grad_norm=0.3,
                              noise_multiplier=0.0, engine="vmap")
    assert_close(step.grads, naive_private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.3))


class Packed(nn.Module):
    """Variable-length sequences through pack_padded_sequence: torch.vmap cannot pack per
    example (the lengths are read as Python numbers), the loop engine can."""

    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(6, 7, batch_first=True), nn.Linear(7, 3)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        return self.head(self.rnn(packed)[1][-1])


def test_packed_sequences_run_on_the_loop_engine_also_under_auto():
    torch.manual_seed(0)
    model, x = Packed(), torch.randn(5, 4, 6)
    inputs, y = (x, torch.tensor([4, 2, 3, 1, 4])), torch.randint(0, 3, (5,))
    expected = naive_private_grad(model, F.cross_entropy, inputs, y, max_grad_norm=0.3)
    step = dplis.private_step(model, F.cross_entropy, inputs, y, max_grad_norm=0.3,
                              noise_multiplier=0.0, engine="loop")
    assert_close(step.grads, expected)
    with pytest.warns(UserWarning, match="runs the loop engine"):
        auto = dplis.private_step(model, F.cross_entropy, inputs, y, max_grad_norm=0.3,
                                  noise_multiplier=0.0)
    assert auto.engine == "loop"
    assert_close(auto.grads, expected)
