"""``python -m dplis.experiments.compare``: does smoothing help? DP-SGD vs DPlis vs DP-SAT.

Every method trains the same model under identical privacy and budget: the same (ε, δ), epochs,
expected (Poisson) batch size, optimizer (SGD, momentum), learning-rate schedule and PRV
accounting, so σ is the same for all at a given ε. Methods:

  dpsgd          plain DP-SGD
  dplis          DPlis, smoothing radius r constant (s = r·lr·σ·C / E|B|, K perturbations)
  dplis-lr       DPlis, s follows the current learning rate (s·lr_t/lr_0)
  dplis-linear   DPlis, s decays linearly to 0 over the run
  dplis-k1       DPlis with K = 1 (the cost / accuracy of K: ablation rows)
  dplis-k10      DPlis with K = 10 (the DPlis authors' K)
  dpsat          DP-SAT (gradients at θ + ρ·g_prev/‖g_prev‖), a second flatness-seeking method

Tuning (``--tune``, on by default): the training set is split 80/20 (``split_validation``, seed
0); every configuration of a method's grid trains once (seed 0) on the 80 % and is scored on
the 20 %, at every ε (or at the middle ε only with ``--tune-at middle``); the best validation
accuracy wins (ties: the first in grid order). Every method gets the same budget, |lr grid| × 3
configurations per ε: DP-SGD tunes lr × C, DPlis lr × r (K fixed), DP-SAT lr × ρ. The schedule
and K variants of DPlis reuse dplis's values (ablations at fixed lr, r). The test set is never
looked at while tuning; final runs train on the whole training set, one per seed, and report
test accuracy. A seed fixes initialisation, Poisson batches and noise draws, so the methods are
compared on the same draws (the paired Δ column).

Writes ``<out>/<prefix>.json`` (every run, the grid, the chosen values), ``<prefix>.md``
(mean ± std of test accuracy per method and ε, wall time per run) and ``<prefix>.png``
(accuracy vs ε with error bars).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm

from .. import __version__, models
from ..data import DATASETS, load_dataset, split_validation
from ..kernels import NonFiniteError
from ..train import accuracy, build_model
from ..trainer import PrivateTrainer


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    smoothing: bool = False
    schedule: str = "constant"
    sat: bool = False
    K: int | None = None  # overrides the tuned K (the K ablation rows)

    @property
    def tuning_key(self) -> str:
        """Whose tuned values this method uses (schedule and K variants share dplis's)."""
        return "dplis" if self.smoothing else self.name


METHODS = {m.name: m for m in (
    Method("dpsgd", "DP-SGD"),
    Method("dplis", "DPlis", smoothing=True),
    Method("dplis-lr", "DPlis, r ∝ lr", smoothing=True, schedule="lr"),
    Method("dplis-linear", "DPlis, r linear → 0", smoothing=True, schedule="linear"),
    Method("dplis-k1", "DPlis, K = 1", smoothing=True, K=1),
    Method("dplis-k10", "DPlis, K = 10", smoothing=True, K=10),
    Method("dpsat", "DP-SAT", sat=True),
)}

PARAMS = ("lr", "max_grad_norm", "radius", "K", "rho")
# What each method tunes, and what it uses at a fixed value (--max-grad-norm, --K, ...). Same
# budget for all: |lr grid| × 3 runs per ε — DP-SGD spends its third axis on C, DPlis on r,
# DP-SAT on ρ (these two keep C fixed).
TUNED = {"dpsgd": ("lr", "max_grad_norm"), "dplis": ("lr", "radius", "K"),
         "dpsat": ("lr", "rho")}
USED = {"dpsgd": ("lr", "max_grad_norm"), "dplis": ("lr", "max_grad_norm", "radius", "K"),
        "dpsat": ("lr", "max_grad_norm", "rho")}
GRID = {"lr": [0.125, 0.25, 0.5], "max_grad_norm": [0.5, 1.0, 2.0], "radius": [10.0, 20.0, 40.0],
        "K": [4], "rho": [0.3, 1.0, 3.0]}
FIXED = {"max_grad_norm": 1.0}

# Values used without tuning (--no-tune, --quick): those the full MNIST-1D run
# (docs/compare_full.json) chose on its validation split, per ε and tuning key; another ε takes
# the nearest one's (in log ε).
PRESETS = {
    1.0: {"dpsgd": {"lr": 0.25, "max_grad_norm": 0.5},
          "dplis": {"lr": 0.125, "max_grad_norm": 1.0, "radius": 10.0, "K": 4},
          "dpsat": {"lr": 0.125, "max_grad_norm": 1.0, "rho": 0.3}},
    3.0: {"dpsgd": {"lr": 0.25, "max_grad_norm": 1.0},
          "dplis": {"lr": 0.25, "max_grad_norm": 1.0, "radius": 40.0, "K": 4},
          "dpsat": {"lr": 0.25, "max_grad_norm": 1.0, "rho": 1.0}},
    8.0: {"dpsgd": {"lr": 0.5, "max_grad_norm": 1.0},
          "dplis": {"lr": 0.5, "max_grad_norm": 1.0, "radius": 20.0, "K": 4},
          "dpsat": {"lr": 0.5, "max_grad_norm": 1.0, "rho": 1.0}},
}

# Defaults: the full run (--quick changes some; flags given on the command line always win).
FULL = {"epsilons": [1.0, 3.0, 8.0], "seeds": 5, "epochs": 20.0, "batch_size": 256,
        "methods": ["dpsgd", "dplis", "dplis-lr", "dplis-linear", "dplis-k1", "dplis-k10",
                    "dpsat"], "tune": True}
QUICK = {"epsilons": [1.0, 3.0, 8.0], "seeds": 3, "epochs": 20.0, "batch_size": 256,
         "methods": ["dpsgd", "dplis", "dpsat"], "tune": False}


def grid_for(key: str, grid: dict[str, list], fixed: dict) -> list[dict]:
    """The configurations tried when tuning ``key`` (grid order = tie-break order)."""
    names = TUNED[key]
    rest = {n: fixed[n] for n in USED[key] if n not in names}
    return [{**rest, **dict(zip(names, values))}
            for values in itertools.product(*(grid[n] for n in names))]


def preset_for(key: str, epsilon: float) -> dict:
    nearest = min(PRESETS, key=lambda e: abs(math.log(e / epsilon)))
    return dict(PRESETS[nearest][key])


def method_params(method: Method, values: dict) -> dict:
    """The full parameter record of ``method`` (knobs it does not use: None)."""
    used = USED[method.tuning_key]
    params = {k: (values[k] if k in used else None) for k in PARAMS}
    if method.K is not None:
        params["K"] = method.K
    return params


def train_and_evaluate(train, evaluation, *, dataset: str, model_name: str, method: Method,
                       params: dict, epsilon: float, delta: float, epochs: float,
                       batch_size: int, seed: int, lr_schedule: str = "cosine",
                       momentum: float = 0.9, device: str = "cpu") -> dict:
    """Train one model privately on ``train``; return its accuracy on ``evaluation`` and costs.

    ``params``: lr, max_grad_norm, and radius + K (DPlis) or rho (DP-SAT). A step whose loss or
    gradient is not finite ends training early (``diverged``); the model is evaluated as it is.
    """
    torch.manual_seed(seed)
    model = build_model(model_name, dataset, train[0][0]).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=params["lr"], momentum=momentum)
    trainer = PrivateTrainer(
        model, opt, F.cross_entropy, sample_rate=batch_size / len(train),
        max_grad_norm=params["max_grad_norm"], target_epsilon=epsilon, target_delta=delta,
        epochs=epochs, smoothing_radius=params["radius"] if method.smoothing else None,
        smoothing_schedule=method.schedule, sat_rho=params["rho"] if method.sat else 0.0,
        num_perturbations=params["K"] if method.smoothing else 1, seed=seed,
        dataset_size=len(train))
    steps = trainer.max_steps
    scheduler = None
    if lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    diverged = False
    start = time.perf_counter()
    while trainer.accountant.steps < steps and not diverged:
        for x, y in trainer.data_loader(train):  # passes end where the planned steps do
            try:
                trainer.step(x.to(device), y.to(device))
            except NonFiniteError:
                diverged = True
                break
            if scheduler is not None:
                scheduler.step()
    seconds = time.perf_counter() - start
    return {"accuracy": accuracy(model, evaluation, device), "seconds": seconds,
            "sigma": trainer.noise_multiplier, "steps": trainer.accountant.steps,
            "epsilon_spent": trainer.epsilon(delta),
            "diverged": diverged}


# --------------------------------------------------------------------------------- the command

def build_parser() -> argparse.ArgumentParser:
    full = ", ".join(f"{k}={v}" for k, v in FULL.items())
    quick = ", ".join(f"{k}={v}" for k, v in QUICK.items())
    grid = "; ".join(f"{key}: " + " × ".join(f"{n} ∈ {GRID[n]}" for n in names)
                     for key, names in TUNED.items())
    p = argparse.ArgumentParser(
        prog="python -m dplis.experiments.compare", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Defaults: {full}.\n--quick: {quick}, with the preset values (the full run's "
               f"choices) {PRESETS}.\nTuning grid per ε: {grid} (DPlis and DP-SAT at "
               f"C = {FIXED['max_grad_norm']}).\n"
               "Every run: SGD with momentum, learning rate decayed by a cosine schedule "
               "stepped every step (--lr-schedule); σ calibrated by the PRV accountant.")
    p.add_argument("--dataset", nargs="+", default=["mnist1d"], choices=(*DATASETS, "all"),
                   help="datasets to compare on; 'all' = mnist1d plus each image dataset "
                        "found in --data-dir (default: mnist1d)")
    p.add_argument("--data-dir", default=None,
                   help="folder with MNIST / Fashion-MNIST / CIFAR-10 (never downloaded)")
    p.add_argument("--num-samples", type=int, default=20000,
                   help="MNIST-1D size, train + test (80/20) (default: 20000)")
    p.add_argument("--model", choices=("auto", *models.MODELS), default="auto",
                   help="auto: mlp for mnist1d, the paper's cnn for images (default: auto)")
    p.add_argument("--epsilons", nargs="+", type=float, default=None, metavar="EPS",
                   help="target ε values (default: 1 3 8)")
    p.add_argument("--delta", type=float, default=1e-5, help="δ (default: 1e-5)")
    p.add_argument("--seeds", type=int, default=None,
                   help="final runs per method and ε, seeds 0..N-1; a seed fixes the "
                        "initialisation, the Poisson batches and the noise draws, so methods "
                        "are compared on the same draws (default: 5)")
    p.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=None,
                   help="methods to compare (default: all)")
    p.add_argument("--epochs", type=float, default=None, help="epochs (default: 20)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="expected Poisson batch size (default: 256)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    p.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine",
                   help="cosine decay to 0 stepped each step, or constant (default: cosine)")
    p.add_argument("--tune", action=argparse.BooleanOptionalAction, default=None,
                   help="tune each method on a validation split first (default: on; "
                        "off with --quick: the preset values are used)")
    p.add_argument("--tune-at", choices=("each", "middle"), default="each",
                   help="tune at every ε, or at the middle ε and reuse (default: each)")
    p.add_argument("--tune-seeds", type=int, default=1,
                   help="runs (seeds 0..N-1) averaged per tuning configuration (default: 1)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="validation share of the training set (default: 0.2)")
    for name, kind, help_ in (("lr", float, "learning rate"),
                              ("max-grad-norm", float, "clipping norm C"),
                              ("radius", float, "DPlis smoothing radius r"),
                              ("K", int, "DPlis perturbations K"),
                              ("rho", float, "DP-SAT ρ")):
        key = name.replace("-", "_")
        p.add_argument(f"--grid-{name}", nargs="+", type=kind, default=None, dest=f"grid_{key}",
                       metavar="V", help=f"tuning values of the {help_} (default: {GRID[key]})")
        extra = (f"; with tuning, the value of methods that do not tune it (default: "
                 f"{FIXED[key]})" if key in FIXED else "")
        p.add_argument(f"--{name}", type=kind, default=None, dest=key,
                       help=f"{help_} without tuning (default: the preset){extra}")
    p.add_argument("--quick", action="store_true",
                   help="a few minutes on 2 CPU cores: 3 seeds, 3 methods, no tuning")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: 1; on a shared 2-core machine 2 threads "
                        "ran up to 20× slower)")
    p.add_argument("--out", default="compare-results", help="output folder")
    p.add_argument("--prefix", default="compare", help="output file name stem")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no table on stdout")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill what the user left unset from the quick or full defaults; check the rest."""
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in PARAMS:
        if getattr(args, f"grid_{key}") is None:
            setattr(args, f"grid_{key}", list(GRID[key]))
    if args.seeds < 1 or args.tune_seeds < 1 or args.threads < 1:
        raise SystemExit("--seeds, --tune-seeds and --threads must be >= 1")
    if args.batch_size < 1 or args.epochs <= 0:
        raise SystemExit("--batch-size must be >= 1 and --epochs > 0")
    if any(e <= 0 for e in args.epsilons):
        raise SystemExit("--epsilons must be > 0")
    args.methods = list(dict.fromkeys(args.methods))
    args.epsilons = sorted(set(args.epsilons))
    return args


def datasets_to_run(names: Sequence[str], data_dir: str | None) -> tuple[list[str], bool]:
    """The datasets to compare on, and whether missing image files just skip a dataset."""
    if "all" not in names:
        return list(dict.fromkeys(names)), False
    return ["mnist1d", *(DATASETS[1:] if data_dir is not None else ())], True


def summarize(runs: list[dict]) -> list[dict]:
    """Per (dataset, method, ε): accuracy stats, and the paired difference to DP-SGD (same seed)."""
    keyed: dict[tuple, list[dict]] = {}
    for r in runs:
        keyed.setdefault((r["dataset"], r["method"], r["epsilon"]), []).append(r)
    rows = []
    for (dataset, method, eps), group in keyed.items():
        accs = [r["accuracy"] for r in group]
        row = {"dataset": dataset, "method": method, "epsilon": eps, "n": len(accs),
               "mean": statistics.fmean(accs), "std": _std(accs), "min": min(accs),
               "max": max(accs), "seconds": statistics.fmean(r["seconds"] for r in group),
               "diverged": sum(r["diverged"] for r in group), "sigma": group[0]["sigma"],
               "steps": group[0]["steps"],
               "epsilon_spent": max(r["epsilon_spent"] for r in group)}
        base = {r["seed"]: r["accuracy"] for r in keyed.get((dataset, "dpsgd", eps), [])}
        diffs = [r["accuracy"] - base[r["seed"]] for r in group if r["seed"] in base]
        if method != "dpsgd" and diffs:
            row.update(diff_mean=statistics.fmean(diffs), diff_std=_std(diffs),
                       wins=sum(d > 0 for d in diffs), paired=len(diffs))
        rows.append(row)
    return rows


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(v) -> str:
    return "–" if v is None else f"{v:g}"


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [f"Command: `{result['command']}`", "",
             f"{cfg['seeds']} seeds, δ = {cfg['delta']:g}, {cfg['epochs']:g} epochs, expected "
             f"batch {cfg['batch_size']}, SGD momentum {cfg['momentum']:g}, "
             f"{cfg['lr_schedule']} learning-rate schedule. Test accuracy in %, mean ± std "
             "over seeds. Δ: paired difference to DP-SGD on the same seed (same init, batches "
             "and noise draws), mean ± std, and on how many seeds the method beat DP-SGD. "
             "Time: mean wall seconds of one training run (steps only). Whole command: "
             f"{result['total_seconds'] / 60:.1f} min on {result['machine']}.", ""]
    for ds in result["datasets"]:
        rows = [r for r in result["summary"] if r["dataset"] == ds["name"]]
        eps = sorted({r["epsilon"] for r in rows})
        lines += [f"### {ds['name']} ({ds['train']} train / {ds['test']} test, {ds['model']})",
                  ""]
        lines.append("| method | " + " | ".join(f"ε = {e:g}" for e in eps) + " | "
                     + " | ".join(f"Δ at ε = {e:g}" for e in eps)
                     + " | time / run (s) | × DP-SGD |")
        lines.append("|---" * (2 * len(eps) + 3) + "|")
        base = [r["seconds"] for r in rows if r["method"] == "dpsgd"]

        def spread(std: float) -> str:  # one seed has no spread to show
            return f" ± {100 * std:.1f}" if cfg["seeds"] > 1 else ""

        for m in cfg["methods"]:
            mrows = {r["epsilon"]: r for r in rows if r["method"] == m}
            if not mrows:
                continue
            cells = []
            for e in eps:
                r = mrows[e]
                cell = f"{100 * r['mean']:.1f}{spread(r['std'])}"
                if r["diverged"]:
                    cell += f" ({r['diverged']} diverged)"
                cells.append(cell)
            for e in eps:
                r = mrows[e]
                if "diff_mean" not in r:
                    cells.append("–")
                    continue
                diff = round(100 * r["diff_mean"], 1) + 0.0  # + 0.0: no "-0.0"
                cells.append(f"{diff:+.1f}{spread(r['diff_std'])} "
                             f"({r['wins']}/{r['paired']})")
            secs = statistics.fmean(r["seconds"] for r in mrows.values())
            ratio = f"{secs / statistics.fmean(base):.1f}" if base else "–"
            lines.append(f"| {METHODS[m].label} | " + " | ".join(cells)
                         + f" | {secs:.1f} | {ratio} |")
        first = {r["epsilon"]: r for r in reversed(rows)}
        spent = {e: max(r["epsilon_spent"] for r in rows if r["epsilon"] == e) for e in eps}
        sig = "; ".join(f"ε = {e:g}: σ = {first[e]['sigma']:.3f}, {first[e]['steps']} steps, "
                        f"spent ε = {spent[e]:.3f}" for e in eps)
        lines += ["", f"Noise, the same for every method: {sig}.", "",
                  "Hyper-parameters used (C: clipping norm; r: smoothing radius, "
                  "s = r·lr·σ·C/E|B|; K: perturbations; ρ: DP-SAT):", "",
                  "| method | ε | lr | C | r | K | ρ | validation acc. (%) |",
                  "|---" * 8 + "|"]
        for c in result["chosen"]:
            if c["dataset"] != ds["name"]:
                continue
            val = "–" if c["val_accuracy"] is None else f"{100 * c['val_accuracy']:.1f}"
            lines.append(f"| {METHODS[c['method']].label} | {c['epsilon']:g} | "
                         + " | ".join(_fmt(c["params"][k]) for k in PARAMS) + f" | {val} |")
        lines.append("")
    t = result["tuning"]
    if t["enabled"]:
        lines += [f"Tuning: {t['description']} Grid per ε: "
                  + "; ".join(f"{k}: " + " × ".join(f"{n} ∈ {v}" for n, v in g.items())
                              for k, g in t["grid"].items()) + ".", ""]
    else:
        lines += ["No tuning: preset values (those the full run chose on its validation "
                  "split).", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> tuple[int, int]:
    """Accuracy vs ε with error bars (± std over seeds), one panel per dataset; (width, height)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    datasets = [d["name"] for d in result["datasets"]]
    fig = Figure(figsize=(6.4 * len(datasets), 4.8), dpi=100)
    FigureCanvasAgg(fig)
    methods = result["config"]["methods"]
    for i, ds in enumerate(datasets):
        ax = fig.add_subplot(1, len(datasets), i + 1)
        for j, m in enumerate(methods):
            rows = sorted((r for r in result["summary"]
                           if r["dataset"] == ds and r["method"] == m), key=lambda r: r["epsilon"])
            if not rows:
                continue
            shift = 1 + 0.025 * (j - (len(methods) - 1) / 2)  # spread the points on the log axis
            ax.errorbar([r["epsilon"] * shift for r in rows], [100 * r["mean"] for r in rows],
                        yerr=[100 * r["std"] for r in rows], marker="o", ms=4, capsize=3,
                        label=METHODS[m].label)
        ax.set_xscale("log")
        eps = sorted({r["epsilon"] for r in result["summary"] if r["dataset"] == ds})
        ax.set_xticks(eps, [f"{e:g}" for e in eps])
        ax.minorticks_off()
        ax.set_xlabel(f"ε (δ = {result['config']['delta']:g})")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{ds}: mean ± std over {result['config']['seeds']} seeds", fontsize="medium")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return round(fig.get_figwidth() * 100), round(fig.get_figheight() * 100)


def tune(train, args, *, dataset: str, model_name: str, keys: list[str], eps_list: list[float],
         grid: dict, fixed: dict, common: dict, bar) -> tuple[dict, list[dict]]:
    """Best configuration per (tuning key, ε) on a validation split of ``train``; all trials."""
    sub, val = split_validation(train, args.val_fraction, seed=0)
    best, trials = {}, []
    for eps, key in itertools.product(eps_list, keys):
        method = METHODS[key]
        scored = []
        for values in grid_for(key, grid, fixed):
            params = method_params(method, values)
            accs = []
            for seed in range(args.tune_seeds):
                bar.set_postfix_str(f"{dataset} tune {key} ε={eps:g} {values}")
                r = train_and_evaluate(sub, val, dataset=dataset, model_name=model_name,
                                       method=method, params=params, epsilon=eps, seed=seed,
                                       **common)
                accs.append(r["accuracy"])
                trials.append({"dataset": dataset, "method": key, "epsilon": eps,
                               "params": params, "seed": seed, "val_accuracy": r["accuracy"],
                               "seconds": r["seconds"], "diverged": r["diverged"]})
                bar.update(1)
            scored.append((statistics.fmean(accs), params))
        acc, params = max(scored, key=lambda t: t[0])  # the first best, in grid order
        best[key, eps] = (params, acc)
    return best, trials


def main(argv: list[str] | None = None) -> dict:
    args = resolve_args(build_parser().parse_args(argv))
    command = "python -m dplis.experiments.compare" + "".join(
        f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        result = _run(args, command)
    finally:
        torch.set_num_threads(threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"{args.prefix}.{ext}" for ext in ("json", "md", "png")}
    result["figure_size"] = plot(result, paths["png"])
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    paths["md"].write_text(markdown(result) + "\n")
    if not args.quiet:
        print(markdown(result))
    print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return result


def _run(args: argparse.Namespace, command: str) -> dict:
    begin = time.perf_counter()
    methods = [METHODS[m] for m in args.methods]
    keys = list(dict.fromkeys(m.tuning_key for m in methods))
    grid = {k: getattr(args, f"grid_{k}") for k in PARAMS}
    fixed = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in FIXED.items()}
    overrides = {k: getattr(args, k) for k in PARAMS if getattr(args, k) is not None}
    datasets, optional = datasets_to_run(args.dataset, args.data_dir)
    middle = args.epsilons[(len(args.epsilons) - 1) // 2]
    tune_eps = args.epsilons if args.tune_at == "each" else [middle]
    trials_per_eps = sum(len(grid_for(k, grid, fixed)) for k in keys) * args.tune_seeds
    per_dataset = ((len(tune_eps) * trials_per_eps if args.tune else 0)
                   + len(args.epsilons) * args.seeds * len(methods))
    bar = tqdm(total=len(datasets) * per_dataset, disable=args.quiet, unit="run",
               file=sys.stderr)
    common = {"delta": args.delta, "epochs": args.epochs, "batch_size": args.batch_size,
              "lr_schedule": args.lr_schedule, "momentum": args.momentum,
              "device": args.device}
    trials, chosen, runs, ds_info = [], [], [], []
    loaded: dict[str, tuple] = {}  # dataset -> fingerprint of its training set
    for ds in datasets:
        kw = {"num_samples": args.num_samples, "seed": 0} if ds == "mnist1d" else {}
        skip = None
        try:
            train, test = load_dataset(ds, args.data_dir, **kw)
        except FileNotFoundError as e:
            if not optional or ds == "mnist1d":
                raise SystemExit(str(e)) from e
            skip = f"its files are not in {args.data_dir}"
        else:  # MNIST and Fashion-MNIST files share names: the same files found twice?
            # (the labels tell: the images are standardised with each dataset's constants)
            x, y = train.tensors
            fingerprint = (tuple(x.shape), hashlib.sha256(y.numpy().tobytes()).hexdigest())
            twin = next((d for d, f in loaded.items() if f == fingerprint), None)
            if optional and twin is not None:
                skip = f"it found the same files as {twin}"
            loaded[ds] = fingerprint
        if skip:
            bar.total -= per_dataset
            bar.refresh()
            print(f"skipping {ds}: {skip}", file=sys.stderr)
            continue
        model_name = args.model
        if model_name == "auto":
            model_name = "mlp" if ds == "mnist1d" else "cnn"
        ds_info.append({"name": ds, "train": len(train), "test": len(test),
                        "model": model_name})
        if not 1 <= args.batch_size <= len(train):
            raise SystemExit(f"--batch-size must be in [1, {len(train)}] for {ds}")
        best = {}
        if args.tune:
            best, ds_trials = tune(train, args, dataset=ds, model_name=model_name, keys=keys,
                                   eps_list=tune_eps, grid=grid, fixed=fixed, common=common,
                                   bar=bar)
            trials += ds_trials
        for eps in args.epsilons:
            src = eps if args.tune_at == "each" else middle
            for method in methods:
                key = method.tuning_key
                if args.tune:
                    values, val_acc = best[key, src]
                else:
                    values, val_acc = {**preset_for(key, eps), **overrides}, None
                params = method_params(method, values)
                chosen.append({"dataset": ds, "method": method.name, "epsilon": eps,
                               "params": params, "val_accuracy": val_acc,
                               "tuned_at_epsilon": src if args.tune else None})
                for seed in range(args.seeds):
                    bar.set_postfix_str(f"{ds} {method.name} ε={eps:g} seed {seed}")
                    r = train_and_evaluate(train, test, dataset=ds, model_name=model_name,
                                           method=method, params=params, epsilon=eps,
                                           seed=seed, **common)
                    runs.append({"dataset": ds, "method": method.name, "epsilon": eps,
                                 "seed": seed, "params": params, **r})
                    bar.update(1)
    bar.close()
    where = "at every ε" if args.tune_at == "each" else f"at ε = {middle:g}, reused for all ε"
    description = (
        f"{round(100 * args.val_fraction)} % of the training set held out (split_validation, "
        f"seed 0); each configuration trained on the rest ({args.tune_seeds} seed(s)) and "
        f"scored on the held-out part {where}; best validation accuracy wins (ties: first in "
        "grid order). Same budget for every method: DP-SGD tunes lr × C, DPlis lr × r × K and "
        "DP-SAT lr × ρ (these two at C = "
        f"{fixed['max_grad_norm']:g}); the schedule and K variants of DPlis reuse dplis's "
        "values. The test set is only used for the final runs.")
    return {
        "version": __version__, "command": command,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} thread(s)",
        "config": {k: getattr(args, k) for k in (
            "epsilons", "delta", "seeds", "methods", "epochs", "batch_size", "momentum",
            "lr_schedule", "num_samples", "quick", "tune", "tune_at", "tune_seeds",
            "val_fraction", "threads")},
        "datasets": ds_info,
        "tuning": {"enabled": bool(args.tune), "description": description,
                   "grid": {k: {n: grid[n] for n in TUNED[k]} for k in keys},
                   "fixed": fixed, "trials": trials},
        "chosen": chosen, "runs": runs, "summary": summarize(runs),
        "total_seconds": time.perf_counter() - begin,
    }


if __name__ == "__main__":
    main()
