"""The model's state across a private step: a forward must not write the batch into it.

``state_kept`` wraps every engine's step: buffers or parameters added, removed, rebound or
changed in place during the forward carry a value computed from the private batch without
noise, which the step would release with the model; they are refused and, on verification
steps, restored from copies. ``replayable`` lets a check run a forward several times alike.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

KEPT_PARAMETER_BYTES = 2**30  # verification steps copy the parameters up to this size
_TENSOR_DICTS = ("_buffers", "_parameters")
_MISSING = object()


def _attributes(modules: list[nn.Module]) -> list[dict]:
    """Each module's plain attributes (all but its parameter and buffer tables), shallow."""
    return [{k: v for k, v in vars(m).items() if k not in _TENSOR_DICTS} for m in modules]


def _put_back(modules: list[nn.Module], attributes: list[dict]) -> None:
    """Give each module the plain attributes ``_attributes`` took (added ones removed)."""
    for m, kept in zip(modules, attributes):
        for k in [k for k in vars(m) if k not in kept and k not in _TENSOR_DICTS]:
            delattr(m, k)
        vars(m).update(kept)


def _generators(attributes: list[dict]) -> list[tuple[torch.Generator, torch.Tensor]]:
    """The ``torch.Generator`` objects the modules hold, with their states (``type`` is, not
    ``isinstance``: 2 µs a step instead of 20 on the bench MLP's 115 attributes)."""
    return [(g, g.get_state()) for kept in attributes for g in kept.values()
            if type(g) is torch.Generator]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and values, NaN equal to NaN (sparse layouts compared dense)."""
    if a.shape != b.shape or a.dtype != b.dtype or a.layout != b.layout:
        return False
    if a.layout != torch.strided:
        a, b = a.to_dense(), b.to_dense()
    return bool(torch.equal(a, b) or (a.is_floating_point()
                                      and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)))


@contextlib.contextmanager
def state_kept(model: nn.Module, keep_copies: bool) -> Iterator[None]:
    """Refuse a step whose forward changed the model's buffers or parameters (a running mean
    of the batch, ``F.embedding(..., max_norm=...)``): a value drawn from the private batch
    with no noise, released with the model. Seen at every step: an entry added, removed or
    rebound in a module's buffers or parameters (``register_buffer`` in forward, a ``None``
    buffer filled), an in-place change (version counters). With ``keep_copies``
    (verification steps) also by value (a write through ``.data``), the buffers, and the
    parameters when they take at most ``KEPT_PARAMETER_BYTES``, being copied first. A change
    is undone (entries put back, copies written back) and raises ValueError, chained to the
    body's own error if it failed, naming what still holds the batch's value when no copy
    could restore it. The modules' plain attributes (a call counter, a cache length), the
    ``torch.Generator`` objects they hold and Python's global RNG are put back as they were
    when the body fails or a change is refused, so that a refused step, or an engine tried
    and given up, leaves them as it found them (attributes by a shallow copy: an object
    changed in place, such as a list appended to, stays changed; numpy's global RNG, whose
    state takes 25 µs to read, is not kept)."""
    modules = list(model.modules())
    entries = [{kind: dict(getattr(m, kind)) for kind in _TENSOR_DICTS} for m in modules]
    versions = {id(t): t._version for e in entries for d in e.values() for t in d.values()
                if t is not None}
    copies: dict[int, torch.Tensor] = {}
    attributes = _attributes(modules)
    generators, python_state = _generators(attributes), random.getstate()
    if keep_copies:
        small = sum(p.numel() * p.element_size() for p in model.parameters()) \
            <= KEPT_PARAMETER_BYTES
        for e in entries:
            for kind, d in e.items():
                for t in d.values():
                    if t is not None and id(t) not in copies and (kind == "_buffers" or small):
                        copies[id(t)] = t.detach().clone()
    error: BaseException | None = None
    try:
        yield
    except BaseException as e:
        error = e
    changed, lost = [], []
    for m, e in zip(modules, entries):
        for kind, before in e.items():
            now = getattr(m, kind)
            names = {n for n in (*before, *now) if now.get(n, _MISSING) is not before.get(
                n, _MISSING)}
            names |= {n for n, t in before.items() if t is not None and (
                t._version != versions[id(t)]
                or (id(t) in copies and not _same(t, copies[id(t)])))}
            for n in names:
                changed.append((m, n))
                t = before.get(n)
                if t is not None and id(t) in copies:
                    with torch.no_grad():
                        t.copy_(copies[id(t)])
                elif t is not None and t._version != versions[id(t)]:
                    lost.append((m, n))
            if names:
                now.clear()
                now.update(before)
    if changed or error is not None:
        _put_back(modules, attributes)
        random.setstate(python_state)
        for g, state in generators:
            g.set_state(state)
    if changed:
        names = {id(m): n for n, m in model.named_modules()}

        def label(pairs: list) -> list[str]:
            return sorted({f"{names[id(m)]}.{n}".lstrip(".") for m, n in pairs})

        raise ValueError(
            f"the model changed {label(changed)} during its forward: a value computed from "
            "the private batch without noise (e.g. a running mean of the batch, or "
            "F.embedding(..., max_norm=...)), which a private step cannot release; updates "
            "that do not depend on the data (a cache of rotary tables) are refused alike. "
            "Move such updates out of forward, or compute them on a copy"
            + (f"; {label(lost)} still hold that value: restore or re-initialise them"
               if lost else "; they are restored")) from error
    if error is not None:
        raise error


def replayable(model: nn.Module) -> Callable[..., None]:
    """Capture what a forward may advance besides torch's global generators — Python's and
    numpy's global RNGs, ``torch.Generator`` objects the modules hold, the modules' plain
    attributes (a call counter) — and return a function that puts it all back: called
    before each of several forwards they run alike, and after the last, the caller's state
    is as it was. ``reset(seed)`` then reseeds those generators with ``seed`` (a forward
    that draws other random numbers)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    modules = list(model.modules())
    attributes = _attributes(modules)
    generators = _generators(attributes)

    def reset(seed: int | None = None) -> None:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        for g, state in generators:
            g.set_state(state)
        _put_back(modules, attributes)
        if seed is not None:
            random.seed(seed)
            np.random.seed(seed)
            for g, _ in generators:
                g.manual_seed(seed)

    return reset
