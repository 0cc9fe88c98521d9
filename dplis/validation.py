"""Model validation: reject layers that break per-example privacy, and fix them.

Like Opacus's ModuleValidator.

A layer breaks per-example privacy when its forward mixes examples of a batch
(BatchNorm's batch statistics) or updates state from them (running statistics, an
Embedding's max_norm renormalising the rows of the tokens it sees).
"""

from __future__ import annotations

import copy
import itertools

from torch import nn

_BATCHNORM = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)
_INSTANCENORM = nn.modules.instancenorm._InstanceNorm


def find_problems(model: nn.Module) -> list[str]:
    """One message per offending sub-module, naming it; [] when the model is fine."""
    problems = []
    for name, module in model.named_modules():
        label = name or "<root>"
        if isinstance(module, _BATCHNORM):
            problems.append(
                f"{label} ({type(module).__name__}) mixes examples through batch statistics; "
                "replace it with GroupNorm (dplis.validation.fix does this)"
            )
        elif isinstance(module, _INSTANCENORM) and module.track_running_stats:
            problems.append(
                f"{label} ({type(module).__name__}) updates running statistics from the batch; "
                "use track_running_stats=False (dplis.validation.fix does this)"
            )
        elif isinstance(module, nn.Embedding) and module.sparse and module.weight.requires_grad:
            problems.append(
                f"{label} (Embedding) has sparse=True: a private gradient is dense (the noise "
                "covers every row, used or not); use sparse=False"
            )
        elif isinstance(module, nn.Embedding) and module.max_norm is not None:
            problems.append(
                f"{label} (Embedding) has max_norm={module.max_norm}: every forward "
                "renormalises, in place, the rows of the tokens it sees, a change to the "
                "weights from the batch that no noise covers; use max_norm=None"
            )
    if not any(p.requires_grad for p in model.parameters()):
        problems.append("the model has no trainable parameter (requires_grad=True): "
                        "nothing to train")
    return problems


def validate(model: nn.Module) -> None:
    """Raise ValueError listing every problem found by ``find_problems``."""
    problems = find_problems(model)
    if problems:
        raise ValueError("model is not compatible with per-example DP:\n  " + "\n  ".join(problems))


def _group_norm_for(bn: nn.Module) -> nn.GroupNorm:
    channels = bn.num_features
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(min(groups, channels), channels, affine=bn.affine)


def _replacement(module: nn.Module) -> nn.Module | None:
    """What ``fix`` puts in place of ``module`` (None: it stays), on its device and dtype,
    frozen if it was, in its train/eval mode."""
    if isinstance(module, _BATCHNORM):
        new: nn.Module = _group_norm_for(module)  # another normalisation: fresh affine
    elif isinstance(module, _INSTANCENORM) and module.track_running_stats:
        new = type(module)(module.num_features, eps=module.eps, affine=module.affine,
                           track_running_stats=False)
        if module.affine:  # the same normalisation: its learned affine carries over
            new.load_state_dict({k: module.state_dict()[k] for k in ("weight", "bias")})
    else:
        return None
    like = next(itertools.chain(module.parameters(), module.buffers()), None)
    if like is not None:
        new.to(device=like.device, dtype=like.dtype if like.is_floating_point() else None)
    own = dict(module.named_parameters())
    for name, p in new.named_parameters():  # frozen where it was
        if name in own:
            p.requires_grad_(own[name].requires_grad)
    return new.train(module.training)


def fix(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with BatchNorm -> GroupNorm and instance norms without running
    stats (the model itself replaced if it is one; a module registered under several names
    replaced under each)."""
    model = copy.deepcopy(model)
    root = _replacement(model)
    if root is not None:
        return root
    done: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if id(module) not in done:
            replacement = _replacement(module)
            if replacement is None:
                continue
            done[id(module)] = replacement
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, done[id(module)])
    return model
