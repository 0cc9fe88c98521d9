"""``python -m bench.floors``: lower bounds on a private step's time, measured in one run.

Any exact DP-SGD / DPlis step does at least what the non-private step does (a forward, the
backward to every layer's output, one weight-gradient product per layer — for the clipped sum
— and the optimizer step), plus what privacy adds and no implementation can skip:

- noise: D Gaussian draws (D = trainable parameters) from torch's CPU generator, as dplis
  draws them (``kernels.reference.normals``: a 53-bit radius);
- with K perturbations: K·D more draws (torch.randn's: no privacy in them), and K − 1 more
  forwards and backwards to the layer outputs (timed on a frozen copy of the model: no
  weight gradients);
- per-example norms: per layer with a matrix weight (Linear, Conv: the engine's rules), the
  cheaper of the ghost norm (two Gram products per example) and forming the per-example
  gradients (+ their norms + the clip-weighted sum, less the weight-gradient product the
  layer then does without).

Everything else (hooks, per-example losses, bias, embedding and norm-layer gradients, clip
factors, the growth of the norms' cost with K) is left out, so each floor is a lower bound.
The pieces, the non-private step, dplis K = 1 / K = 4 and every Opacus mode are timed in one
process, in alternating rounds (each round re-warms a closure before timing it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn
from tqdm import tqdm

from dplis import kernels
from dplis.ghost_rules import ConvFactor, Factor, rule_for

from .cases import (
    DEFAULT_MODELS,
    MODEL_NAMES,
    OPACUS_MODES,
    build_model,
    get_case,
    make_batch,
    make_step,
)
from .equivalence import describe
from .runner import environment, prepare, rewarm

TARGETS = {"k1": 1.3, "k4": 4.4, "opacus": 1.25}  # the fast-engine issue's CPU targets


def _frozen_pass(name: str, batch_size: int) -> tuple[nn.Module, Callable[[], None]]:
    """A forward and the backward to the layer outputs (no weight gradient): a frozen copy of
    the model whose first parametrised layer's output is made to require grad; the model and
    the closure."""
    model = build_model(name).requires_grad_(False)
    x, y = make_batch(name, batch_size)
    first = next(m for m in model.modules() if any(True for _ in m.parameters(recurse=False)))
    first.register_forward_hook(lambda m, a, out: out.detach().requires_grad_())
    loss_fn = get_case(name).loss_fn
    return model, lambda: loss_fn(model(x), y).backward()


def _layer_factors(name: str, batch_size: int) -> list[tuple[str, Factor]]:
    """(layer name, weight Factor) of every Linear / Conv call of one forward and backward."""
    model = build_model(name)
    x, y = make_batch(name, batch_size)
    calls: list[tuple[str, nn.Module, tuple, list]] = []

    def capture(layer_name: str):
        def hook(module, args, out):
            grad: list[torch.Tensor] = []
            out.register_hook(grad.append)
            calls.append((layer_name, module, args, grad))
        return hook

    for layer_name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            module.register_forward_hook(capture(layer_name))
    get_case(name).loss_fn(model(x), y).backward()
    out = []
    for layer_name, module, args, grad in calls:
        factor = rule_for(module)(module, tuple(a.detach() for a in args), grad[0])["weight"]
        out.append((layer_name, factor))
    return out


def _norm_pieces(factor: Factor) -> dict[str, Callable[[], object]]:
    """Closures timing one layer's weight-gradient product, ghost norm and explicit route."""
    out = torch.empty(factor.u.shape[2], factor.v.shape[2])
    weights = torch.rand(factor.u.shape[0])

    def fresh() -> Factor:  # a convolution unfolds its input on first use: time that too
        return ConvFactor(factor.x, factor.grad, factor.geometry) \
            if isinstance(factor, ConvFactor) else factor

    def ghost():
        f = fresh()
        return kernels.ghost_sq_norms(f.u, f.v)

    def explicit():
        full = factor.full().flatten(1)
        return torch.linalg.vector_norm(full, dim=1), weights @ full

    def wgrad():
        factor.weighted_sum(None, out, add=False)
        return out

    return {"wgrad": wgrad, "ghost": ghost, "explicit": explicit}


def time_rounds(closures: dict[str, Callable[[], object]], steps: int, rounds: int,
                warmup: int = 3) -> tuple[dict[str, float], dict[str, str]]:
    """Median seconds per call of each closure, timed in ``rounds`` alternating rounds of
    ``steps`` calls; a closure that raises is dropped and its error returned."""
    times: dict[str, list[float]] = {k: [] for k in closures}
    errors: dict[str, str] = {}
    for key, fn in list(closures.items()):
        try:
            for _ in range(warmup):
                fn()
        except Exception as e:
            errors[key] = describe(e)
            del closures[key], times[key]
    for _ in tqdm(range(rounds), desc="rounds", leave=False):
        for key, fn in closures.items():
            rewarm(fn)
            for _ in range(steps):
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}, errors


def floors(name: str, batch_size: int, steps: int, rounds: int) -> dict:
    """Time the pieces of model ``name``; return them (ms) with the floors and measured steps."""
    params = sum(p.numel() for p in build_model(name).parameters() if p.requires_grad)
    gen = torch.Generator().manual_seed(0)
    closures: dict[str, Callable[[], object]] = {
        mode: make_step(name, mode, batch_size)
        for mode in ("nonprivate", "dplis_k1", "dplis_k4", *OPACUS_MODES)}
    closures["noise"] = lambda: kernels.reference.normals(params, gen, torch.device("cpu"))
    closures["perturbation"] = lambda: torch.randn(params, generator=gen)  # torch.randn's
    closures["pass"] = _frozen_pass(name, batch_size)[1]
    layers = _layer_factors(name, batch_size)
    for layer, factor in layers:
        for piece, fn in _norm_pieces(factor).items():
            closures[f"{piece}:{layer}"] = fn
    med, errors = time_rounds(closures, steps, rounds)
    failed = {k: e for k, e in errors.items() if k not in OPACUS_MODES}  # Opacus may refuse
    if failed:
        raise RuntimeError(f"{name}: pieces failed, no floor: {failed}")
    ms = {k: v * 1e3 for k, v in med.items()}
    norms = {layer: max(0.0, min(ms[f"ghost:{layer}"], ms[f"explicit:{layer}"]
                                 - ms[f"wgrad:{layer}"])) for layer, _ in layers}
    base = ms["nonprivate"]
    k1 = base + ms["noise"] + sum(norms.values())
    k4 = k1 + 3 * ms["pass"] + 4 * ms["perturbation"]
    opacus = {m: ms[m] for m in OPACUS_MODES if m in ms}
    best = min(opacus.values()) if opacus else None
    return {
        "model": name, "batch_size": batch_size, "parameters": params, "pieces_ms": ms,
        "norm_extra_ms": norms, "errors": errors,
        "floor_ms": {"k1": k1, "k4": k4},
        "ratios": {
            "floor_k1": k1 / base, "dplis_k1": ms["dplis_k1"] / base,
            "floor_k4": k4 / base, "dplis_k4": ms["dplis_k4"] / base,
            "floor_opacus": best / k1 if best else None,
            "dplis_opacus": best / ms["dplis_k1"] if best else None},
        "best_opacus": min(opacus, key=opacus.get) if opacus else None,
    }


def format_report(results: list[dict]) -> str:
    """One line per model and target: floor, measured, target, and whether the floor allows it."""
    lines = [f"{'model':<17}{'target':<28}{'floor':>8}{'dplis':>8}{'target':>8}  verdict"]
    names = {"k1": "K=1 x non-private (<=)", "k4": "K=4 x non-private (<=)",
             "opacus": "K=1 x best Opacus thrpt (>=)"}
    for r in results:
        q = r["ratios"]
        for key, label in names.items():
            floor, ours = q[f"floor_{key}"], q[f"dplis_{key}"]
            if floor is None:
                continue
            target = TARGETS[key]
            sign = 1 if key != "opacus" else -1  # step-time ratios: lower is better
            if sign * (ours - target) <= 0:
                verdict = "met"
            elif sign * (floor - target) > 0:
                verdict = "below the floor: no exact step reaches it here"
            else:
                verdict = "not met; the floor allows it"
            if sign * (ours - floor) < 0:  # timing noise, or a piece the step does without
                verdict += " (measured beyond the floor: not a bound in this run)"
            lines.append(f"{r['model']:<17}{label:<28}{floor:>8.2f}{ours:>8.2f}{target:>8.2f}  "
                         f"{verdict}")
        pieces = r["pieces_ms"]
        lines.append(f"{'':<17}non-private {pieces['nonprivate']:.3f} ms, noise draw "
                     f"{pieces['noise']:.3f} ms ({r['parameters']} values), per-example norms "
                     f"{sum(r['norm_extra_ms'].values()):.3f} ms, frozen pass "
                     f"{pieces['pass']:.3f} ms, best Opacus {r['best_opacus']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.floors", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=MODEL_NAMES)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed calls per closure and round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--malloc", choices=("default", "retain"), default="retain",
                   help="retain: dplis.retain_freed_memory() first (default; see bench)")
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.steps < 1 or args.rounds < 1:
        p.error("--batch-size, --steps and --rounds must be positive")
    prepare(args.threads, args.malloc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' notices would garble the progress bars
        results = [floors(m, args.batch_size, args.steps, args.rounds)
                   for m in tqdm(args.models, desc="models")]
    print(format_report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "config": vars(args), "results": results},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
