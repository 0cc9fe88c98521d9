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
