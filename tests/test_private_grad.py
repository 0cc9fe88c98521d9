"""private_grad against the naive loop-over-examples reference, smoothing, noise, bad input."""

import math

import pytest
import torch
from helpers import CASES, OutsideUse, mlp_case
from torch import nn
from torch.nn import functional as F

import dplis
from dplis import kernels
from dplis.ghost import GhostUnsupported
from dplis.ghost_grad import ParamGrad
from dplis.private_grad import draw_seeds, step_noise_seed, trainable
from dplis.reference import naive_private_grad


def assert_close(fast: dict, slow: dict, atol: float = 1e-6, rtol: float = 1e-4) -> None:
    assert fast.keys() == slow.keys()
    for name in fast:
        torch.testing.assert_close(fast[name].double(), slow[name], atol=atol, rtol=rtol,
                                   msg=lambda m, n=name: f"{n}: {m}")


ENGINES = ["vmap", "ghost"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("clip", [0.05, 100.0])
def test_matches_naive_reference(case, clip, engine):
    model, loss_fn, x, y = CASES[case]()
    fast = dplis.private_grad(model, loss_fn, x, y, max_grad_norm=clip, noise_multiplier=0.0,
                              engine=engine)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(fast) == trainable
    assert_close(fast, naive_private_grad(model, loss_fn, x, y, max_grad_norm=clip))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", ["mlp", "cnn", "gpt"])
def test_smoothed_matches_naive_with_same_perturbations(case, engine):
    model, loss_fn, x, y = CASES[case]()
    k, std = 3, 0.05
    fast = dplis.private_grad(model, loss_fn, x, y, max_grad_norm=0.5, noise_multiplier=0.0,
                              smoothing_std=std, num_perturbations=k,
                              generator=torch.Generator().manual_seed(7), engine=engine)
    assert_close(fast, naive_private_grad(model, loss_fn, x, y, max_grad_norm=0.5,
                                          perturbations=drawn_perturbations(model, k, std, 7)))


def drawn_perturbations(model: nn.Module, k: int, std: float, seed: int) -> list[dict]:
    """The K perturbations private_grad draws from Generator(seed): seeds, then kernels.perturb."""
    _, perturb_seed, _ = draw_seeds(torch.Generator().manual_seed(seed), 3)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    theta = torch.cat([p.detach().reshape(-1) for p in params.values()])
    thetas = kernels.perturb([theta], std=std, num_perturbations=k, seed=perturb_seed)[0]
    us = []
    for row in thetas - theta:
        parts = torch.split(row, [p.numel() for p in params.values()])
        us.append({n: u.view(p.shape) for (n, p), u in zip(params.items(), parts)})
    return us


def test_the_input_layer_is_formed_once_for_all_perturbed_passes(monkeypatch):
    """Its K passes read the same input: their factors fold into one (``Factor.absorb``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    held = {}
    finish = ParamGrad.finish

    def spy(self):
        held[tuple(self.shape)] = len(self.dense)
        return finish(self)

    monkeypatch.setattr(ParamGrad, "finish", spy)
    fast = dplis.private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.5,
                              noise_multiplier=0.0, smoothing_std=0.05, num_perturbations=3,
                              generator=torch.Generator().manual_seed(7), engine="ghost")
    assert held[(5, 6)] == 1 and held[(3, 5)] in (0, 3)  # the second: 3 passes, or formed
    assert_close(fast, naive_private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.5,
                                          perturbations=drawn_perturbations(model, 3, 0.05, 7)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_physical_chunks_add_up_to_the_logical_batch(case):
    model, loss_fn, x, y = CASES[case](batch=5)
    kw = dict(max_grad_norm=0.1, noise_multiplier=0.7, smoothing_std=0.01, num_perturbations=2)
    whole = dplis.private_grad(model, loss_fn, x, y, generator=torch.Generator().manual_seed(4),
                               engine="ghost", **kw)
    for engine in ENGINES:
        chunked = dplis.private_grad(model, loss_fn, x, y, max_physical_batch_size=2,
                                     generator=torch.Generator().manual_seed(4), engine=engine,
                                     **kw)
        assert_close(chunked, {n: t.double() for n, t in whole.items()}, atol=1e-5)


def test_auto_engine_runs_ghost_with_the_fallback_and_vmap_where_ghost_cannot():
    from dplis.private_grad import resolve_engine, trainable

    for case in CASES.values():
        model = case()[0]
        assert resolve_engine("auto", model, trainable(model)) == "ghost"

    class Scale(nn.Module):  # a layer without a ghost rule: the vmap fallback, inside ghost
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.s

    model = nn.Sequential(nn.Linear(4, 3), Scale())
    params = trainable(model)
    assert resolve_engine("auto", model, params) == "ghost"
    assert resolve_engine("auto", model, params, compile=True) == "vmap"  # compiling: vmap
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    kw = dict(max_grad_norm=0.2, noise_multiplier=0.0)
    step = dplis.private_step(model, F.cross_entropy, x, y, **kw)
    assert step.engine == "ghost"
    assert_close(step.grads, naive_private_grad(model, F.cross_entropy, x, y, max_grad_norm=0.2))
    # a parameter used outside its layer: ghost refuses (GhostUnsupported), auto runs vmap,
    # from the same generator state, so it equals the vmap engine's step bit for bit
    t, labels = torch.randint(0, 10, (3, 5)), torch.randint(0, 10, (3,))
    torch.manual_seed(0)
    outside = OutsideUse()
    noisy = dict(max_grad_norm=0.5, noise_multiplier=1.0)
    with pytest.raises(GhostUnsupported, match="do not add up"):
        dplis.private_step(outside, F.cross_entropy, t, labels, engine="ghost", **noisy)
    gen = torch.Generator().manual_seed(3)
    auto = dplis.private_step(outside, F.cross_entropy, t, labels, generator=gen, **noisy)
    after_auto = gen.get_state()
    gen = torch.Generator().manual_seed(3)
    vm = dplis.private_step(outside, F.cross_entropy, t, labels, generator=gen, engine="vmap",
                            **noisy)
    assert auto.engine == "vmap" and torch.equal(gen.get_state(), after_auto)
    assert all(torch.equal(auto.grads[n], vm.grads[n]) for n in vm.grads)
    with pytest.raises(ValueError, match="engine"):
        dplis.private_grad(model, F.cross_entropy, x, y, engine="fast", **kw)


def test_k_without_smoothing_equals_k1():
    model, loss_fn, x, y = mlp_case()
    one = dplis.private_grad(model, loss_fn, x, y, max_grad_norm=0.3, noise_multiplier=0.0)
    many = dplis.private_grad(model, loss_fn, x, y, max_grad_norm=0.3, noise_multiplier=0.0,
                              num_perturbations=4)
    assert_close(many, {n: t.double() for n, t in one.items()})


def test_chunked_perturbations_equal_unchunked():
    model, loss_fn, x, y = mlp_case()
    kw = dict(max_grad_norm=0.3, noise_multiplier=0.0, smoothing_std=0.1, num_perturbations=5)
    whole = dplis.private_grad(model, loss_fn, x, y, generator=torch.Generator().manual_seed(1),
                               **kw)
    chunked = dplis.private_grad(model, loss_fn, x, y, generator=torch.Generator().manual_seed(1),
                                 perturbation_chunk_size=2, **kw)
    assert_close(chunked, {n: t.double() for n, t in whole.items()})


def test_smoothing_converges_to_analytic_smoothed_gradient():
    # ℓ(w) = cos(w·x): E_u ℓ(w+u) = cos(w·x)·exp(-s²|x|²/2), so ∇ = -sin(w·x)·x·exp(-s²|x|²/2)
    torch.manual_seed(0)
    model = nn.Linear(6, 1, bias=False).double()
    x = torch.randn(1, 6, dtype=torch.float64)
    s, k = 0.4, 20000
    got = dplis.private_grad(model, lambda out, t: torch.cos(out - t).sum(), x,
                             torch.zeros(1, 1, dtype=torch.float64), max_grad_norm=1e6,
                             noise_multiplier=0.0, smoothing_std=s, num_perturbations=k,
                             perturbation_chunk_size=5000,
                             generator=torch.Generator().manual_seed(3))["weight"]
    w = model.weight.detach()
    wx, xx = float(w @ x[0]), float(x[0] @ x[0])
    expected = -math.sin(wx) * x * math.exp(-s * s * xx / 2)
    unsmoothed = -math.sin(wx) * x
    # Monte-Carlo error of the mean of K draws: each draw is bounded by |x|
    err = float((got - expected).norm())
    assert err < 5 * math.sqrt(xx / k)
    assert float((unsmoothed - expected).norm()) > 10 * err  # the smoothing is visible


def test_noise_std_and_reproducibility():
    torch.manual_seed(0)
    model = nn.Linear(100, 50)
    x, y = torch.randn(4, 100), torch.zeros(4, 50)

    def zero_loss(out, t):
        return (out * 0).sum()

    sigma, clip, ebs = 1.3, 2.0, 8.0
    kw = dict(max_grad_norm=clip, noise_multiplier=sigma, expected_batch_size=ebs)
    g1, g2, g3 = (dplis.private_grad(model, zero_loss, x, y,
                                     generator=torch.Generator().manual_seed(s), **kw)
                  for s in (5, 5, 6))
    flat = torch.cat([g.flatten() for g in g1.values()])
    n, target = flat.numel(), sigma * clip / ebs
    # std of a sample std ≈ σ/sqrt(2n): a 6-sigma band
    assert abs(float(flat.std()) - target) < 6 * target / math.sqrt(2 * n)
    assert abs(float(flat.mean())) < 6 * target / math.sqrt(n)
    assert all(torch.equal(g1[k], g2[k]) for k in g1)
    assert not torch.equal(g1["weight"], g3["weight"])


def test_dropout_masks_differ_per_example():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.Dropout(0.5), nn.Linear(64, 2))
    x = torch.randn(1, 8).expand(6, 8)  # six identical examples
    y = torch.zeros(6, dtype=torch.long)
    step = dplis.private_step(model, nn.functional.cross_entropy, x, y, max_grad_norm=1e6,
                              noise_multiplier=0.0, generator=torch.Generator().manual_seed(0))
    assert len(set(step.norms.tolist())) > 1  # same example, different masks
    model.eval()
    step = dplis.private_step(model, nn.functional.cross_entropy, x, y, max_grad_norm=1e6,
                              noise_multiplier=0.0)
    assert torch.allclose(step.norms, step.norms[0].expand(6))


@pytest.mark.parametrize("engine", ["vmap", "ghost"])
def test_dropout_streams_change_the_masks_and_nothing_else(engine):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.Dropout(0.5), nn.Linear(64, 2))
    x, y = torch.randn(6, 8), torch.zeros(6, dtype=torch.long)

    def norms(stream=None, **kw):
        extra = {} if stream is None else {"dropout_stream": stream}
        return dplis.private_step(model, nn.functional.cross_entropy, x, y, max_grad_norm=1e6,
                                  noise_multiplier=0.0, engine=engine, **extra,
                                  generator=torch.Generator().manual_seed(3), **kw).norms

    assert torch.equal(norms(), norms(0))  # stream 0: the masks of a call without it
    assert torch.equal(norms(1), norms(1))
    # every stream its own masks (streams 0 and 2 once shared them on CPU: their seeds
    # differed by 2**32, above the 32 bits mt19937 reads)
    streams = [norms(s) for s in range(4)]
    assert all(not torch.allclose(a, b) for i, a in enumerate(streams) for b in streams[i + 1:])
    model.eval()  # no dropout: noise and perturbations do not depend on the stream
    smooth = dict(smoothing_std=0.1, num_perturbations=2)
    grads = [dplis.private_grad(model, nn.functional.cross_entropy, x, y, max_grad_norm=1.0,
                                noise_multiplier=1.0, engine=engine, dropout_stream=s,
                                generator=torch.Generator().manual_seed(3), **smooth)
             for s in (0, 5)]
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])


def test_buffers_are_read_not_updated():
    model, loss_fn, x, y = mlp_case()
    model.register_buffer("offset", torch.ones(3))
    before = [t.clone() for t in model.state_dict().values()]
    dplis.private_grad(model, loss_fn, x, y, max_grad_norm=1.0, noise_multiplier=1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))


def test_empty_batch_is_pure_noise():
    model, loss_fn, x, y = mlp_case()
    g = dplis.private_grad(model, loss_fn, x[:0], y[:0], max_grad_norm=1.0, noise_multiplier=0.0,
                           expected_batch_size=4.0)
    assert all(float(t.abs().max()) == 0 for t in g.values())
    with pytest.raises(ValueError, match="expected_batch_size"):
        dplis.private_grad(model, loss_fn, x[:0], y[:0], max_grad_norm=1.0, noise_multiplier=0.0)


BAD = [
    (dict(noise_multiplier=-1.0), ValueError, "noise_multiplier"),
    (dict(noise_multiplier=float("nan")), ValueError, "noise_multiplier"),
    (dict(max_grad_norm=0.0), ValueError, "max_grad_norm"),
    (dict(max_grad_norm=-2.0), ValueError, "max_grad_norm"),
    (dict(num_perturbations=0), ValueError, "num_perturbations"),
    (dict(num_perturbations=1.5), TypeError, "num_perturbations"),
    (dict(dropout_stream=-1), ValueError, "dropout_stream"),
    (dict(dropout_stream=1.0), TypeError, "dropout_stream"),
    (dict(dropout_stream=2**31), ValueError, "dropout_stream must be an int <= 2147483647"),
    (dict(smoothing_std=-0.1), ValueError, "smoothing_std"),
    (dict(expected_batch_size=0), ValueError, "expected_batch_size"),
    (dict(perturbation_chunk_size=0), ValueError, "perturbation_chunk_size"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(verify=None), TypeError, "verify must be True or False"),  # None turned checks off
    (dict(verify=0), TypeError, "verify must be True or False"),
    (dict(offset=[0.0]), TypeError, "offset must be a flat tensor"),
    (dict(noise_multiplier=1e38, max_grad_norm=10.0), ValueError, "overflows float32"),
    (dict(expected_batch_size=1e-300), ValueError, "overflows float32"),
]


@pytest.mark.parametrize("bad,error,word", BAD)
def test_bad_arguments(bad, error, word):
    model, loss_fn, x, y = mlp_case()
    kw = dict(max_grad_norm=1.0, noise_multiplier=1.0) | bad
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    with pytest.raises(error, match=word):
        dplis.private_grad(model, loss_fn, x, y, generator=gen, **kw)
    assert torch.equal(gen.get_state(), state)


def test_bad_batches_and_models():
    model, loss_fn, x, y = mlp_case()
    kw = dict(max_grad_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        dplis.private_grad(model, loss_fn, x, y, generator=42, **kw)
    with pytest.raises(TypeError, match="inputs must be a tensor or a tuple or list of "
                                        "tensors .* got dict"):
        dplis.private_grad(model, loss_fn, {"x": x}, y, **kw)
    with pytest.raises(ValueError, match="mismatched batch sizes"):
        dplis.private_grad(model, loss_fn, x, y[:-1], **kw)
    with pytest.raises(ValueError, match="no trainable parameter"):
        dplis.private_grad(nn.Linear(10, 3).requires_grad_(False), loss_fn, x, y, **kw)
    with pytest.raises(ValueError, match="BatchNorm"):
        dplis.private_grad(nn.Sequential(nn.Linear(10, 3), nn.BatchNorm1d(3)), loss_fn, x, y, **kw)


def test_non_finite_loss_raises_and_restores_generator():
    model, loss_fn, x, y = mlp_case()
    x = x.clone()
    x[2, 0] = float("nan")
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    with pytest.raises(dplis.NonFiniteError, match="NaN or infinite"):
        dplis.private_grad(model, loss_fn, x, y, max_grad_norm=1.0, noise_multiplier=1.0,
                           generator=gen)
    assert torch.equal(gen.get_state(), state)


@pytest.mark.parametrize("engine", ["ghost", "vmap", "loop"])
def test_a_non_finite_example_is_named_by_its_place_in_the_batch(engine):
    """The messages counted K·B losses ("3 per-example losses" for one example at K = 3) and
    a physical batch's examples as the whole batch's ("1 of 4" at B = 8); they name the
    examples now, and a physical batch's place in the whole (the failing-step audit)."""
    model, loss_fn, x, y = mlp_case(batch=8)
    x = x.clone()
    x[5, 0] = float("nan")
    kw = dict(max_grad_norm=1.0, noise_multiplier=1.0, engine=engine, smoothing_std=0.01,
              num_perturbations=3)
    with pytest.raises(dplis.NonFiniteError,
                       match=r"losses of 1 of 8 examples \(index 5\) are NaN or infinite \(at "
                             r"one or more of the K = 3 perturbed points\)"):
        dplis.private_grad(model, loss_fn, x, y, **kw)
    with pytest.raises(dplis.NonFiniteError,
                       match=r"losses of 1 of 4 examples \(index 1\) are NaN") as raised:
        dplis.private_grad(model, loss_fn, x, y, max_physical_batch_size=4, **kw)
    assert raised.value.__notes__ == [
        "dplis: in the physical batch of examples 4 to 7 of the 8 (max_physical_batch_size=4)"
        ": add 4 to the indices above for their place in the whole batch"]


def test_noise_seed_selects_the_noise_and_nothing_else():
    model, loss_fn, x, y = mlp_case()

    def grads(**kw):
        g = dplis.private_grad(model, loss_fn, x, y, max_grad_norm=1.0, noise_multiplier=1.0,
                               generator=torch.Generator().manual_seed(3), **kw)
        return torch.cat([t.reshape(-1) for t in g.values()])

    quiet = dplis.private_grad(model, loss_fn, x, y, max_grad_norm=1.0, noise_multiplier=0.0)
    quiet = torch.cat([t.reshape(-1) for t in quiet.values()])
    big = kernels.SEED_MAX - 1
    assert torch.equal(grads(noise_seed=big), grads(noise_seed=big))
    # another seed, other noise, around the same clipped sum: N(0, (σC/B)²) = N(0, (1/6)²)
    a, b = grads(noise_seed=7) - quiet, grads(noise_seed=8) - quiet
    assert not torch.allclose(a, b)
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 6 / a.numel() ** 0.5
    for noise in (a, b):  # 51 values: the std within 6 standard errors (σ/√(2·50) each)
        assert abs(float(noise.std()) - 1 / 6) < 6 * (1 / 6) / 100 ** 0.5


@pytest.mark.parametrize("seed, error, match", [
    (-1, ValueError, "noise_seed must be an int >= 0"),
    (2**63, ValueError, "noise_seed must be an int <= 9223372036854775807"),
    (True, TypeError, "noise_seed must be an int"),
    (1.0, TypeError, "noise_seed must be an int"),
])
def test_bad_noise_seed_is_refused_and_changes_nothing(seed, error, match):
    model, loss_fn, x, y = mlp_case()
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    with pytest.raises(error, match=match):
        dplis.private_grad(model, loss_fn, x, y, max_grad_norm=1.0, noise_multiplier=1.0,
                           generator=gen, noise_seed=seed)
    assert torch.equal(gen.get_state(), state)


def test_step_noise_seeds_never_repeat_in_their_low_32_bits():
    """Consecutive per run (so on CPU, where mt19937 reads 32 bits, no two steps of a run
    share noise within 2**32 steps), different across runs, reproducible."""
    seeds = [step_noise_seed(5, t) for t in range(10_000)]
    assert len({s % 2**32 for s in seeds}) == len(seeds)
    assert all(0 <= s < kernels.SEED_MAX for s in seeds)
    assert seeds == [step_noise_seed(5, t) for t in range(10_000)]
    assert step_noise_seed(6, 0) not in seeds


class _Scaled(nn.Module):
    """A learnable 0-d temperature: its per-example gradients are [B], not [B, ...]."""

    def __init__(self):
        super().__init__()
        self.lin, self.t = nn.Linear(10, 3), nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.lin(x) * self.t


@pytest.mark.parametrize("options", [dict(engine="ghost"), dict(engine="auto"),
                                     dict(engine="ghost", low_memory=True)])
def test_a_0d_parameter_matches_the_reference(options):
    torch.manual_seed(0)
    model, (_, loss_fn, x, y) = _Scaled(), mlp_case()
    grads = dplis.private_grad(model, loss_fn, x, y, max_grad_norm=0.3, noise_multiplier=0.0,
                               **options)
    assert_close(grads, naive_private_grad(model, loss_fn, x, y, max_grad_norm=0.3))


@pytest.mark.parametrize("options", [dict(engine="ghost"), dict(engine="auto"),
                                     dict(engine="ghost", low_memory=True), dict(engine="vmap"),
                                     dict(engine="loop")])
def test_a_loss_no_trainable_parameter_reaches_gives_zero_gradients(options):
    """Every engine gives what the vmap engine gives: zero per-example gradients (the ghost
    engine raised autograd's bare "does not require grad")."""
    model, loss_fn, x, y = mlp_case()
    with pytest.warns(RuntimeWarning, match="every example's gradient is zero"):
        grads = dplis.private_grad(model, lambda o, t: loss_fn(o, t).detach(), x, y,
                                   max_grad_norm=1.0, noise_multiplier=0.0, **options)
    assert grads.keys() == dict(trainable(model)).keys()
    assert all(bool((g == 0).all()) for g in grads.values())


@pytest.mark.parametrize("k, batch", [(3, 3), (2, 3)])
def test_prelu_with_several_perturbations_on_the_vmap_engine(k, batch):
    """torch's nested vmap gets PReLU's input gradients wrong when the perturbations are
    batched (3.6e-3 off at K = B = 3, a size error at K = 2, B = 3): the vmap engine takes
    them one at a time for a model holding an nn.PReLU, and says so when a chunk was asked."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.Linear(4, 2))
    x, y = torch.randn(batch, 4), torch.randint(0, 2, (batch,))

    def run(engine, **kw):
        return dplis.private_grad(model, F.cross_entropy, x, y, max_grad_norm=1e6,
                                  noise_multiplier=0.0, engine=engine, num_perturbations=k,
                                  smoothing_std=0.01, generator=torch.Generator().manual_seed(1),
                                  **kw)

    want = run("loop")
    assert_close(run("vmap"), {n: t.double() for n, t in want.items()})
    with pytest.warns(UserWarning, match="perturbation_chunk_size=3 is taken as 1"):
        got = run("vmap", perturbation_chunk_size=3)
    assert_close(got, {n: t.double() for n, t in want.items()})


def test_a_failed_step_gives_the_cuda_generator_back_without_a_generator(monkeypatch):
    """Without a generator, a step on CUDA draws its dropout masks from the device's global
    RNG; only the CPU one was put back when the step failed (the failing-step audit). The
    mechanism, with torch.cuda's RNG calls stood in for (no GPU here)."""
    from dplis.private_grad import restore_on_error

    states = {0: torch.tensor([1], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d: states[d.index].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda s, d: states.__setitem__(d.index, s.clone()))
    device, cpu = torch.device("cuda", 0), torch.get_rng_state()
    with pytest.raises(RuntimeError, match="failed"):
        with restore_on_error(None, [device]):
            states[0] = torch.tensor([2], dtype=torch.uint8)  # the body draws
            torch.rand(3)
            raise RuntimeError("failed")
    assert int(states[0]) == 1 and torch.equal(torch.get_rng_state(), cpu)
    with restore_on_error(None, [device]):  # a step that succeeds keeps what it drew
        states[0] = torch.tensor([3], dtype=torch.uint8)
    assert int(states[0]) == 3
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(RuntimeError), restore_on_error(gen, [device]):
        states[0] = torch.tensor([4], dtype=torch.uint8)  # a generator draws the masks then
        raise RuntimeError("failed")
    assert int(states[0]) == 4
