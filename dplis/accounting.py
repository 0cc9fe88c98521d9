"""Privacy accounting for the Poisson-subsampled Gaussian mechanism (pure functions + a thin class).

"prv": the PRV accountant of Gopi et al. 2021 (package ``prv-accountant``, its truncated PRVs'
means integrated afresh: ``_Truncated``); ε reported is the upper end of its (lower, estimate,
upper) interval, or the RDP ε where that is smaller (both are upper bounds), so it is never
under-stated.
"rdp": Rényi-DP composition (``prv_accountant.other_accountants.RDP``, after TF Privacy); looser.
A history is a list of (noise_multiplier, sample_rate, steps) segments, composed together.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import numpy as np
from prv_accountant import (
    PoissonSubsampledGaussianMechanism,
    PRVAccountant,
    composers,
    discretisers,
)
from prv_accountant.accountant import compute_safe_domain_size
from prv_accountant.domain import Domain
from prv_accountant.other_accountants import RDP
from prv_accountant.privacy_random_variables import PrivacyRandomVariableTruncated
from scipy import integrate

from . import checks

ACCOUNTANTS = ("prv", "rdp")
NEGLIGIBLE_NOISE = 1e-30  # a noise multiplier below it counts as none: ε = inf
Segment = tuple[float, float, int]


def _accountant(name: str) -> str:
    return checks.choice("accountant", name, ACCOUNTANTS)


def _mechanisms(history: Sequence[Segment]) -> tuple[list, list[int]]:
    prvs = [PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=s)
            for s, q, _ in history]
    return prvs, [n for _, _, n in history]


def _rdp_epsilon(history: Sequence[Segment], delta: float) -> float:
    prvs, steps = _mechanisms(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return max(0.0, float(RDP(prvs).compute_epsilon(delta, steps)[2]))  # < 0 at large δ


MEAN_POINTS_PER_DECADE = 4  # breakpoints of the truncated PRV's mean integral, per side


class _Truncated(PrivacyRandomVariableTruncated):
    """prv-accountant's PRV truncated to the accountant's grid [−L, L], with its mean
    integrated between log-spaced breakpoints (``MEAN_POINTS_PER_DECADE`` a decade, from
    10⁻⁵ out to L, and 0) and its cdf read in long double (in float64 the PRV's exp(t)
    overflows past t = 709.78 and the cdf reads 1 there). prv-accountant 0.2.0 integrates
    between fixed points (±10⁻⁵ … ±0.1, then out to ±L), and on a wide grid (large ε over
    many steps) quad misses where the cdf rises: the mean came out 3.5 % low at L = 190 and
    92 % at 5 615, and the discretised PRV, shifted to that mean at every step, moved ε by
    the error times the steps (171.9 for an exact 175.6 at q = 1, σ = 21.08, 10⁵ steps).
    The cdf is the library's, not re-based at −L: on this grid the mass below −L is far
    below δ, but a window cutting off mass on the left would get a wrong mean."""

    def mean(self) -> float:
        def cdf(t: float) -> float:
            return float(self.cdf(np.longdouble(t)))

        def side(end: float) -> np.ndarray:  # 10⁻⁵ … |end|, log-spaced
            top = math.log10(max(abs(end), 1e-5))
            return np.logspace(-5, top, max(2, math.ceil((top + 5) * MEAN_POINTS_PER_DECADE)))

        points = np.unique(np.clip(np.concatenate(
            [[self.t_min], -side(self.t_min), [0.0], side(self.t_max), [self.t_max]]),
            self.t_min, self.t_max))
        # ∫ t dF = [t F] − ∫ F dt over [t_min, t_max], the integral piece by piece
        ends = points[-1] * cdf(points[-1]) - points[0] * cdf(points[0])
        return ends - sum(integrate.quad(cdf, left, right, limit=500)[0]
                          for left, right in zip(points[:-1], points[1:]))


class _Accountant(PRVAccountant):
    """``PRVAccountant`` over ``_Truncated`` PRVs: its own construction (the grid of Gopi et
    al.'s theorem 5.5 on the safe domain of their remark 5.6), the truncation swapped."""

    def __init__(self, prvs: list, steps: list[int], eps_error: float, delta_error: float):
        self.prvs, self.max_self_compositions = prvs, steps
        self.eps_error, self.delta_error = eps_error, delta_error
        half = compute_safe_domain_size(prvs, steps, eps_error=eps_error,
                                        delta_error=delta_error)
        mesh = eps_error / math.sqrt(sum(steps) / 2 * math.log(12 / delta_error))
        domain = Domain.create_aligned(-half, half, mesh)
        self.composer = composers.Heterogeneous(
            [discretisers.CellCentred().discretise(_Truncated(p, domain.t_min(), domain.t_max()),
                                                   domain) for p in prvs])


def prv_bounds(history: Sequence[Segment], delta: float, *, rdp: float | None = None
               ) -> tuple[float, float, float]:
    """(lower, estimate, upper) ε of the PRV accountant for a history (``rdp``: its RDP ε,
    if the caller has it).

    The ε grid error is 0.01, or 0.1 % of the RDP ε when that is larger (huge ε otherwise
    needs a huge grid), or 5 % of the RDP ε, at least 0.001, when that is smaller (for ε
    below 0.2 a fixed 0.01 calibrated σ 23 % too high at ε = 0.05; a tenth of the error
    costs ten times the time, 0.25–0.4 s per call there); δ is resolved to δ/1000. The
    truncated PRVs' means are integrated as ``_Truncated`` says. prv-accountant refuses a
    discretisation whose mean strays from the continuous one (a RuntimeError) and fails
    otherwise at tiny δ (a ValueError: floating-point error dominating): the error
    propagates (``history_epsilon`` then reports the RDP ε, with a warning). Widening the
    grid until it passed, as this did before, gave ε up to 25× too low.
    """
    prvs, steps = _mechanisms(history)
    rdp = _rdp_epsilon(history, delta) if rdp is None else rdp
    eps_error = max(1e-3 * rdp, min(0.01, max(1e-3, 0.05 * rdp)))
    with warnings.catch_warnings():  # its discretisation overflows on low-noise histories
        warnings.simplefilter("ignore", RuntimeWarning)
        acc = _Accountant(prvs, steps, eps_error, delta / 1000)
        return tuple(float(e) for e in acc.compute_epsilon(delta, steps))


def history_epsilon(history: Sequence[Segment], delta: float, accountant: str = "prv") -> float:
    """ε after every segment of ``history`` at ``delta`` (0 with no step, inf with no noise).

    Memoized: PRV costs up to a second, and a training loop asks the same question often.
    """
    delta, accountant = checks.delta(delta), _accountant(accountant)
    segments = [_segment(*segment) for segment in history]
    return _history_epsilon(tuple((s, q, n) for s, q, n in segments if n > 0), delta, accountant)


@functools.lru_cache(maxsize=4096)
def _history_epsilon(history: tuple[Segment, ...], delta: float, accountant: str) -> float:
    if not history:
        return 0.0
    if any(s < NEGLIGIBLE_NOISE for s, _, _ in history):  # (the accountants hang below 1e-160)
        return math.inf
    rdp = _rdp_epsilon(history, delta)
    if accountant == "rdp":
        return rdp
    try:
        upper = prv_bounds(history, delta, rdp=rdp)[2]
        failure = None if math.isfinite(upper) else "its upper bound is infinite"
    except (RuntimeError, ValueError) as e:  # its discretisation strays from the PRV's mean,
        failure = str(e)  # or its floating-point error dominates (δ below 1e-12 or so)
    except MemoryError as e:  # its grid grows with the steps: 379 GiB for 5e10 of them
        failure = f"its grid does not fit in memory: {e}"
    if failure is None:  # RDP's ε is an upper bound too: the smaller of the two holds
        return max(0.0, min(upper, rdp))
    warnings.warn(f"the PRV accountant failed on this history ({failure}); reporting the RDP "
                  "ε, a looser upper bound", RuntimeWarning, stacklevel=3)
    return rdp


def _segment(noise_multiplier: float, sample_rate: float, steps: int) -> Segment:
    return (checks.non_negative("noise_multiplier", noise_multiplier),
            checks.rate("sample_rate", sample_rate), checks.integer("steps", steps, 0))


def compute_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                    accountant: str = "prv") -> float:
    """ε of ``steps`` Poisson-subsampled Gaussian steps (σ = noise_multiplier, q = sample_rate)."""
    return history_epsilon([_segment(noise_multiplier, sample_rate, steps)], delta, accountant)


@functools.lru_cache(maxsize=256)
def find_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                          accountant: str = "prv", rel_tol: float = 0.01) -> float:
    """Smallest σ found whose ε is <= target and >= (1 - rel_tol) · target.

    Brackets σ by doubling/halving, then bisects on log σ (ε falls as σ grows). Memoized:
    the same question (seeds of one experiment) is answered once.
    """
    target = checks.positive("target_epsilon", target_epsilon)
    _segment(1.0, sample_rate, steps)
    checks.integer("steps", steps, 1)
    rel_tol = checks.positive("rel_tol", rel_tol)
    if rel_tol >= 1:
        raise ValueError(f"rel_tol must be in (0, 1): the σ found has ε in [(1 - rel_tol)·"
                         f"target, target], got {rel_tol}")

    def eps(sigma: float) -> float:
        return compute_epsilon(sigma, sample_rate, steps, delta, accountant)

    hi = 1.0
    while eps(hi) > target:
        hi *= 2
        if hi > 1e6:
            raise ValueError(
                f"no noise multiplier below 1e6 reaches ε = {target}: ε stays {eps(hi):.3g} "
                f"at σ = {hi:g}" + ("; the RDP accountant's orders stop at 63, which bounds "
                                    "its ε from below whatever σ: try accountant='prv'"
                                    if accountant == "rdp" else
                                    "; the PRV accountant's ε is the upper end of an interval "
                                    "at least 0.001 wide, which bounds it from below"))
    lo = hi / 2
    while eps(lo) <= target:
        hi, lo = lo, lo / 2
        if lo < 1e-3:
            return hi  # ε stays below target even with almost no noise: take the smallest tried
    while True:
        mid = math.sqrt(lo * hi)
        e = eps(mid)
        if e <= target:
            hi = mid
            if e >= (1 - rel_tol) * target:
                return mid
        else:
            lo = mid
        if hi / lo < 1 + 1e-9:
            return hi


class Accountant:
    """Stateful history of steps; ``epsilon(delta)`` composes it. Thin over the pure functions."""

    def __init__(self, mechanism: str = "prv"):
        self.mechanism = _accountant(mechanism)
        self.history: list[Segment] = []

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` steps; consecutive ones with the same (σ, q) merge."""
        s, q, n = _segment(noise_multiplier, sample_rate, steps)
        if self.history and self.history[-1][:2] == (s, q):
            self.history[-1] = (s, q, self.history[-1][2] + n)
        else:
            self.history.append((s, q, n))

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float) -> float:
        return history_epsilon(self.history, delta, self.mechanism)

    def state_dict(self) -> dict:
        return {"mechanism": self.mechanism, "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.mechanism = _accountant(state["mechanism"])
        self.history = [_segment(*h) for h in state["history"]]
