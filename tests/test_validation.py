"""Model validation and fix (BatchNorm -> GroupNorm), like Opacus's ModuleValidator."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import dplis
from dplis import validation


def test_batchnorm_and_running_stats_are_named():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8),
                          nn.InstanceNorm2d(8, track_running_stats=True))
    problems = validation.find_problems(model)
    assert len(problems) == 2
    assert problems[0].startswith("1 (BatchNorm2d)") and "GroupNorm" in problems[0]
    assert problems[1].startswith("2 (InstanceNorm2d)")
    with pytest.raises(ValueError, match="BatchNorm2d"):
        validation.validate(model)


def test_fix_makes_a_trainable_copy():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 2))
    fixed = validation.fix(model)
    assert isinstance(model[1], nn.BatchNorm2d)  # original untouched
    assert isinstance(fixed[1], nn.GroupNorm) and fixed[1].num_channels == 8
    assert validation.find_problems(fixed) == []
    x, y = torch.randn(3, 3, 6, 6), torch.tensor([0, 1, 0])
    g = dplis.private_grad(fixed, F.cross_entropy, x, y, max_grad_norm=1.0, noise_multiplier=0.0)
    assert "1.weight" in g


def test_clean_model_has_no_problem():
    assert validation.find_problems(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))) == []


@pytest.mark.parametrize("bn", [nn.BatchNorm2d(6, track_running_stats=False),
                                nn.BatchNorm2d(6, affine=False)])
def test_fix_takes_batchnorms_without_buffers_or_parameters(bn):
    fixed = validation.fix(nn.Sequential(nn.Conv2d(3, 6, 3), bn))
    assert isinstance(fixed[1], nn.GroupNorm) and validation.find_problems(fixed) == []


def test_fix_keeps_the_dtype_trainability_and_mode():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)).double()
    model[1].requires_grad_(False)
    model.eval()
    fixed = validation.fix(model)
    assert fixed[1].weight.dtype == torch.float64 and not fixed[1].weight.requires_grad
    assert not fixed[1].training
    assert fixed(torch.randn(2, 3, 5, 5, dtype=torch.float64)).dtype == torch.float64


def test_fix_replaces_the_root_and_every_name_of_a_shared_module():
    assert isinstance(validation.fix(nn.BatchNorm1d(4)), nn.GroupNorm)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = self.b = nn.BatchNorm1d(4)

    fixed = validation.fix(Shared())
    assert isinstance(fixed.a, nn.GroupNorm) and fixed.a is fixed.b


def test_fix_freezes_only_what_was_frozen_and_keeps_an_instance_norms_affine():
    bn = nn.BatchNorm1d(4)
    bn.weight.requires_grad_(False)
    norm = nn.InstanceNorm1d(4, affine=True, track_running_stats=True)
    norm.weight.data.fill_(3.0)
    fixed = validation.fix(nn.Sequential(bn, norm))
    assert not fixed[0].weight.requires_grad and fixed[0].bias.requires_grad
    assert not fixed[1].track_running_stats and torch.equal(fixed[1].weight, torch.full((4,), 3.0))
