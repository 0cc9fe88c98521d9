"""Per-layer rules of the ghost engine: per-example gradients in factored or explicit form.

A rule sees one call of a layer — its inputs and the gradient of Σ_b ℓ_b w.r.t. its output —
and returns, per direct parameter, the per-example gradient either

- ``Factor(u, v)``: Σ_p u[b, p]ᵀ v[b, p] over positions p (a matrix parameter [m, n]; u is
  [B, P, m] dense, or [B, P] int64 row indices for an embedding), never formed; or
- an explicit tensor [B, *shape] (vectors: biases, norm weights).

Registered like Opacus's grad samplers: ``RULES[type] = rule``. Linear, Embedding, Conv1d/2d,
LayerNorm, GroupNorm, RMSNorm and Hugging Face's GPT-2 ``Conv1D`` have rules; other layers
use the vmap fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class Factor:
    """Per-example gradient Σ_p u[b,p]ᵀ v[b,p] of an [m, n] matrix; ``index``: u holds row ids."""

    u: torch.Tensor
    v: torch.Tensor
    index: bool = False


class Unsupported(Exception):
    """This call of the layer has no rule (the engine then uses the vmap fallback)."""


Contribution = dict[str, "Factor | torch.Tensor"]
Rule = Callable[[nn.Module, tuple, torch.Tensor], Contribution]
RULES: dict[type, Rule] = {}
NAMED_RULES: dict[str, Rule] = {}  # "module.Class" of optional libraries, not imported here


def rule_for(module: nn.Module) -> Rule | None:
    kind = type(module)
    return RULES.get(kind) or NAMED_RULES.get(f"{kind.__module__}.{kind.__name__}")


def register(*types: type) -> Callable[[Rule], Rule]:
    def deco(rule: Rule) -> Rule:
        for t in types:
            RULES[t] = rule
        return rule
    return deco


def _positions(t: torch.Tensor) -> torch.Tensor:
    """[B, ..., d] -> [B, P, d] (P = product of the middle dims; 1 for [B, d])."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


@register(nn.Linear)
def linear(module: nn.Linear, args: tuple, grad: torch.Tensor) -> Contribution:
    a, g = _positions(args[0]), _positions(grad)
    out: Contribution = {"weight": Factor(g, a)}
    if module.bias is not None:
        out["bias"] = g.sum(1)
    return out


@register(nn.Embedding)
def embedding(module: nn.Embedding, args: tuple, grad: torch.Tensor) -> Contribution:
    if module.max_norm is not None or module.sparse:
        raise Unsupported("Embedding with max_norm or sparse=True")
    idx = args[0].reshape(args[0].shape[0], -1)
    g = _positions(grad)
    if module.padding_idx is not None:  # torch gives the padding row no gradient
        g = g * (idx != module.padding_idx).unsqueeze(-1).to(g.dtype)
    return {"weight": Factor(idx, g, index=True)}


@register(nn.Conv1d, nn.Conv2d)
def conv(module: nn.Conv1d | nn.Conv2d, args: tuple, grad: torch.Tensor) -> Contribution:
    if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise Unsupported("Conv with groups > 1, a padding mode or string padding")
    x = args[0]
    if isinstance(module, nn.Conv1d):  # a 1-D conv is a 2-D conv of height 1
        x, grad = x.unsqueeze(2), grad.unsqueeze(2)
        kernel, dilation = (1, *module.kernel_size), (1, *module.dilation)
        padding, stride = (0, *module.padding), (1, *module.stride)
    else:
        kernel, dilation = module.kernel_size, module.dilation
        padding, stride = module.padding, module.stride
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [B, C·k, L]
    g = grad.flatten(2)  # [B, C_out, L]
    out: Contribution = {"weight": Factor(g.transpose(1, 2), cols.transpose(1, 2))}
    if module.bias is not None:
        out["bias"] = g.sum(2)
    return out


def _affine(module: nn.Module, normed: torch.Tensor, grad: torch.Tensor, keep: int) -> Contribution:
    """weight/bias gradients of y = x̂·w + b, summed over all dims but batch and ``keep`` last."""
    def reduce(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], -1, *t.shape[t.dim() - keep:]).sum(1)

    out: Contribution = {}
    if getattr(module, "weight", None) is not None:
        out["weight"] = reduce(grad * normed)
    if getattr(module, "bias", None) is not None:
        out["bias"] = reduce(grad)
    return out


@register(nn.LayerNorm)
def layer_norm(module: nn.LayerNorm, args: tuple, grad: torch.Tensor) -> Contribution:
    normed = F.layer_norm(args[0], module.normalized_shape, eps=module.eps)
    return _affine(module, normed, grad, len(module.normalized_shape))


@register(nn.RMSNorm)
def rms_norm(module: nn.RMSNorm, args: tuple, grad: torch.Tensor) -> Contribution:
    normed = F.rms_norm(args[0], module.normalized_shape, eps=module.eps)
    return _affine(module, normed, grad, len(module.normalized_shape))


@register(nn.GroupNorm)
def group_norm(module: nn.GroupNorm, args: tuple, grad: torch.Tensor) -> Contribution:
    normed = F.group_norm(args[0], module.num_groups, eps=module.eps)
    # weight/bias are per channel (dim 1): move channels last, then reduce like the others
    return _affine(module, normed.movedim(1, -1), grad.movedim(1, -1), 1)


def hf_conv1d(module: nn.Module, args: tuple, grad: torch.Tensor) -> Contribution:
    """transformers' GPT-2 Conv1D: y = x W + b with W [in, out] (a transposed Linear)."""
    a, g = _positions(args[0]), _positions(grad)
    return {"weight": Factor(a, g), "bias": g.sum(1)}


NAMED_RULES["transformers.pytorch_utils.Conv1D"] = hf_conv1d
