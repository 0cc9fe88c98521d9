"""ParamGrad: ghost and explicit norms and clipped sums against per-example gradients formed
by hand, for dense, index (embedding), convolution and explicit parts, mixed and tied."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dplis import ghost_grad, kernels
from dplis.ghost_grad import Budget, ParamGrad
from dplis.ghost_rules import ConvFactor, Factor, layer_norm, layer_norm_stats

B, M, N = 5, 7, 3


def dense(p: int, gen: torch.Generator) -> Factor:
    return Factor(torch.randn(B, p, M, generator=gen), torch.randn(B, p, N, generator=gen))


def index(p: int, gen: torch.Generator) -> Factor:
    idx = torch.randint(0, M, (B, p), generator=gen)
    idx[:, 0] = idx[:, -1]  # repeated rows within an example
    return Factor(idx, torch.randn(B, p, N, generator=gen), index=True)


def formed(part: Factor | torch.Tensor) -> torch.Tensor:
    """[B, M, N] per-example gradient of one part, by the definition (one-hot for indices)."""
    if not isinstance(part, Factor):
        return part
    u = F.one_hot(part.u, M).float() if part.index else part.u
    return torch.einsum("bpm,bpn->bmn", u, part.v)


def fed_input(f: Factor) -> Factor:
    """``f`` marked as the engine marks a layer call fed a model input."""
    f.invariant = True
    return f


def passes(k: int, make, gen: torch.Generator, shared: str) -> list[Factor]:
    """k factors of ``make`` reading one ``shared`` side ("u" or "v"): a layer fed the model's
    inputs in k perturbed passes."""
    first = make(gen)
    return [fed_input(first)] + [
        fed_input(Factor(**{**vars(make(gen)), shared: getattr(first, shared)}))
        for _ in range(k - 1)]


CASES = {  # name -> parts, positions 1..11, mixed kinds, several uses (tied / K passes)
    "one position": lambda g: [dense(1, g)],
    "dense": lambda g: [dense(4, g), dense(3, g)],
    "index": lambda g: [index(6, g), index(2, g)],
    "tied dense + index": lambda g: [index(5, g), dense(4, g), index(2, g)],
    "dense + explicit": lambda g: [dense(2, g), torch.randn(B, M, N, generator=g)],
    "index + explicit": lambda g: [index(3, g), torch.randn(B, M, N, generator=g)],
    "passes sharing v": lambda g: passes(3, lambda g: dense(2, g), g, "v"),
    "passes sharing u": lambda g: passes(2, lambda g: dense(3, g), g, "u"),
    "passes sharing indices": lambda g: passes(3, lambda g: index(4, g), g, "u"),
}


@pytest.mark.parametrize("ghost", [True, False], ids=["ghost", "explicit"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("scale", [1.0, 1 / 3])
def test_norms_and_clipped_sums_match_formed_gradients(case, ghost, scale, monkeypatch):
    gen = torch.Generator().manual_seed(len(case))
    parts = CASES[case](gen)
    want = scale * sum(formed(p) for p in parts)  # [B, M, N]
    pg = ParamGrad(torch.Size([M, N]), scale)
    for p in parts:
        pg.add(p)
    monkeypatch.setattr(ParamGrad, "_use_ghost", lambda self, growth=1.0: ghost)
    sq = pg.finish()
    torch.testing.assert_close(sq, want.flatten(1).pow(2).sum(1), rtol=1e-5, atol=1e-5)
    c = torch.rand(B, generator=gen)
    out = torch.full((M * N,), float("nan"))  # every value must be written
    pg.clipped_sum(c, out)
    torch.testing.assert_close(out.view(M, N), torch.einsum("b,bmn->mn", c, want),
                               rtol=1e-5, atol=1e-5)


def test_factors_reading_one_input_fold_into_one_and_equal_copies_do_not():
    gen = torch.Generator().manual_seed(5)
    pg = ParamGrad(torch.Size([M, N]))
    for f in [*passes(3, lambda g: dense(2, g), gen, "v"),
              *passes(2, lambda g: index(3, g), gen, "u")]:
        pg.add(f)
    assert len(pg.dense) == 1 and len(pg.index) == 1
    first = fed_input(dense(2, gen))
    copy = fed_input(Factor(torch.randn(B, 2, M, generator=gen), first.v.clone()))  # equal
    pg = ParamGrad(torch.Size([M, N]))
    pg.add(first)
    pg.add(copy)
    assert len(pg.dense) == 2
    pg.add(fed_input(Factor(torch.randn(B, 1, M, generator=gen), first.v[:, :1])))  # a view
    pg.add(Factor(torch.randn(B, 2, M, generator=gen), first.v))  # not marked: kept apart
    assert len(pg.dense) == 4


def test_conv_factors_of_one_input_fold_and_form_the_summed_gradient():
    gen = torch.Generator().manual_seed(6)
    geometry = dict(kernel=(3, 3), dilation=(1, 1), padding=(1, 1), stride=(2, 2))
    x = torch.randn(B, 1, 6, 6, generator=gen)
    grads = [torch.randn(B, 4, 3, 3, generator=gen) for _ in range(3)]
    factors = [fed_input(ConvFactor(x, g, geometry)) for g in grads]
    want = sum(f.full() for f in factors)
    pg = ParamGrad(torch.Size([4, 1, 3, 3]))
    for f in factors:
        pg.add(f)
    assert len(pg.dense) == 1
    torch.testing.assert_close(pg.finish(), want.flatten(1).pow(2).sum(1), rtol=1e-5, atol=1e-5)


def test_the_cost_model_picks_ghost_for_long_sequences_and_explicit_for_short_ones():
    long = ParamGrad(torch.Size([64, 64]))
    long.add(Factor(torch.randn(2, 4, 64), torch.randn(2, 4, 64)))  # 4 positions: Gram cheap
    short = ParamGrad(torch.Size([4, 4]))
    short.add(Factor(torch.randn(2, 50, 4), torch.randn(2, 50, 4)))  # 50 positions, 16 weights
    assert long._use_ghost() and not short._use_ghost()


def test_a_huge_parameter_is_never_materialised(monkeypatch):
    monkeypatch.setattr("dplis.ghost_grad.EXPLICIT_MAX_BYTES", 1000)
    pg = ParamGrad(torch.Size([4, 4]))
    pg.add(Factor(torch.randn(64, 50, 4), torch.randn(64, 50, 4)))  # explicit by cost alone
    assert pg._use_ghost()


@pytest.mark.parametrize("geometry", [
    dict(kernel=(3, 3), dilation=(1, 1), padding=(1, 1), stride=(2, 2)),
    dict(kernel=(1, 3), dilation=(1, 2), padding=(0, 2), stride=(1, 1)),  # a Conv1d, as 2-D
    dict(kernel=(2, 2), dilation=(1, 1), padding=(0, 0), stride=(1, 1)),
    # rows and columns past the kernels' reach (8 + 2 padded rows, 9 reached; 10 columns, 8)
    dict(kernel=(3, 2), dilation=(2, 1), padding=(1, 0), stride=(2, 3)),
])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [1, 2])  # 1: the forward-convolution path
def test_conv_factor_full_is_the_unfold_product(geometry, batch, dtype, channels):
    gen = torch.Generator().manual_seed(0)
    height = 1 if geometry["kernel"][0] == 1 else 8 if geometry["stride"] == (2, 3) else 5
    x = torch.randn(batch, channels, height, 10 if geometry["stride"] == (2, 3) else 9,
                    generator=gen, dtype=dtype)
    w = torch.randn(4, channels, *geometry["kernel"], generator=gen, dtype=dtype)
    y = F.conv2d(x, w, stride=geometry["stride"], padding=geometry["padding"],
                 dilation=geometry["dilation"])
    f = ConvFactor(x, torch.randn(y.shape, generator=gen, dtype=dtype), geometry)
    assert f.positions == y[0, 0].numel()
    want = torch.bmm(f.u.transpose(1, 2), f.v).float()
    torch.testing.assert_close(f.full(), want, rtol=1e-5, atol=1e-5)


def test_the_step_budget_sends_parameters_beyond_it_to_the_ghost_norm():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, 6, generator=gen)
    geometry = dict(kernel=(3, 3), dilation=(1, 1), padding=(0, 0), stride=(1, 1))
    one = 2 * 4 * 27 * 4  # bytes of one conv's [B, C_out, C_in·k·k] per-example gradients
    budget = Budget(one)
    first, second = (ParamGrad(torch.Size([4, 27]), budget=budget) for _ in range(2))
    for pg in (first, second):
        pg.add(ConvFactor(x, torch.randn(2, 4, 4, 4, generator=gen), geometry))
    first.settle(2.0)  # K = 2: formed after the first pass, charged once
    first.add(ConvFactor(x, torch.randn(2, 4, 4, 4, generator=gen), geometry))
    first.settle(1.0)
    assert first.charged and first.explicit is not None and budget.left == 0
    assert second._use_ghost()  # convolutions prefer explicit, but nothing is left
    want = formed(Factor(second.dense[0].u, second.dense[0].v)).flatten(1).pow(2).sum(1)
    torch.testing.assert_close(second.finish(), want, rtol=1e-5, atol=1e-5)
    assert second.explicit is None and budget.left == 0


@pytest.mark.parametrize("first", ["explicit", "dense", "index"])
def test_passes_accumulate_in_place_without_touching_the_callers_tensors(first, monkeypatch):
    """K passes formed one at a time (``settle``) sum into one buffer; explicit parts handed
    in by a rule (e.g. the vmap fallback's output) are never changed in place."""
    gen = torch.Generator().manual_seed(7)
    make = {"explicit": lambda: torch.randn(B, M, N, generator=gen),
            "dense": lambda: dense(3, gen), "index": lambda: index(4, gen)}
    passes = [[make[first]()], [make["index"](), make["explicit"]()],
              [make["dense"](), make["explicit"]()]]
    handed = [p for ps in passes for p in ps if not isinstance(p, Factor)]
    copies = [t.clone() for t in handed]
    monkeypatch.setattr(ParamGrad, "_use_ghost", lambda self, growth=1.0: False)
    pg = ParamGrad(torch.Size([M, N]), 1 / 3)
    for done, parts in enumerate(passes, 1):
        for p in parts:
            pg.add(p)
        if done < len(passes):
            pg.settle(len(passes) / done)
    want = sum(formed(p) for ps in passes for p in ps) / 3
    torch.testing.assert_close(pg.finish(), want.flatten(1).pow(2).sum(1), rtol=1e-5, atol=1e-5)
    for t, c in zip(handed, copies):
        assert torch.equal(t, c)


def test_a_parameter_once_formed_stays_formed_between_passes(monkeypatch):
    """Once [B, m, n] exists, later passes are added to it at once (no factors held over),
    even where the cost model alone would now pick the ghost norm."""
    gen = torch.Generator().manual_seed(11)
    passes = [[dense(3, gen)], [dense(2, gen), index(2, gen)], [dense(4, gen)]]
    pg = ParamGrad(torch.Size([M, N]), 1 / 3)
    monkeypatch.setattr(ParamGrad, "_use_ghost", lambda self, growth=1.0: False)
    pg.add(passes[0][0])
    pg.settle(3.0)
    monkeypatch.setattr(ParamGrad, "_use_ghost", lambda self, growth=1.0: True)
    for done, parts in enumerate(passes[1:], 2):
        for p in parts:
            pg.add(p)
        if done < 3:
            pg.settle(3 / done)
            assert not pg.dense and not pg.index and pg.owned
    want = sum(formed(p) for ps in passes for p in ps) / 3
    torch.testing.assert_close(pg.finish(), want.flatten(1).pow(2).sum(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, normalized", [((5, 7, 6), (6,)), ((3, 4, 5), (4, 5)),
                                               ((1, 9), (9,))])
def test_layer_norm_rule_from_the_forwards_stats_equals_normalising_again(shape, normalized):
    torch.manual_seed(0)
    ln = nn.LayerNorm(normalized)
    with torch.no_grad():
        ln.weight.normal_(), ln.bias.normal_()
    x = torch.randn(shape, requires_grad=True)
    out = ln(x)
    saved = layer_norm_stats(ln, (x,), out.grad_fn)
    assert saved is not None
    grad = torch.randn(shape)
    again, reused = layer_norm(ln, (x.detach(),), grad), layer_norm(ln, (x.detach(),), grad,
                                                                   saved=saved)
    for attr in ("weight", "bias"):
        torch.testing.assert_close(reused[attr], again[attr], rtol=1e-5, atol=1e-5)
    # and both are the per-example gradients autograd gives each example alone
    for b in range(shape[0]):
        gw, gb = torch.autograd.grad(ln(x[b:b + 1].detach()), [ln.weight, ln.bias],
                                     grad[b:b + 1])
        torch.testing.assert_close(reused["weight"][b], gw, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reused["bias"][b], gb, rtol=1e-5, atol=1e-5)


def test_layer_norm_stats_are_used_only_for_the_recorded_input_and_shape():
    ln = nn.LayerNorm(6)
    x = torch.randn(4, 6, requires_grad=True)
    node = ln(x).grad_fn
    assert layer_norm_stats(ln, (x.clone(),), node) is None  # another input's normalisation
    assert layer_norm_stats(nn.LayerNorm((3, 2)), (x,), node) is None  # another shape
    assert layer_norm_stats(ln, (x,), (x * 2).grad_fn) is None  # not a layer norm's node
    assert layer_norm_stats(nn.RMSNorm(6), (x,), node) is None  # not a LayerNorm
    assert layer_norm_stats(ln, (x,), node) is not None


def _opposed(gen: torch.Generator, index: bool) -> Factor:
    """Example 0 of B: two positions with one input (or one embedding row) whose output
    gradients nearly cancel, (1 - 1e-4) apart, at magnitude 1e3: the ghost norm's P² terms
    are ~1e8 times ‖g_0‖². The other examples are plain random."""
    if index:
        idx = torch.randint(0, M, (B, 2), generator=gen)
        w = torch.randn(B, 2, N, generator=gen)
        idx[0, 1] = idx[0, 0]
        w[0, 1] = -(1 - 1e-4) * w[0, 0]
        return Factor(idx, w * 1e3, index=True)
    u, v = torch.randn(B, 2, M, generator=gen), torch.randn(B, 2, N, generator=gen)
    u[0, 1], v[0, 1] = -(1 - 1e-4) * u[0, 0], v[0, 0]
    return Factor(u * 1e3, v)


@pytest.mark.parametrize("index", [False, True], ids=["dense", "index"])
def test_a_cancelling_example_gets_its_true_norm_and_share(index, monkeypatch):
    """fp32 loses such an example's ghost norm (0, negative, or 2x off: its clip factor
    would let it through unclipped); it is formed alone, for its norm and its share of the
    clipped sum (the batch matmul's fp32 rounding is as large as its gradient). The others
    stay on the Grams and the matmul."""
    factor = _opposed(torch.Generator().manual_seed(0), index)
    u = F.one_hot(factor.u, M).double() if index else factor.u.double()
    want = torch.einsum("bpm,bpn->bmn", u, factor.v.double())
    fp32 = (ghost_grad._index_sq(None, None, factor.u, factor.v) if index
            else kernels.ghost_sq_norms(factor.u, factor.v))
    true_sq = want.flatten(1).square().sum(1)
    assert not torch.allclose(fp32[0].double(), true_sq[0], rtol=1e-2)  # fp32 alone
    monkeypatch.setattr(ParamGrad, "_use_ghost", lambda self, growth=1.0: True)
    pg = ParamGrad(torch.Size([M, N]))
    pg.add(factor)
    sq = pg.finish()
    assert pg.retaken.tolist() == [0]
    torch.testing.assert_close(sq.double(), true_sq, rtol=1e-4, atol=0)
    c = 1.0 / sq.sqrt()  # every example clipped to norm 1
    out = torch.empty(M * N)
    pg.clipped_sum(c, out)
    torch.testing.assert_close(out.double(), torch.einsum("b,bmn->mn", c.double(), want)
                               .flatten(), rtol=1e-4, atol=1e-6)
    pg.clipped_sum(torch.eye(B)[0] * c[0], out)  # example 0 alone: norm 1
    assert abs(float(out.double().norm()) - 1) < 1e-5


def test_positions_repeating_one_pattern_are_taken_again(monkeypatch):
    """4096 positions, g and -(1 - 1e-3)g with one input: the Grams' rounding adds up over
    the repeats instead of averaging out (the norm came out 27 % low and the example at
    1.18 C with a check that assumed it averages)."""
    P, m, n = 4096, 8, 8
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(1, 1, n, generator=gen) * 10, torch.randn(1, 1, m, generator=gen)
    sign = torch.cat([torch.ones(P // 2), -(1 - 1e-3) * torch.ones(P // 2)])
    factor = Factor(g * sign[None, :, None], x.expand(1, P, n).contiguous())
    monkeypatch.setattr(ParamGrad, "_use_ghost", lambda self, growth=1.0: True)
    pg = ParamGrad(torch.Size([m, n]))
    pg.add(factor)
    sq = pg.finish()
    want = torch.einsum("bpm,bpn->bmn", factor.u.double(), factor.v.double()).flatten(1)
    assert pg.retaken is not None
    torch.testing.assert_close(sq.double(), want.square().sum(1), rtol=1e-4, atol=0)


def test_random_positions_are_not_taken_again(monkeypatch):
    monkeypatch.setattr(ParamGrad, "_use_ghost", lambda self, growth=1.0: True)
    gen = torch.Generator().manual_seed(1)
    for parts in (CASES["tied dense + index"](gen), [dense(64, gen)], [dense(512, gen)]):
        pg = ParamGrad(torch.Size([M, N]))
        for p in parts:
            pg.add(p)
        pg.finish()
        assert pg.retaken is None


def test_an_example_without_gradient_is_not_taken_again(monkeypatch):
    """All its factors 0 (no target): its Grams are exactly 0, nothing to retake (every such
    example was formed alone, twice, for every ghost-norm parameter)."""
    monkeypatch.setattr(ParamGrad, "_use_ghost", lambda self, growth=1.0: True)
    factor = dense(4, torch.Generator().manual_seed(2))
    factor.u[1] = 0.0
    pg = ParamGrad(torch.Size([M, N]))
    pg.add(factor)
    sq = pg.finish()
    assert pg.retaken is None and sq[1] == 0


@pytest.mark.parametrize("ghost", [True, False], ids=["retaken", "explicit"])
def test_norms_of_millions_of_values_are_summed_exactly(ghost, monkeypatch):
    """fp32 sums of 4M squares came out 1.6e-4 low on CPU, a clipped example 8e-5 above C;
    they are summed in fp64."""
    m = n = 2048
    gen = torch.Generator().manual_seed(3)
    g, x = torch.randn(1, 1, m, generator=gen), torch.randn(1, 1, n, generator=gen)
    factor = Factor(torch.cat([g, -(1 - 1e-4) * g], 1), torch.cat([x, x], 1))
    monkeypatch.setattr(ParamGrad, "_use_ghost", lambda self, growth=1.0: ghost)
    pg = ParamGrad(torch.Size([m, n]))
    pg.add(factor)
    sq = pg.finish()
    assert (pg.retaken is not None) == ghost
    out = torch.empty(m * n)
    pg.clipped_sum(1 / sq.sqrt(), out)
    exact = torch.einsum("bpm,bpn->mn", factor.u.double(), factor.v.double()).square().sum()
    assert abs(float(sq[0].double() / exact) - 1) < 1e-6
    assert abs(float(out.double().norm()) - 1) < 1e-6
