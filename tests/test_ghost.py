"""Ghost engine specifics: memory, K as extra positions, sequence layers, padding, fallbacks."""

import pytest
import torch
from helpers import OutsideUse, Twice, freed_before, gpt_case, transformer_case
from test_private_grad import assert_close
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

import dplis
from dplis.ghost import GhostUnsupported
from dplis.memory import peak_tensor_bytes
from dplis.models import TinyTransformer, lm_loss
from dplis.reference import naive_private_grad


def test_ghost_peak_memory_is_far_below_the_materialised_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))
    batch = 64
    x, y = torch.randn(batch, 2048), torch.randint(0, 10, (batch,))
    dim = sum(p.numel() for p in model.parameters())
    materialised = batch * dim * 4  # the [B, D] fp32 buffer vmap(grad) needs: ~1.1 GB
    peak = peak_tensor_bytes(lambda: dplis.private_grad(
        model, F.cross_entropy, x, y, max_grad_norm=1.0, noise_multiplier=1.0, engine="ghost"))
    # a few parameter-sized buffers (θ, the clipped sum, the noise, the output), whatever B is
    assert 2 * dim * 4 < peak < 6 * dim * 4, (peak, dim * 4)
    assert peak < 0.1 * materialised


def test_transformer_step_peak_memory_is_within_1_3x_of_the_non_private_step():
    """The bench's GPT-style model and batch (64): book-keeping holds every layer's input and
    output gradient until the norms, but no layer output (autograd frees those it no longer
    needs), so its tensor peak stays near the non-private step's; also on a verification
    step (independence check, weighted batch gradient). Measured tensor memory, not time."""
    torch.manual_seed(0)
    model = TinyTransformer(256, 32, dim=64, heads=4, layers=2, causal=True, tied=True)
    data = torch.randint(0, 256, (64, 33))
    x, y = data[:, :-1], data[:, 1:]

    def nonprivate():
        lm_loss(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    def private(verify):
        return lambda: dplis.private_grad(model, lm_loss, x, y, max_grad_norm=1.0,
                                          noise_multiplier=1.0, engine="ghost", verify=verify)

    base = peak_tensor_bytes(nonprivate)
    for verify in (False, True):
        peak = peak_tensor_bytes(private(verify))
        assert peak < 1.3 * base, (verify, base, peak)


class Padded(nn.Module):
    """Linear over a sequence, mean over real tokens only, with RMSNorm and Conv1d."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.conv = nn.Conv1d(6, 6, 3, padding=1)
        self.norm = nn.RMSNorm(6)
        self.lin = nn.Linear(6, 4)

    def forward(self, tokens, mask):
        h = self.conv(self.emb(tokens).transpose(1, 2)).transpose(1, 2)
        h = self.lin(self.norm(h)) * mask.unsqueeze(-1)
        return h.sum(1) / mask.sum(1, keepdim=True)


def test_sequence_layers_with_padding_match_the_reference():
    torch.manual_seed(1)
    model = Padded()
    tokens = torch.randint(1, 11, (4, 9))
    mask = torch.ones(4, 9)
    tokens[1, 6:], mask[1, 6:] = 0, 0
    y = torch.randint(0, 4, (4,))
    for k, std in ((1, 0.0), (3, 0.02)):
        fast = dplis.private_grad(model, F.cross_entropy, (tokens, mask), y, max_grad_norm=0.3,
                                  noise_multiplier=0.0, engine="ghost", smoothing_std=std,
                                  num_perturbations=k, generator=torch.Generator().manual_seed(0))
        vm = dplis.private_grad(model, F.cross_entropy, (tokens, mask), y, max_grad_norm=0.3,
                                noise_multiplier=0.0, engine="vmap", smoothing_std=std,
                                num_perturbations=k, generator=torch.Generator().manual_seed(0))
        assert_close(fast, {n: t.double() for n, t in vm.items()})
    slow = naive_private_grad(model, F.cross_entropy, (tokens, mask), y, max_grad_norm=0.3)
    fast = dplis.private_grad(model, F.cross_entropy, (tokens, mask), y, max_grad_norm=0.3,
                              noise_multiplier=0.0, engine="ghost")
    assert_close(fast, slow)
    assert float(fast["emb.weight"][0].abs().max()) == 0  # the padding row gets nothing


def test_padding_positions_contribute_nothing():
    model, loss_fn, (tokens, mask), targets = gpt_case()
    kw = dict(max_grad_norm=0.5, noise_multiplier=0.0, engine="ghost")
    base = dplis.private_grad(model, loss_fn, (tokens, mask), targets, **kw)
    tokens2 = tokens.clone()
    tokens2[0, 5:] = (tokens2[0, 5:] + 3) % 17  # change only padded positions of example 0
    other = dplis.private_grad(model, loss_fn, (tokens2, mask), targets, **kw)
    for name in base:
        if name != "tok.weight":  # the embedding rows of padded tokens differ, with zero grad
            torch.testing.assert_close(base[name], other[name])


@pytest.mark.parametrize("causal", [True, False])
def test_transformers_ghost_equals_vmap(causal):
    model, loss_fn, inputs, targets = transformer_case(causal)
    kw = dict(max_grad_norm=0.2, noise_multiplier=0.0, smoothing_std=0.01, num_perturbations=3)
    g = dplis.private_grad(model, loss_fn, inputs, targets, engine="ghost",
                           generator=torch.Generator().manual_seed(9), **kw)
    v = dplis.private_grad(model, loss_fn, inputs, targets, engine="vmap",
                           generator=torch.Generator().manual_seed(9), **kw)
    assert_close(g, {n: t.double() for n, t in v.items()})


@pytest.mark.parametrize("low_memory", [False, True])
def test_layer_without_batch_dimension_is_refused(low_memory):
    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(x + self.pos(torch.arange(5)).sum(0))

    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    with pytest.raises(ValueError, match="pos .*batch dimension"):
        dplis.private_grad(Broadcast(), F.cross_entropy, x, y, max_grad_norm=1.0,
                           noise_multiplier=0.0, engine="ghost", low_memory=low_memory)


def test_frozen_layers_get_no_hook_and_no_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 2))
    model[0].requires_grad_(False)
    x, y = torch.randn(3, 5), torch.randint(0, 2, (3,))
    g = dplis.private_grad(model, F.cross_entropy, x, y, max_grad_norm=1.0, noise_multiplier=0.0,
                           engine="ghost")
    assert set(g) == {"1.weight", "1.bias"}
    assert_close(g, naive_private_grad(model, F.cross_entropy, x, y, max_grad_norm=1.0))


def test_a_parameter_under_two_names_of_one_layer_gets_both_uses():
    torch.manual_seed(0)
    model = nn.Sequential(Twice(), nn.Linear(4, 2))
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    g = dplis.private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.5, noise_multiplier=0.0,
                           engine="ghost")  # verify=True: a missed use would raise
    assert set(g) == {"0.scale", "1.weight", "1.bias"}
    assert_close(g, naive_private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.5))


def test_a_model_changing_its_input_in_place_is_refused_with_perturbed_passes():
    class Doubling(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(x.mul_(2))  # every pass would see another input

    model = Doubling()
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="changed its input in place"):
        dplis.private_grad(model, F.cross_entropy, x, y, max_grad_norm=1.0, noise_multiplier=0.0,
                           smoothing_std=0.01, num_perturbations=2, engine="ghost")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_layer_returning_a_tuple_is_refused_by_name():
    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.mha(x, x, x)[0].mean(1))

    x, y = torch.randn(3, 5, 4), torch.randint(0, 2, (3,))
    with pytest.raises(ValueError, match="mha .*MultiheadAttention.*one tensor"):
        dplis.private_grad(Attend(), F.cross_entropy, x, y, max_grad_norm=1.0,
                           noise_multiplier=0.0, engine="ghost")
    torch.manual_seed(0)
    model = Attend()
    step = dplis.private_step(model, F.cross_entropy, x, y, max_grad_norm=0.1,
                              noise_multiplier=0.0)  # auto: ghost refuses the tuple, so vmap
    assert step.engine == "vmap"
    assert_close(step.grads, naive_private_grad(model, F.cross_entropy, x, y,
                                                max_grad_norm=0.1))


def test_in_place_activations_do_not_corrupt_the_recorded_outputs():
    # ReLU(inplace=True) rewrites the Linear's output after the hook saw it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    fast = dplis.private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.3,
                              noise_multiplier=0.0, engine="ghost")
    assert_close(fast, naive_private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.3))


class Residual(nn.Module):
    """LayerNorm -> Linear on [B, T, d] (its output a view of a 2-d matmul) -> GELU ->
    Linear, plus a residual: the shapes of a transformer's MLP block."""

    def __init__(self, d: int = 6, hidden: int = 40):
        super().__init__()
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        h = x + self.fc2(F.gelu(self.fc1(self.ln(x))))
        return h.mean(1) if h.dim() == 3 else h


@pytest.mark.parametrize("sequence", [False, True])
def test_layer_outputs_are_not_held_through_the_backward(sequence):
    """The engine asks autograd for the gradient at the node that made each layer output,
    not at the output tensor: an output no backward needs is freed as in a non-private step
    (fc1's, once GELU's backward used it; a transformer's logits). Checked when the
    gradient reaches the LayerNorm's output, after fc1's backward."""
    torch.manual_seed(0)
    model = Residual()
    x = torch.randn(5, 7, 6) if sequence else torch.randn(5, 6)
    y = torch.randint(0, 6, (5,))
    with freed_before(model.fc1, model.ln) as seen:
        got = dplis.private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.2,
                                 noise_multiplier=0.0, engine="ghost", verify=False)
    assert seen["freed"] is True
    assert_close(got, naive_private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.2))


class InPlaceAfterNorm(Residual):
    """Residual with a Scale layer after the norm whose (view) output is changed in place: the
    engine runs again with the layers isolated (each reads a copy of its input)."""

    def __init__(self):
        super().__init__()
        self.scale = Scale(6)

    def forward(self, x):
        h = self.scale(self.ln(x))
        h[:, 0] += 1.0
        return (x + self.fc2(F.gelu(self.fc1(h)))).mean(1)


@pytest.mark.parametrize("model_cls", [Residual, InPlaceAfterNorm])
@pytest.mark.parametrize("k", [1, 3])
def test_layer_norm_reuses_the_forwards_statistics(model_cls, k, monkeypatch):
    """The LayerNorm rule gets the mean and rstd its forward computed (no second
    normalisation), also when the layers are isolated, and the gradient stays exact."""
    from dplis import ghost_rules

    got = []
    rule = ghost_rules.RULES[nn.LayerNorm]

    def spy(module, args, grad, saved=None):
        got.append(saved is not None)
        return rule(module, args, grad, saved=saved)

    monkeypatch.setitem(ghost_rules.RULES, nn.LayerNorm, spy)
    torch.manual_seed(0)
    model = model_cls()
    x, y = torch.randn(5, 7, 6), torch.randint(0, 6, (5,))
    want = naive_private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.2)
    fast = dplis.private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.2,
                              noise_multiplier=0.0, engine="ghost", verify=False,
                              num_perturbations=k, smoothing_std=0.0)
    assert got and all(got), got
    assert_close(fast, want)


class CheckpointedNorm(Residual):
    """Residual's norm and fc1 inside a non-reentrant activation checkpoint; counts the
    block's runs."""

    def __init__(self):
        super().__init__()
        self.runs = 0

    def block(self, x):
        self.runs += 1
        return F.gelu(self.fc1(self.ln(x)))

    def forward(self, x):
        return (x + self.fc2(checkpoint(self.block, x, use_reentrant=False))).mean(1)


def test_a_checkpointed_layer_norm_recomputes_once_as_without_privacy():
    """Reading a checkpointed norm's saved statistics before the backward would run the
    checkpoint's recomputation early (the block ran 5 times instead of 2): the rule
    normalises again instead, and the gradient stays exact."""
    torch.manual_seed(0)
    model = CheckpointedNorm()
    x, y = torch.randn(5, 7, 6), torch.randint(0, 6, (5,))
    F.cross_entropy(model(x), y).backward()
    plain, model.runs = model.runs, 0
    got = dplis.private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.2,
                             noise_multiplier=0.0, engine="ghost", verify=False)
    assert (plain, model.runs) == (2, 2)
    assert_close(got, naive_private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.2))


class ChangedOutputs(nn.Module):
    """Layer outputs changed in place after the layers returned them: a sequence Linear's
    (a view of its matmul) by a slice update and ReLU(inplace=True), and a custom layer's
    view output (no rule: the vmap fallback) by a slice update."""

    def __init__(self):
        super().__init__()
        self.fc1, self.scale, self.fc2 = nn.Linear(4, 6), Scale(6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.fc1(x)
        h[:, 0] += 1.0
        h = self.scale(F.relu(h, inplace=True))
        h[:, :, 1] *= 2.0
        return self.fc2(h).mean(1)


class Scale(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return (x * self.w).view(x.shape)  # a view of the product


@pytest.mark.parametrize("k", [1, 3])
def test_in_place_changes_of_layer_outputs_leave_the_gradients_exact(k):
    torch.manual_seed(0)
    model = ChangedOutputs()
    x, y = torch.randn(4, 5, 4), torch.randint(0, 3, (4,))
    kw = dict(max_grad_norm=0.3, smoothing_std=0.01 if k > 1 else 0.0, num_perturbations=k)
    got = dplis.private_grad(model, F.cross_entropy, x, y, noise_multiplier=0.0,
                             engine="ghost", generator=torch.Generator().manual_seed(3), **kw)
    want = dplis.private_grad(model, F.cross_entropy, x, y, noise_multiplier=0.0,
                              engine="vmap", generator=torch.Generator().manual_seed(3), **kw)
    assert_close(got, {n: t.double() for n, t in want.items()})
    if k == 1:
        assert_close(got, naive_private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.3))


class NoGrad(nn.Module):
    """A trainable layer run under torch.no_grad() (a frozen-for-now encoder): autograd
    gives it no gradient."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        with torch.no_grad():
            h = self.a(x)
        return self.b(h)


class SelfConditioned(nn.Module):
    """One layer called twice: once without gradient (a self-conditioning pass), once with."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        with torch.no_grad():
            prev = self.fc(x)
        return self.head(torch.tanh(self.fc(x + 0.1 * prev)))


class Gate(nn.Module):
    """A parameterised gate, off: it returns its input (no gradient needed) unchanged."""

    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return x


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.head = Gate(), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.gate(x))


@pytest.mark.parametrize("low_memory", [False, True])
@pytest.mark.parametrize("case", [NoGrad, SelfConditioned, Gated])
def test_a_trainable_layer_run_without_gradient_gets_none_from_that_call(case, low_memory):
    """Its output needs no gradient, so its parameters get none from that call, as autograd
    says (the old code stopped with autograd's "does not require grad" error)."""
    torch.manual_seed(0)
    model = case()
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    got = dplis.private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.5,
                             noise_multiplier=0.0, engine="ghost", low_memory=low_memory)
    assert_close(got, naive_private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.5))
    if case is not SelfConditioned:
        frozen = "a" if case is NoGrad else "gate"
        assert not any(g.any() for n, g in got.items() if n.startswith(frozen))


class Reentrant(nn.Module):
    """A trainable layer inside a reentrant activation checkpoint, after a frozen layer whose
    output is made to require grad (as Hugging Face's enable_input_require_grads does): it
    runs without gradient in the forward and again in the backward, where no autograd.grad
    reaches it."""

    def __init__(self):
        super().__init__()
        self.emb, self.mid, self.head = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.emb.requires_grad_(False)

    def forward(self, x):
        h = self.emb(x).requires_grad_(True)
        h = checkpoint(lambda t: torch.tanh(self.mid(t)), h, use_reentrant=True)
        return self.head(h)


class Recompute(torch.autograd.Function):
    """A hand-written recompute (as in reversible layers): ``fn`` runs without gradient in
    the forward and again, with gradient, in this function's backward."""

    @staticmethod
    def forward(ctx, fn, x):
        ctx.fn = fn
        ctx.save_for_backward(x)
        with torch.no_grad():
            return fn(x)

    @staticmethod
    def backward(ctx, grad):
        x = ctx.saved_tensors[0].detach().requires_grad_()
        with torch.enable_grad():
            torch.autograd.backward(ctx.fn(x), grad)
        return None, x.grad


class Recomputed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.mid, self.c = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.c(Recompute.apply(lambda t: torch.tanh(self.mid(t)), self.a(x)))


@pytest.mark.parametrize("low_memory", [False, True])
@pytest.mark.parametrize("case", [Reentrant, Recomputed])
def test_a_layer_run_again_in_a_custom_backward_is_refused_not_given_zeros(case, low_memory):
    """A layer inside a reentrant checkpoint or a hand-written recompute runs without
    gradient, and its true gradient comes from a backward no autograd.grad reaches (neither
    the engine's nor the batch-gradient check's): refused, naming the layer, rather than
    given zeros, before any backward (no parameter gets a .grad)."""
    torch.manual_seed(0)
    model = case()
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    with pytest.raises(GhostUnsupported, match=r"layer mid \(Linear\) ran without gradient, "
                       "and the loss depends on a custom autograd function"):
        dplis.private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.5,
                           noise_multiplier=0.0, engine="ghost", low_memory=low_memory)
    assert all(p.grad is None for p in model.parameters())


class LaterRequiresGrad(nn.Module):
    """A layer run without gradient whose output is made to require grad afterwards: autograd
    gives the layer nothing, whatever the output's flag says at the end of the forward."""

    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        with torch.no_grad():
            h = self.a(x)
        return self.c(torch.tanh(h.requires_grad_()))


class Collect(nn.Module):
    """No rule; appends a feature to a list it is given, which the model reads later."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 8))

    def forward(self, x, feats):
        out = (x * self.w).view(x.shape)
        feats.append(out * 1.0)
        return out


class Collecting(nn.Module):
    """The Collect layer's output is changed in place, so book-keeping runs isolated: the
    list must still be the model's."""

    def __init__(self):
        super().__init__()
        self.a, self.collect, self.c = nn.Linear(4, 8), Collect(), nn.Linear(8, 3)

    def forward(self, x):
        feats = []
        h = self.collect(self.a(x), feats=feats)
        h[:, 1] *= 2.0
        return self.c(torch.tanh(h + feats[0]))


@pytest.mark.parametrize(("case", "low_memory"), [(LaterRequiresGrad, False),
                                                  (LaterRequiresGrad, True),
                                                  (Collecting, False)])
def test_calls_are_judged_as_the_layer_made_them_and_containers_stay_the_models(case,
                                                                                 low_memory):
    """(Collecting is not run with low_memory=True: its feature leaves the layer before the
    tap on the layer's output sees it, a path that mode misses; its check refuses it.)"""
    torch.manual_seed(0)
    model = case()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    for verify in (False, True):
        got = dplis.private_grad(model, F.cross_entropy, x, y, max_grad_norm=1.0,
                                 noise_multiplier=0.0, engine="ghost", verify=verify,
                                 low_memory=low_memory)
        assert_close(got, naive_private_grad(model, F.cross_entropy, x, y, max_grad_norm=1.0))


class Vmapped(nn.Module):
    """A layer also applied per position through torch.vmap in the forward."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x[:, 0]))
        per_position = torch.vmap(lambda r: torch.tanh(self.a(r)), in_dims=1, out_dims=1)
        return self.b(h + per_position(x).mean(1))


@pytest.mark.parametrize("low_memory", [False, True])
@pytest.mark.parametrize("verify", [False, True])
def test_a_layer_called_inside_vmap_in_the_forward_is_refused(verify, low_memory):
    """Its output is a functorch wrapper that says requires_grad=False: it was once taken
    for a call without gradient and given none. "auto" runs the vmap engine."""
    torch.manual_seed(0)
    model = Vmapped()
    x, y = torch.randn(6, 4, 5), torch.randint(0, 3, (6,))
    kw = dict(max_grad_norm=0.5, noise_multiplier=0.0, verify=verify)
    with pytest.raises(GhostUnsupported, match=r"layer a \(Linear\) is called inside a "
                       "torch.func transform"):
        dplis.private_grad(model, F.cross_entropy, x, y, engine="ghost", low_memory=low_memory,
                           **kw)
    if not low_memory:
        assert dplis.private_step(model, F.cross_entropy, x, y, **kw).engine == "vmap"


class Doubled(torch.autograd.Function):
    """A custom autograd function that runs no layer again."""

    @staticmethod
    def forward(x):
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad * 2

    generate_vmap_rule = True


class Counting(nn.Module):
    """A forward counter it reads (a warm-up schedule), a layer run without gradient and a
    custom autograd function: the ghost engine refuses it (``refuse_hidden_backward``)."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.l0, self.l1, self.l2 = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        self.calls += 1
        h = self.l0(x) * (1.0 if self.calls == 1 else 3.0)
        with torch.no_grad():
            g = self.l1(h)
        return self.l2(Doubled.apply(h) + g)


@pytest.mark.parametrize("verify", [False, True])
def test_a_refused_ghost_step_puts_plain_attributes_back(verify):
    """The forward advanced the counter before the refusal: put back, so that "auto" (the
    vmap engine after the ghost attempt) takes the step engine="vmap" takes."""
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    torch.manual_seed(1)
    model = Counting()
    with pytest.raises(GhostUnsupported, match="custom autograd function"):
        dplis.private_grad(model, F.cross_entropy, x, y, max_grad_norm=1.0,
                           noise_multiplier=1.0, engine="ghost", verify=verify)
    assert model.calls == 0
    steps = {}
    for engine in ("auto", "vmap"):
        torch.manual_seed(1)
        model = Counting()
        trainer = dplis.PrivateTrainer(
            model, torch.optim.SGD(model.parameters(), lr=0.5), F.cross_entropy,
            sample_rate=0.01, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=6,
            seed=0, engine=engine)
        steps[engine] = ([trainer.step(x, y) for _ in range(2)], model.calls, trainer.engine,
                         [p.detach().clone() for p in model.parameters()])
    (loss_a, calls_a, engine_a, params_a), (loss_v, calls_v, _, params_v) = steps.values()
    assert (loss_a, calls_a, engine_a) == (loss_v, calls_v, "vmap")
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_v))


class KeywordInput(nn.Module):
    """A Linear called with its input by keyword, the input then changed in place (under
    bf16 autocast the Linear saved its own bf16 copy, so autograd does not object)."""

    def __init__(self):
        super().__init__()
        self.ln, self.fc = nn.LayerNorm(5), nn.Linear(5, 3)

    def forward(self, x):
        h = self.ln(x)
        out = self.fc(input=h)
        h.mul_(3.0)
        return out.float() + h[:, :3]


def test_a_keyword_input_changed_in_place_after_the_call_is_isolated():
    torch.manual_seed(0)
    model = KeywordInput()
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    kw = dict(max_grad_norm=0.3, noise_multiplier=0.0, precision="bf16")
    got = dplis.private_grad(model, F.cross_entropy, x, y, engine="ghost", verify=False, **kw)
    want = dplis.private_grad(model, F.cross_entropy, x, y, engine="vmap", **kw)
    assert_close(got, {n: t.double() for n, t in want.items()}, rtol=5e-3, atol=5e-4)


class Shift(nn.Module):
    """No rule (the vmap fallback): x @ w plus a shift autograd never saves, given by
    keyword, alone or in a list."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4) * 0.5)

    def forward(self, x, shift=None, extra=None):
        return torch.sin(x @ self.w + (shift if shift is not None else extra[0]))


class ChangedShift(nn.Module):
    def __init__(self, nested: bool):
        super().__init__()
        self.layer, self.head, self.nested = Shift(), nn.Linear(4, 3), nested

    def forward(self, x):
        b = torch.full((4,), 0.3)
        h = self.layer(x, extra=[b]) if self.nested else self.layer(x, shift=b)
        b.mul_(5)  # changed in place after the layer read it
        return self.head(h + b)


@pytest.mark.parametrize("nested", [False, True])
def test_keyword_inputs_changed_in_place_are_isolated_or_refused(nested):
    """Book-keeping runs the layers on copies of such inputs, but not of tensors inside a
    list (the layer may fill the list for the model): those are refused; low-memory
    clipping, which reads inputs in its backward, refuses both."""
    torch.manual_seed(0)
    model = ChangedShift(nested)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    kw = dict(max_grad_norm=0.5, noise_multiplier=0.0, engine="ghost", verify=False)
    if nested:
        with pytest.raises(GhostUnsupported, match=r"an input of layer layer \(Shift\) "
                           "inside a list or dict was changed in place"):
            dplis.private_grad(model, F.cross_entropy, x, y, **kw)
    else:
        got = dplis.private_grad(model, F.cross_entropy, x, y, **kw)
        assert_close(got, naive_private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.5))
    with pytest.raises(GhostUnsupported, match=r"an input of layer layer \(Shift\) was "
                       "changed in place after the layer read it"):
        dplis.private_grad(model, F.cross_entropy, x, y, low_memory=True, **kw)


class Accumulate(nn.Module):
    """A layer adding its output into a running sum it is given (the model reads the sum)."""

    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(1 + 0.1 * torch.randn(4))

    def forward(self, x, acc):
        y = torch.tanh(x * self.s)
        acc.add_(y)
        return y


class RunningSum(nn.Module):
    def __init__(self, keyword: bool):
        super().__init__()
        self.layers = nn.ModuleList(Accumulate() for _ in range(2))
        self.head, self.keyword = nn.Linear(4, 3), keyword

    def forward(self, x):
        acc, h = torch.zeros_like(x), x
        for layer in self.layers:
            h = layer(h, acc=acc) if self.keyword else layer(h, acc)
        return self.head(acc)


@pytest.mark.parametrize("keyword", [False, True])
def test_a_layer_writing_into_its_own_input_is_refused_not_isolated_away(keyword):
    """Copies of the running sum would keep the layers' writes from the model (the head
    would read zeros) and the check would compare that other model with itself: refused."""
    torch.manual_seed(0)
    model = RunningSum(keyword)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    for low_memory in (False, True):
        with pytest.raises(GhostUnsupported, match=r"layers\.0 \(Accumulate\)"):
            dplis.private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.5,
                               noise_multiplier=0.0, engine="ghost", low_memory=low_memory)


def test_a_parameter_used_outside_its_layer_is_caught_not_silently_wrong():
    torch.manual_seed(0)
    model = OutsideUse()
    t, y = torch.randint(0, 10, (3, 5)), torch.randint(0, 10, (3,))
    with pytest.raises(ValueError, match=r"\['emb.weight'\] do not add up"):
        dplis.private_grad(model, F.cross_entropy, t, y, max_grad_norm=1.0,
                           noise_multiplier=0.0, engine="ghost")
    vm = dplis.private_grad(model, F.cross_entropy, t, y, max_grad_norm=0.5,
                            noise_multiplier=0.0, engine="vmap")
    assert_close(vm, naive_private_grad(model, F.cross_entropy, t, y, max_grad_norm=0.5))


def test_ghost_norm_kernel_inside_the_engine_matches_the_naive_reference():
    """backend="triton": the ghost norms of the sequence layers come from the Triton kernel
    (interpreted on CPU); clipping then depends on them, so a wrong norm shows."""
    model, loss_fn, inputs, targets = gpt_case(batch=3)
    kw = dict(max_grad_norm=0.05, noise_multiplier=0.0)
    got = dplis.private_grad(model, loss_fn, inputs, targets, engine="ghost", backend="triton",
                             **kw)
    want = naive_private_grad(model, loss_fn, inputs, targets, max_grad_norm=0.05)
    assert_close(got, want)


def test_perturbed_passes_give_the_parameters_back_exactly_even_on_error():
    """The ghost engine runs each perturbed pass with the point copied into the model's own
    parameters: afterwards (and after an error in a later pass) they are bit-identical."""
    model, loss_fn, inputs, targets = gpt_case(batch=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    kw = dict(max_grad_norm=0.1, noise_multiplier=0.0, smoothing_std=0.05, num_perturbations=3,
              engine="ghost")
    dplis.private_grad(model, loss_fn, inputs, targets, **kw)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    calls = []

    def fails_on_second_pass(out, t):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return loss_fn(out, t)

    with pytest.raises(RuntimeError, match="boom"):  # (unverified: the passes' calls alone)
        dplis.private_grad(model, fails_on_second_pass, inputs, targets, verify=False, **kw)
    assert len(calls) == 2
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("budget", [0, 2**30])
def test_without_explicit_budget_every_parameter_takes_the_ghost_norm(budget, monkeypatch):
    """Budget 0: the convolutions (which prefer explicit per-example gradients) and every
    other matrix take the ghost norm; the result is the naive reference either way."""
    from helpers import cnn_case

    monkeypatch.setattr("dplis.ghost_grad.EXPLICIT_BUDGET_BYTES", budget)
    model, loss_fn, x, y = cnn_case(batch=4)
    kw = dict(max_grad_norm=0.3, noise_multiplier=0.0, smoothing_std=0.02, num_perturbations=2)
    got = dplis.private_grad(model, loss_fn, x, y, engine="ghost",
                             generator=torch.Generator().manual_seed(1), **kw)
    want = dplis.private_grad(model, loss_fn, x, y, engine="vmap",
                              generator=torch.Generator().manual_seed(1), **kw)
    assert_close(got, {n: t.double() for n, t in want.items()})


EXACT_FP32_SCRIPT = r"""
import sys, torch
from dplis.ghost import exact_fp32
m, c = torch.backends.cuda.matmul, torch.backends.cudnn
if sys.argv[1] == "legacy":
    torch.set_float32_matmul_precision("high")
elif sys.argv[1] == "new":
    m.fp32_precision, c.conv.fp32_precision = "tf32", "tf32"
legacy = sys.argv[1] != "new"
def read():
    return (m.allow_tf32, c.allow_tf32) if legacy else (m.fp32_precision, c.conv.fp32_precision)
before = read()
with exact_fp32(torch.device("cpu")):
    assert read() == before
try:
    with exact_fp32(torch.device("cuda")):
        assert read() == ((False, False) if legacy else ("ieee", "ieee")), read()
        torch.mm(torch.ones(2, 2), torch.ones(2, 2))  # a matmul inside: no API-mix error
        raise KeyError("boom")
except KeyError:
    pass
assert read() == before, (read(), before)
assert not torch.cuda.is_initialized()
print("ok")
"""


@pytest.mark.parametrize("user", ["default", "legacy", "new"])
def test_exact_fp32_turns_tf32_off_on_cuda_and_back(user):
    """The norms and the clipped sum come from different products: under TF32 (cuDNN's
    default for convolutions) an example could move the sum by more than C. The flags are
    process-wide (hence a fresh process per case), readable and writable without a GPU;
    torch refuses reads that mix its legacy and newer TF32 settings, so the block uses the
    ones the process used."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", EXACT_FP32_SCRIPT, user], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


class UserOutHook(nn.Module):
    """A user's forward hook doubles a layer's output (the LayerNorm's or the Linear's)."""

    def __init__(self, layer: str):
        super().__init__()
        self.a, self.ln, self.head = nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 3)
        getattr(self, layer).register_forward_hook(lambda module, args, out: out * 2.0)

    def forward(self, x):
        return self.head(self.ln(self.a(x)).mean(1))


@pytest.mark.parametrize("layer", ["a", "ln"])
@pytest.mark.parametrize("kw", [dict(verify=False), dict(verify=True),
                                dict(verify=False, low_memory=True),
                                dict(verify=False, num_perturbations=3)])
def test_a_users_forward_hook_on_a_layer_is_part_of_the_model(layer, kw):
    """The engine's hooks run before the user's, so they record the layer's own output and
    the user's change is downstream of it (without verification the doubled output's
    gradient was taken for the layer's: 0.18 off; with it, the model was refused)."""
    torch.manual_seed(0)
    model = UserOutHook(layer)
    x, y = torch.randn(5, 4, 6), torch.randint(0, 3, (5,))
    got = dplis.private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.3,
                             noise_multiplier=0.0, engine="ghost", **kw)
    assert_close(got, naive_private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.3))


class HookedShared(nn.Module):
    """A position embedding shared by the batch (ids [1, T]) with a user's forward hook."""

    def __init__(self, hook):
        super().__init__()
        self.pos, self.head = nn.Embedding(4, 6), nn.Linear(6, 3)
        self.pos.register_forward_hook(hook)

    def forward(self, x):
        return self.head((x + self.pos(torch.arange(4)[None])).mean(1))


@pytest.mark.parametrize("low_memory", [False, True])
def test_a_shared_layer_with_its_own_forward_hooks_is_refused(low_memory):
    """The engine's hook expands a shared layer's output to the batch and runs first: the
    user's hook would see the expanded output (one returning o[0] gave a gradient 123 % off
    without verification)."""
    model = HookedShared(lambda module, args, out: out[0])
    x, y = torch.randn(5, 4, 6), torch.randint(0, 3, (5,))
    for verify in (False, True):
        with pytest.raises(GhostUnsupported, match="shared by the batch .* forward hooks"):
            dplis.private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.3,
                               noise_multiplier=0.0, engine="ghost", verify=verify,
                               low_memory=low_memory)
    got = dplis.private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.3,
                             noise_multiplier=0.0)  # auto: the vmap engine
    assert_close(got, naive_private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.3))
