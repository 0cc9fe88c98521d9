"""torch's recurrent layers (``nn.RNN``, ``nn.GRU``, ``nn.LSTM``) under ``torch.vmap``.

- Called without ``hx``, the layers make their zero state with ``torch.zeros``, which
  under vmap is a plain tensor; the fused recurrent op then writes the batched step
  results into it and fails ("output with shape [1, 1, 1, H] doesn't match the broadcast
  shape [1, B, 1, H]"; ``nn.RNN``, ``nn.GRU``, and ``nn.LSTM`` with ``proj_size``). While
  ``vmap_ready`` is active such calls get the same zeros derived from their input, so they
  carry vmap's batch dimension; the values, and so the gradients, are those of the layer's
  own default. A state passed by the caller is used as it is.
- Dropout between stacked layers (``dropout > 0``, ``num_layers > 1``, training mode)
  draws its masks inside the fused op, which vmap cannot give each example its own of
  ("Cannot ask for different inplace randomness on an unbatched tensor"): refused with a
  message naming the layer (the loop engine runs it: "auto" falls back to it).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn


def zero_state(module: nn.RNNBase, input: torch.Tensor) -> torch.Tensor | tuple:
    """The layer's default initial state in the input's dtype, derived from ``input`` (so
    batched under vmap when the input is): zeros [layers · directions, (N,) H], for an LSTM
    the pair (h: its ``proj_size`` or H wide, c: H wide)."""
    lead = (module.num_layers * (2 if module.bidirectional else 1),
            *((input.shape[0 if module.batch_first else 1],) if input.dim() == 3 else ()))
    zero = torch.zeros_like(input.reshape(-1)[:1])

    def zeros(width: int) -> torch.Tensor:
        return zero.expand(*lead, width).contiguous()

    if isinstance(module, nn.LSTM):
        return zeros(module.proj_size or module.hidden_size), zeros(module.hidden_size)
    return zeros(module.hidden_size)


def _prepared(module: nn.RNNBase, args: tuple, kwargs: dict, *, names: dict
              ) -> tuple[tuple, dict] | None:
    """Forward pre-hook: refuse dropout between layers; a call without ``hx`` (absent or
    None) gets ``zero_state``."""
    if module.training and module.dropout > 0 and module.num_layers > 1:
        raise RuntimeError(  # a refusal of torch.vmap's: "auto" then runs the loop engine
            f"layer {names[module]} ({type(module).__name__}) applies dropout={module.dropout} "
            "between its stacked layers in training mode, which torch.vmap cannot draw per "
            "example (the masks are made inside the fused recurrent op). Use engine='loop', "
            "or set its dropout to 0 and apply nn.Dropout between single-layer recurrent "
            "modules, or call .eval() on it")
    input = args[0] if args else kwargs.get("input")
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    if not isinstance(input, torch.Tensor) or hx is not None:
        return None  # a PackedSequence, or the caller's own state: left to the layer
    state = zero_state(module, input)
    if len(args) > 1:
        return (args[0], state, *args[2:]), kwargs
    return args, {**kwargs, "hx": state}


# the layers whose calls this module knows: torch's own forwards (a subclass that overrides
# forward may take other arguments, and is left as it is)
FORWARDS = (nn.RNN.forward, nn.GRU.forward, nn.LSTM.forward)


@contextlib.contextmanager
def vmap_ready(model: nn.Module) -> Iterator[None]:
    """While active, the recurrent layers of ``model`` (torch's ``forward``, subclasses
    included) run under vmap as described above (forward pre-hooks, removed afterwards,
    also on error)."""
    layers = [m for m in model.modules() if type(m).forward in FORWARDS]
    names = {m: n or "<root>" for n, m in model.named_modules()} if layers else {}
    handles = [m.register_forward_pre_hook(functools.partial(_prepared, names=names),
                                           with_kwargs=True) for m in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
