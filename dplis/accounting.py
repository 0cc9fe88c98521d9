"""Privacy accounting for the Poisson-subsampled Gaussian mechanism (pure functions + a thin class).

"prv": the PRV accountant of Gopi et al. 2021 (package ``prv-accountant``); ε reported is the
upper end of its (lower, estimate, upper) interval, so it is never under-stated.
"rdp": Rényi-DP composition (``prv_accountant.other_accountants.RDP``, after TF Privacy); looser.
A history is a list of (noise_multiplier, sample_rate, steps) segments, composed together.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant
from prv_accountant.other_accountants import RDP

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


def prv_bounds(history: Sequence[Segment], delta: float) -> tuple[float, float, float]:
    """(lower, estimate, upper) ε of the PRV accountant for a history.

    The ε grid error starts at 0.01, or 0.1 % of the RDP ε when that is larger (huge ε
    otherwise needs a huge grid), or 5 % of the RDP ε, at least 0.001, when that is smaller
    (for ε below 0.2 a fixed 0.01 calibrated σ 23 % too high at ε = 0.05; a tenth of the
    error costs ten times the time, 0.25–0.4 s per call there); δ is resolved to δ/1000.
    prv-accountant's discretisation fails on some few-step, low-noise histories: the error
    is then widened tenfold (at most twice), which widens the interval but keeps ``upper``
    an upper bound. If it still fails, or fails otherwise (a ValueError: floating-point
    error dominating at tiny δ), the error propagates (``history_epsilon`` then reports the
    RDP ε, with a warning).
    """
    prvs, steps = _mechanisms(history)
    rdp = _rdp_epsilon(history, delta)
    eps_error = max(1e-3 * rdp, min(0.01, max(1e-3, 0.05 * rdp)))

    def bounds(error: float) -> tuple[float, float, float]:
        with warnings.catch_warnings():  # its discretisation overflows on low-noise histories
            warnings.simplefilter("ignore", RuntimeWarning)
            acc = PRVAccountant(prvs=prvs, max_self_compositions=steps, eps_error=error,
                                delta_error=delta / 1000)
            return tuple(float(e) for e in acc.compute_epsilon(delta, steps))

    for _ in range(2):
        try:
            return bounds(eps_error)
        except RuntimeError:
            eps_error *= 10
    return bounds(eps_error)


def history_epsilon(history: Sequence[Segment], delta: float, accountant: str = "prv") -> float:
    """ε after every segment of ``history`` at ``delta`` (0 with no step, inf with no noise).

    Memoized: PRV costs up to a second, and a training loop asks the same question often.
    """
    delta, accountant = checks.delta(delta), _accountant(accountant)
    return _history_epsilon(tuple((s, q, n) for s, q, n in history if n > 0), delta, accountant)


@functools.lru_cache(maxsize=4096)
def _history_epsilon(history: tuple[Segment, ...], delta: float, accountant: str) -> float:
    if not history:
        return 0.0
    if any(s < NEGLIGIBLE_NOISE for s, _, _ in history):  # (the accountants hang below 1e-160)
        return math.inf
    if accountant == "rdp":
        return _rdp_epsilon(history, delta)
    try:
        upper = prv_bounds(history, delta)[2]
        failure = None if math.isfinite(upper) else "its upper bound is infinite"
    except (RuntimeError, ValueError) as e:  # its grid cannot hold this history even widened,
        failure = str(e)  # or its floating-point error dominates (δ below 1e-12 or so)
    except MemoryError as e:  # its grid grows with the steps: 379 GiB for 5e10 of them
        failure = f"its grid does not fit in memory: {e}"
    if failure is None:
        return max(0.0, upper)
    warnings.warn(f"the PRV accountant failed on this history ({failure}); reporting the RDP "
                  "ε, a looser upper bound", RuntimeWarning, stacklevel=3)
    return _rdp_epsilon(history, delta)


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
                                    if accountant == "rdp" else ""))
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
