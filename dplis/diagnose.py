"""Where in the model an error came from, added to its message as a note.

An error raised under ``torch.vmap`` comes from torch's internals ("Batching rule not
implemented", "calling .item()") and names no layer. The traceback still holds the frames of
the module calls it went through: the innermost ``nn.Module.__call__`` frame is the layer
that was running.
"""

from __future__ import annotations

from torch import nn


def running_module(error: BaseException, model: nn.Module) -> str | None:
    """``model``'s innermost module running when ``error`` was raised, as "name (Type)", or
    None when it came from outside the model's forward."""
    names = {id(m): n for n, m in model.named_modules()}
    found = None
    tb = error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        module = frame.f_locals.get("self") if frame.f_code.co_name == "_call_impl" else None
        if isinstance(module, nn.Module) and id(module) in names:
            found = module
        tb = tb.tb_next
    if found is None:
        return None
    return f"{names[id(found)] or '<root>'} ({type(found).__name__})"


def note_layer(error: BaseException, model: nn.Module, how: str,
               otherwise: str | None = None) -> None:
    """Note on ``error`` the layer of ``model`` that was running (``running_module``):
    "dplis: raised inside layer <name> (<Type>) <how>"; with none, ``otherwise`` if given."""
    layer = running_module(error, model)
    if layer is not None:
        add_note(error, f"dplis: raised inside layer {layer} {how}")
    elif otherwise is not None:
        add_note(error, otherwise)


def add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)`` (Python ≥ 3.11; nothing on 3.10): shown under the message;
    once (a model may raise the same exception object at every call)."""
    if hasattr(error, "add_note") and note not in getattr(error, "__notes__", ()):
        error.add_note(note)
