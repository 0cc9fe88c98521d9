"""Per-layer rules of the ghost engine: per-example gradients in factored or explicit form.

A rule sees one call of a layer — its inputs and the gradient of Σ_b ℓ_b w.r.t. its output —
and returns, per direct parameter, the per-example gradient either

- ``Factor(u, v)``: Σ_p u[b, p]ᵀ v[b, p] over positions p (a matrix parameter [m, n]; u is
  [B, P, m] dense, or [B, P] int64 row indices for an embedding), never formed unless
  ``Factor.full`` is asked for (``ConvFactor`` unfolds its input only for the ghost norm and
  forms per-example gradients by a grouped convolution); or
- an explicit tensor [B, *shape] (vectors: biases, norm weights).

Registered like Opacus's grad samplers: ``RULES[type] = rule``. Linear, Embedding, Conv1d/2d,
LayerNorm, GroupNorm, RMSNorm and Hugging Face's GPT-2 ``Conv1D`` have rules; other layers
use the vmap fallback.
"""

from __future__ import annotations

import functools
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
    prefer_explicit = False  # class attribute: form [B, m, n] whenever memory allows
    invariant = False  # set on a layer call fed a model input: every pass reads the same input

    @property
    def positions(self) -> int:
        return self.v.shape[1]

    def sides(self) -> tuple[tuple, ...]:
        """``identity`` of each side that another factor may share (the layer's input)."""
        return (identity(self.u),) if self.index else (identity(self.u), identity(self.v))

    def absorb(self, other: Factor) -> bool:
        """Take in ``other``'s per-example gradients if one side is the same tensor (a layer
        fed the model's inputs, in every perturbed pass): Σ uᵀv + Σ uᵀv' = Σ uᵀ(v + v'), one
        factor formed once. The summed side becomes fp32. False (unchanged) otherwise."""
        if type(other) is not type(self) or other.index != self.index:
            return False
        if identity(self.u) == identity(other.u):
            self.v = self.v.float() + other.v.float()
        elif not self.index and identity(self.v) == identity(other.v):
            self.u = self.u.float() + other.u.float()
        else:
            return False
        return True

    def full(self) -> torch.Tensor:
        """The per-example gradients [B, m, n] in fp32 (dense u only)."""
        return torch.bmm(self.u.float().transpose(1, 2), self.v.float())

    def add_to(self, full: torch.Tensor) -> None:
        """full [B, m, n] += the per-example gradients, without a temporary (dense u only)."""
        full.baddbmm_(self.u.float().transpose(1, 2), self.v.float())

    def weighted_sum(self, c: torch.Tensor | None, out: torch.Tensor, add: bool) -> None:
        """out [m, n] (fp32) = (or += with ``add``) Σ_b c_b Σ_p u_bpᵀ v_bp (dense u only):
        one matmul over all positions, the narrower side weighted; c None: all ones."""
        u, v = self.u.float(), self.v.float()
        if c is not None:
            if u.shape[2] <= v.shape[2]:
                u = u * c[:, None, None]
            else:
                v = v * c[:, None, None]
        if add:
            out.addmm_(u.flatten(0, 1).T, v.flatten(0, 1))
        else:
            torch.mm(u.flatten(0, 1).T, v.flatten(0, 1), out=out)


class ConvFactor(Factor):
    """A convolution's weight gradient: u = output gradients [B, L, C_out], v = unfolded input
    patches [B, L, C_in·k·k] (built on first use: unfolding costs more than the convolution).

    ``full`` forms the per-example gradients as ONE convolution backward with the batch folded
    into the channels (groups = B). Measured on CPU (mkldnn, the paper CNN at batch 64) it costs
    half of unfold + Gram products or less, even where the flop count favours the ghost norm,
    so it is preferred whenever the [B, m, n] gradients fit in memory.
    """

    prefer_explicit = True

    def __init__(self, x: torch.Tensor, grad: torch.Tensor, geometry: dict):
        self.x, self.grad, self.geometry, self.index = x, grad, geometry, False

    @property
    def positions(self) -> int:
        return self.grad[0, 0].numel()

    @property
    def u(self) -> torch.Tensor:
        return self.grad.flatten(2).transpose(1, 2)

    @functools.cached_property
    def v(self) -> torch.Tensor:
        g = self.geometry
        return F.unfold(self.x, g["kernel"], dilation=g["dilation"], padding=g["padding"],
                        stride=g["stride"]).transpose(1, 2)

    def full(self) -> torch.Tensor:
        g, (batch, c_in, *spatial), c_out = self.geometry, self.x.shape, self.grad.shape[1]
        x, grad = self.x.float(), self.grad.float()  # bf16 autocast records mixed dtypes
        if c_in == 1:
            return self._full_one_channel(x, grad)
        # only the weight's shape is read: a zero-stride view, no [B·C_out, C_in, k, k] buffer
        weight = x.new_empty((1,) * (2 + len(g["kernel"]))).expand(batch * c_out, c_in,
                                                                   *g["kernel"])
        grad_w = torch.ops.aten.convolution_backward(
            grad.reshape(1, batch * c_out, *grad.shape[2:]), x.reshape(1, batch * c_in, *spatial),
            weight, None, list(g["stride"]), list(g["padding"]), list(g["dilation"]), False,
            [0, 0], batch, [False, True, False])[1]
        return grad_w.reshape(batch, c_out, -1)

    def weighted_sum(self, c: torch.Tensor | None, out: torch.Tensor, add: bool) -> None:
        """As ``Factor.weighted_sum``: the layer's ordinary weight gradient (one convolution
        backward, no unfold) of the output gradients weighted by c_b."""
        g, c_in, c_out = self.geometry, self.x.shape[1], self.grad.shape[1]
        grad = self.grad.float()
        if c is not None:
            grad = grad * c.view(-1, *(1,) * (grad.dim() - 1))
        weight = grad.new_empty((1,) * (2 + len(g["kernel"]))).expand(c_out, c_in, *g["kernel"])
        summed = torch.ops.aten.convolution_backward(
            grad, self.x.float(), weight, None, list(g["stride"]), list(g["padding"]),
            list(g["dilation"]), False, [0, 0], 1, [False, True, False])[1].reshape(out.shape)
        out.add_(summed) if add else out.copy_(summed)

    def sides(self) -> tuple[tuple, ...]:
        return (identity(self.x),)

    def absorb(self, other: Factor) -> bool:
        """As ``Factor.absorb``, for the same input x: the output gradients are summed."""
        if type(other) is not ConvFactor or other.geometry != self.geometry \
                or identity(self.x) != identity(other.x):
            return False
        self.grad = self.grad.float() + other.grad.float()
        return True

    def _full_one_channel(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """C_in = 1: the per-example gradients [B, C_out, k·k] as ONE forward convolution of
        the padded input [1, B, H, W] (the batch as channels) by the output gradients as B
        groups of C_out kernels [Ho, Wo]; stride and dilation swap roles:
        G[b, o, i, j] = Σ_{y,x} grad[b, o, y, x] · x_pad[b, 0, d·i + s·y, d·j + s·x].
        On CPU (mkldnn) it took 0.45–0.76× the time of the grouped backward on the four
        one-channel geometries measured; for C_in = 2–4 it was mixed, from 8 on slower."""
        g, batch, c_out, out_size = self.geometry, x.shape[0], grad.shape[1], grad.shape[2:]
        # the rows and columns the kernels reach (no output beyond the kernel's size)
        reach = [d * (k - 1) + s * (o - 1) + 1 for d, k, s, o in
                 zip(g["dilation"], g["kernel"], g["stride"], out_size)]
        padded = F.pad(x, [p for p in reversed(g["padding"]) for _ in range(2)])
        padded = padded[:, :, :reach[0], :reach[1]].transpose(0, 1)
        kernels = grad.reshape(batch * c_out, 1, *out_size)
        out = F.conv2d(padded, kernels, stride=g["dilation"], dilation=g["stride"], groups=batch)
        return out.reshape(batch, c_out, -1)

    def add_to(self, full: torch.Tensor) -> None:
        full.add_(self.full())


def identity(t: torch.Tensor) -> tuple:
    """Equal for two tensors holding the same values by construction: the same view of one
    storage (address, device, dtype, shape, strides); equal copies differ."""
    return t.data_ptr(), t.device, t.dtype, tuple(t.shape), t.stride()


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
    # (max_norm and sparse=True are refused by dplis.validation, scale_grad_by_freq by
    # ghost.refuse_unsupported)
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
    geometry = {"kernel": tuple(kernel), "dilation": tuple(dilation), "padding": tuple(padding),
                "stride": tuple(stride)}
    out: Contribution = {"weight": ConvFactor(x, grad, geometry)}
    if module.bias is not None:
        out["bias"] = grad.flatten(2).sum(2)
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
def layer_norm(module: nn.LayerNorm, args: tuple, grad: torch.Tensor,
               saved: tuple[torch.Tensor, torch.Tensor] | None = None) -> Contribution:
    """``saved``: the forward's (mean, rstd) [*, 1, ...] (``layer_norm_stats``): x̂ = (x − mean)
    · rstd, half the cost of normalising x again (which ``saved=None`` does)."""
    if saved is None:
        normed = F.layer_norm(args[0], module.normalized_shape, eps=module.eps)
    else:
        normed = (args[0] - saved[0]).mul_(saved[1])
    return _affine(module, normed, grad, len(module.normalized_shape))


def layer_norm_stats(module: nn.Module, args: tuple, node: object
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The mean and rstd an ``nn.LayerNorm`` call computed, from autograd's node that made its
    output (read before the backward frees them): only if that node normalised exactly the
    recorded input ``args[0]`` over the module's shape; None otherwise (the rule then
    normalises again)."""
    if type(module) is not nn.LayerNorm or type(node).__name__ != "NativeLayerNormBackward0" \
            or not args or not isinstance(args[0], torch.Tensor):
        return None
    if tuple(node._saved_normalized_shape) != tuple(module.normalized_shape) \
            or identity(node._saved_input) != identity(args[0]):
        return None
    return node._saved_result1.detach(), node._saved_result2.detach()


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
