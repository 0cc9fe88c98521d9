"""One parameter's per-example gradients, kept factored: squared norms and clipped sums.

The per-example gradient of an [m, n] parameter is g_b = s · Σ_p u_bpᵀ v_bp over positions p
(all uses of the parameter, all K perturbed passes; s = 1/K), with u either dense [B, P, m]
or row indices [B, P] (an embedding: u = one_hot(index), never formed). Per parameter the
cheaper of two ways gives ‖g_b‖² ("mixed" ghost clipping):

- ghost:    s² Σ_{p,p'} (u_p·u_p')(v_p·v_p'), two [B, P, P] Gram matrices; for an index
  position u_p·u_p' is a gather (dense partner) or an equality test (index partner);
- explicit: form g_b [B, m, n] once (bmm for dense u, scatter-add for indices), within
  ``EXPLICIT_MAX_BYTES`` for one parameter and a ``Budget`` for all parameters of the step
  (a parameter beyond either takes the ghost norm, which holds activations only).

The clipped sum Σ_b c_b g_b is then one matmul (or index_add) per factor: book-keeping, no
second backward pass. Vectors (biases, norm weights) arrive as explicit [B, *shape] parts.
"""

from __future__ import annotations

import torch

from . import kernels
from .ghost_rules import Factor
from .kernels.reference import wide_sq_norms

EXPLICIT_MAX_BYTES = 2**28  # per parameter: never form more than 256 MiB of [B, m, n] at once
EXPLICIT_BUDGET_BYTES = 2**30  # per step, all parameters together: 1 GiB


class Budget:
    """Bytes of explicit per-example gradients the parameters of one step may still form;
    a parameter that no longer fits takes the ghost norm (activations only)."""

    def __init__(self, total: int | None = None):
        self.left = EXPLICIT_BUDGET_BYTES if total is None else total


def _cat(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """Concatenate along the position axis (dim 1); None for no parts, one part as is."""
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _gather_cols(u: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[B, P, m] dense u, [B, Q] row ids -> [B, P, Q]: u_p · one_hot(idx_q) = u[b, p, idx[b, q]]."""
    return torch.gather(u, 2, idx.unsqueeze(1).expand(-1, u.shape[1], -1))


class ParamGrad:
    """Per-example gradient [B, *shape] of one parameter, scaled by ``scale`` (1/K)."""

    def __init__(self, shape: torch.Size, scale: float = 1.0, backend: str | None = None,
                 budget: Budget | None = None):
        self.shape = shape
        self.scale = scale
        self.backend = backend  # of kernels.ghost_sq_norms (Triton on CUDA by default)
        self.budget = budget if budget is not None else Budget()
        self.charged = False  # its [B, m, n] bytes are taken from the budget
        self.dense: list[Factor] = []
        self.index: list[Factor] = []
        self.explicit: torch.Tensor | None = None  # unscaled Σ of explicit parts, fp32
        self.owned = False  # ``explicit`` is this object's own buffer (may be added to in place)
        self.shared: dict[tuple, Factor] = {}  # side identity -> held factor fed a model input
        # examples whose ghost norm cancels (``_cancelled``): norm and share of the clipped
        # sum from their gradients formed one by one (``_example``), not from the Grams and
        # the batch matmul, whose fp32 rounding is as large as their gradient; ``formed``:
        # those gradients [m, n] in fp32, in ``retaken``'s order, formed once
        self.retaken: torch.Tensor | None = None
        self.formed: list[torch.Tensor] = []

    def add(self, part: Factor | torch.Tensor) -> None:
        if isinstance(part, Factor):
            if part.invariant:  # a layer fed the model's inputs: fold into a held factor
                sides = part.sides()
                if any(s in self.shared and self.shared[s].absorb(part) for s in sides):
                    return
                self.shared.update(dict.fromkeys(sides, part))
            (self.index if part.index else self.dense).append(part)
            return
        part = part.reshape(part.shape[0], *self.shape).float()
        if self.explicit is None:  # the caller's tensor: not to be changed in place
            self.explicit, self.owned = part, False
        elif self.owned:
            self.explicit.add_(part)
        else:
            self.explicit, self.owned = self.explicit + part, True

    @property
    def empty(self) -> bool:
        return not (self.dense or self.index) and self.explicit is None

    def settle(self, growth: float) -> None:
        """Between perturbed passes: if this parameter will be formed explicitly once the
        positions grew ``growth``-fold (the passes still to come), form it now, so that the
        factors (activations, output gradients) of one pass at a time are held. With explicit
        parts (or formed already) it is formed in any case, as ``finish`` would. Factors of a
        layer fed the model's inputs wait: the next passes' factors fold into them (``absorb``),
        so they neither grow nor are formed more than once."""
        factors = self.dense + self.index
        if factors and not all(f.invariant for f in factors) and self._explicit_form(growth):
            self._materialise()

    def _explicit_form(self, growth: float = 1.0) -> bool:
        """Formed as [B, m, n]: always with explicit parts (or once formed), else by cost."""
        return self.explicit is not None or not self._use_ghost(growth)

    def _use_ghost(self, growth: float = 1.0) -> bool:
        """Ghost norm when its Gram products cost less than forming [B, m, n] (per example)."""
        m, n = self.shape[0], self.shape[1:].numel()
        need = (self.dense or self.index)[0].u.shape[0] * m * n * 4
        if need > EXPLICIT_MAX_BYTES or (not self.charged and need > self.budget.left):
            return True
        if any(f.prefer_explicit for f in self.dense):
            return False
        p_dense = growth * sum(f.positions for f in self.dense)
        p_all = p_dense + growth * sum(f.positions for f in self.index)
        ghost = p_all * p_all * n + p_dense * p_dense * m
        explicit = p_dense * m * n + 8 * m * n  # the products, then [m, n] memory traffic
        return ghost < explicit

    def finish(self) -> torch.Tensor:
        """Squared per-example norms [B] (fp32); picks ghost or explicit for this parameter."""
        return self._unscaled_sq() if self.scale == 1 else self._unscaled_sq() * self.scale ** 2

    def _unscaled_sq(self) -> torch.Tensor:
        if not (self.dense or self.index):
            return wide_sq_norms(_rows(self.explicit))
        if self._explicit_form():
            self._materialise()
            return wide_sq_norms(_rows(self.explicit))
        if not self.index and len(self.dense) == 1 and self.dense[0].positions == 1:
            u, v = self.dense[0].u, self.dense[0].v  # one position: ‖u vᵀ‖² = ‖u‖²‖v‖²
            return wide_sq_norms(u.flatten(1)).mul_(wide_sq_norms(v.flatten(1)))
        u, v = _cat([f.u for f in self.dense]), _cat([f.v for f in self.dense])
        idx, w = _cat([f.u for f in self.index]), _cat([f.v for f in self.index])
        # the dense-dense block: the fused kernel (on a GPU no [B, P, P] Gram is stored)
        sq = None if u is None else kernels.ghost_sq_norms(u, v, backend=self.backend)
        if idx is not None:
            sq_index = _index_sq(u, v, idx, w)
            sq = sq_index if sq is None else sq + sq_index
        redo = _cancelled(sq, u, v, w, self.shape[0] + self.shape[1:].numel())
        if redo is not None:  # their terms cancel: the Gram form cannot tell their norm (in
            # fp64 neither); formed one by one, for their share of the sum too
            examples = [self._example(b) for b in redo.tolist()]
            self.retaken, self.formed = redo, [e.float() for e in examples]
            exact = torch.stack([e.square().sum() for e in examples])
            sq = sq.index_put((redo,), exact.to(sq.dtype))
        return sq

    def _example(self, b: int) -> torch.Tensor:
        """Example b's unscaled gradient [m, n] from the factors, formed in fp64 (exact
        products of fp32 values, sums rounding at 2⁻⁵³ of their terms)."""
        m, n = self.shape[0], self.shape[1:].numel()
        first = (self.dense or self.index)[0].u
        full = torch.zeros(m, n, dtype=torch.float64, device=first.device)
        for f in self.dense:
            full.addmm_(f.u[b].double().T, f.v[b].double())
        for f in self.index:
            full.index_add_(0, f.u[b], f.v[b].double())
        return full

    def _materialise(self) -> None:
        """Add the factors' per-example gradients [B, m, n] (unscaled) to ``explicit``: in
        place once it is this object's own buffer (a K-pass sum costs no extra [B, m, n])."""
        first = (self.dense or self.index)[0].u
        batch, device, dense = first.shape[0], first.device, self.dense
        m, n = self.shape[0], self.shape[1:].numel()
        if self.owned:  # a view: shapes [B, *shape] and [B, m, n] of one contiguous buffer
            full = self.explicit.view(batch, m, n)
        else:
            if dense:
                full, dense = dense[0].full().contiguous(), dense[1:]
            else:
                full = torch.zeros(batch, m, n, device=device)
            if self.explicit is not None:
                full.add_(self.explicit.reshape(batch, m, n))
        for f in dense:
            f.add_to(full)
        for f in self.index:
            full.scatter_add_(1, f.u.unsqueeze(2).expand(-1, -1, n), f.v.float())
        if not self.charged:
            self.budget.left -= full.numel() * full.element_size()
            self.charged = True
        self.explicit, self.owned = full.view(batch, *self.shape), True
        self.dense, self.index, self.shared = [], [], {}

    def clipped_sum(self, c: torch.Tensor | None, out: torch.Tensor) -> None:
        """Write s · Σ_b c_b · g_b (fp32) into ``out`` (flat, |shape| values), after ``finish``
        (or on parts only added: the plain sum); c None: c_b = 1 for every example."""
        if self.scale != 1:
            first = self.explicit if self.explicit is not None else (self.dense or self.index)[0].u
            c = self.scale * (torch.ones(first.shape[0], device=out.device) if c is None else c)
        if self.explicit is not None:
            if c is None:
                torch.sum(_rows(self.explicit), 0, out=out)
            else:
                torch.mm(c.unsqueeze(0), _rows(self.explicit), out=out.view(1, -1))
            return
        out = out.view(self.shape[0], -1)
        retaken = self.retaken
        if retaken is not None:  # their shares below, from their own gradients
            first = (self.dense or self.index)[0].u
            c = torch.ones(first.shape[0], device=out.device) if c is None else c.clone()
            kept = c[retaken].tolist()
            c[retaken] = 0.0
        if not self.dense:
            out.zero_()
        for i, f in enumerate(self.dense):  # the first overwrites ``out``, the others add
            f.weighted_sum(c, out, add=i > 0)
        for f in self.index:
            v = f.v.float() if c is None else f.v.float() * c[:, None, None]
            out.index_add_(0, f.u.flatten(), v.flatten(0, 1))
        if retaken is not None:
            for example, weight in zip(self.formed, kept):
                out.add_(example, alpha=weight)


CANCELLED = 2.0**-24 * 1e4  # fp32's unit roundoff / the relative accuracy asked of ‖g_b‖²
COHERENT = 2.0**-24 * 16  # and of it where the positions' rounding adds up (1/16: ‖g_b‖ ±3 %)


def _cancelled(sq: torch.Tensor, u: torch.Tensor | None, v: torch.Tensor | None,
               w: torch.Tensor | None, width: int) -> torch.Tensor | None:
    """Indices of the examples whose ghost norm fp32 may have lost, or None.

    Σ_{p,q} (u_p·u_q)(v_p·v_q) adds P² terms bounded by S_b² = (Σ_p ‖u_p‖‖v_p‖)² (an index
    position's ‖u_p‖ is 1), itself at most S̄_b² = (‖u_b‖‖v_b‖ + √Q‖w_b‖)² over all dense
    and index positions. Each Gram entry carries about √(m+n)·2⁻²⁴ of its size. Positions
    that add up at random give ‖g_b‖² ≈ S_b²/P and errors that average out to about
    √(m+n)·2⁻²⁴·S_b²/P; where they cancel (an adversary's example: two positions with
    opposite output gradients and one input) the rounding can leave anything, 0 or a
    negative value, and that example would go unclipped; where many positions repeat one
    pattern, their errors add up instead, to about √(m+n)·2⁻²⁴·S_b². So an example whose
    result falls below √(m+n)·2⁻²⁴·S̄_b²·max(10⁴/P, 16) is taken again (``_example``):
    none on the bench's models (there ‖g_b‖²·P/S_b² ≥ 0.5)."""
    bound = 0
    if u is not None:
        bound = _norm(u) * _norm(v)
    if w is not None:
        bound = bound + _norm(w) * w.shape[1]**0.5
    positions = (0 if u is None else u.shape[1]) + (0 if w is None else w.shape[1])
    scale = width**0.5 * max(CANCELLED / max(positions, 1), COHERENT)
    limit = bound.square_().mul_(scale)
    # NaN too (taken again, it says what it is); not an example whose factors are all 0
    # (no target: its Grams are exactly 0)
    redo = ~(sq > limit) & (limit != 0)
    return torch.nonzero(redo).flatten() if bool(redo.any()) else None


def _index_sq(u: torch.Tensor | None, v: torch.Tensor | None, idx: torch.Tensor,
              w: torch.Tensor) -> torch.Tensor:
    """The index-index block of the ghost norm (same row) and twice the dense-index one, in
    fp32: idx [B, Q] rows, w [B, Q, n]; u [B, P, m], v [B, P, n] dense (or None)."""
    w = w.float()
    same = (idx.unsqueeze(2) == idx.unsqueeze(1)).float()
    sq = same.mul_(torch.bmm(w, w.transpose(1, 2))).sum((1, 2), dtype=torch.float64)
    if u is not None:
        cross = _gather_cols(u.float(), idx)  # [B, P, Q]
        sq += 2 * cross.mul_(torch.bmm(v.float(), w.transpose(1, 2))).sum((1, 2),
                                                                          dtype=torch.float64)
    return sq.float()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, *shape] -> [B, |shape|] (a 0-d parameter's [B] gradients -> [B, 1])."""
    return x.reshape(x.shape[0], -1)


def _norm(x: torch.Tensor) -> torch.Tensor:
    """[B, P, d] -> fp32 [B]: each example's L2 norm over all positions (no fp32 copy)."""
    return torch.linalg.vector_norm(x, dim=(1, 2)).float()
