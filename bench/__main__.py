"""``python -m bench``: throughput and memory of dplis vs non-private training and Opacus.

For each model and mode: examples/s (batch size / median step time), median step time, slowdown
relative to non-private training and to the fastest working Opacus mode, and peak memory.
Before timing a model, dplis K = 1 and every Opacus mode are checked to give the same clipped
gradient with noise 0 (``bench.equivalence``); a mode that fails the check (or fails to run) is
reported with its error and not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import textwrap
import time

import torch

from dplis.allocator import MALLOC_MODES
from dplis.private_grad import ENGINES

from .cases import (
    DEFAULT_MODELS,
    MODEL_NAMES,
    MODES,
    OPACUS_MODES,
    Settings,
    dplis_engine_used,
    dplis_options,
)
from .equivalence import EQUIVALENCE_MAX_BATCH, check_model, describe
from .runner import (
    MEMORY_METHOD,
    TENSOR_METHOD,
    Measurement,
    context,
    environment,
    measure,
    measure_interleaved,
)

DEFAULTS = {"batch_size": 64, "steps": 20, "warmup": 3, "rounds": 5}
QUICK = {"batch_size": 32, "steps": 3, "warmup": 1, "rounds": 3}

EPILOG = f"""\
columns:
  ex/s        examples per second = batch size / median step time
  step ms     median wall time of one training step (forward, backward, clip, noise,
              optimizer step) over --steps timed steps after --warmup untimed ones; the
              modes of a model live side by side in their own processes (one runs at a time);
              their timed steps are interleaved in --rounds rounds, so a busy phase of
              the machine hits all modes alike; each round starts with untimed steps
              (at least 3 and 20 ms) so a mode is timed warm after the others' turns
  x nonpriv   step time / non-private step time (1.0 = as fast as non-private; 3.0 = 3x slower)
  x opacus    step time / step time of the fastest working Opacus mode on that model
  peak MB     {textwrap.fill(MEMORY_METHOD.removeprefix("peak memory = "), 90,
                              initial_indent=" " * 14, subsequent_indent=" " * 14).lstrip()}
  tensor MB   {textwrap.fill(TENSOR_METHOD.removeprefix("tensor MB = "), 90,
                              initial_indent=" " * 14, subsequent_indent=" " * 14).lstrip()}

modes: {", ".join(MODES)}
  nonprivate: torch.optim.SGD on the mean loss; dplis_kK: dplis.PrivateTrainer.step with K
  perturbations (K > 1: DPlis smoothing); dplis_k1_secure: K = 1 with secure_rng=True (noise
  from os.urandom: its cost); dplis_k1_lowmem: K = 1 with engine="ghost", low_memory=True
  (norms inside the backward, the clipped sum from a second backward);
  dplis_k1_compiled / dplis_k4_compiled: the vmap engine with compile=True (torch.compile,
  whatever --dplis-engine says; the case is compiled while it is built, so neither time
  nor memory counts the compilation); opacus_*: Opacus
  PrivacyEngine.make_private with that grad_sample_mode. Same batch, SGD lr, clipping
  bound C and noise multiplier for all.

Exit status: 0 when dplis and non-private rows ran (Opacus failures are results, not errors),
1 when a dplis or non-private row failed or dplis K=1 failed the equivalence check.
"""


def _split(values: list[str]) -> list[str]:
    out = []
    for v in values:
        out += [s for s in v.split(",") if s]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Throughput and peak memory of dplis (DP-SGD, DPlis K=4/8) against "
                    "non-private training and Opacus 1.6, on small models built in code.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="MODEL",
                   help=f"models to run, space- or comma-separated, from "
                        f"{', '.join(MODEL_NAMES)}, or all (default: "
                        f"{', '.join(DEFAULT_MODELS)})")
    p.add_argument("--modes", nargs="+", default=list(MODES), metavar="MODE",
                   help=f"modes to run, space- or comma-separated (default: all: "
                        f"{', '.join(MODES)})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"examples per step, same for every model and mode "
                        f"(default {DEFAULTS['batch_size']}, --quick {QUICK['batch_size']})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"timed steps per case; the median is reported "
                        f"(default {DEFAULTS['steps']}, --quick {QUICK['steps']})")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"untimed steps before timing (default {DEFAULTS['warmup']}, "
                        f"--quick {QUICK['warmup']})")
    p.add_argument("--rounds", type=int, default=None,
                   help=f"the timed steps of one model's modes are interleaved in this many "
                        f"rounds, each mode in its own live process (default "
                        f"{DEFAULTS['rounds']}, --quick {QUICK['rounds']})")
    p.add_argument("--quick", action="store_true",
                   help="small batch and few steps: about a minute on 2 CPU cores")
    p.add_argument("--json", metavar="PATH", help="also write machine-readable results here")
    p.add_argument("--markdown", action="store_true",
                   help="print the table as GitHub markdown (full error messages)")
    p.add_argument("--max-grad-norm", type=float, default=Settings.max_grad_norm,
                   help="clipping bound C (default %(default)s)")
    p.add_argument("--noise-multiplier", type=float, default=Settings.noise_multiplier,
                   help="noise multiplier sigma (default %(default)s)")
    p.add_argument("--dplis-engine", choices=ENGINES, default=None,
                   help="dplis per-example engine for the dplis_* modes and the equivalence "
                        "check (default: the library default, auto)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's default, one per core)")
    p.add_argument("--malloc", choices=MALLOC_MODES, default="default",
                   help="retain: every case's process (every mode alike) first calls "
                        "dplis.retain_freed_memory(), so glibc keeps freed memory and steps "
                        "pay no page faults; default: the process's allocator as it is "
                        "(default %(default)s)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds before one case is abandoned and reported failed "
                        "(default %(default)s)")
    p.add_argument("--in-process", action="store_true",
                   help="run every case in this process (debugging; peak memory then "
                        "includes allocator caching from earlier cases)")
    args = p.parse_args(argv)
    args.models = list(MODEL_NAMES) if args.models == ["all"] else _split(args.models)
    args.modes = list(MODES) if args.modes == ["all"] else _split(args.modes)
    for name in args.models:
        if name not in MODEL_NAMES:
            p.error(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")
    for mode in args.modes:
        if mode not in MODES:
            p.error(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    args.modes = [m for m in MODES if m in args.modes]  # canonical order
    base = QUICK if args.quick else DEFAULTS
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    threads = 1 if args.threads is None else args.threads
    if min(args.batch_size, args.steps, args.rounds, args.warmup + 1, threads) < 1:
        p.error("--batch-size, --steps, --rounds and --threads must be >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available in this torch build / machine")
    return args


class Progress:
    """One progress line on stderr (rewritten in place on a terminal, one line per item else)."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.done, self.stream = total, 0, stream
        self.start = time.perf_counter()
        self.tty = stream.isatty()

    def show(self, text: str) -> None:
        elapsed = time.perf_counter() - self.start
        line = f"[{self.done}/{self.total}] {elapsed:6.1f}s  {text}"
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def advance(self) -> None:
        self.done += 1

    def close(self) -> None:
        self.show("done")
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()


def _row(model: str, mode: str, batch_size: int, m: Measurement) -> dict:
    row = {"model": model, "mode": mode, "batch_size": batch_size, "examples_per_s": None,
           "step_ms": None, "peak_mem_mb": None, "peak_tensor_mb": None,
           "ratio_to_nonprivate": None,
           "ratio_to_best_opacus": None, "error": m.error}
    if m.error is None and m.times:
        median = statistics.median(m.times)
        row["examples_per_s"] = round(batch_size / median, 2)
        row["step_ms"] = round(median * 1e3, 4)  # 0.1 µs: examples_per_s stays consistent
        row["peak_mem_mb"] = round(m.peak_mem_mb, 2)
        row["peak_tensor_mb"] = None if m.peak_tensor_mb is None else round(m.peak_tensor_mb, 2)
    return row


def add_ratios(rows: list[dict]) -> None:
    """Fill ratio_to_nonprivate and ratio_to_best_opacus (step-time ratios) per model."""
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model and r["step_ms"]]
        nonpriv = next((r["step_ms"] for r in mine if r["mode"] == "nonprivate"), None)
        opacus = [r["step_ms"] for r in mine if r["mode"] in OPACUS_MODES]
        best = min(opacus) if opacus else None
        for r in mine:
            if nonpriv:
                r["ratio_to_nonprivate"] = round(r["step_ms"] / nonpriv, 3)
            if best:
                r["ratio_to_best_opacus"] = round(r["step_ms"] / best, 3)


def _brief(r: dict) -> dict:
    return {k: r[k] for k in ("model", "mode", "ratio_to_nonprivate", "examples_per_s",
                              "step_ms")}


def slowest(rows: list[dict]) -> dict | None:
    """The private row with the largest slowdown vs non-private (ties: lowest examples/s)."""
    ranked = [r for r in rows if r["ratio_to_nonprivate"] is not None and r["mode"] != "nonprivate"]
    if not ranked:
        return None
    return _brief(max(ranked, key=lambda r: (r["ratio_to_nonprivate"], -r["examples_per_s"])))


def lowest_throughput(rows: list[dict]) -> dict | None:
    """The row with the fewest examples per second (across models)."""
    ranked = [r for r in rows if r["examples_per_s"] is not None]
    return _brief(min(ranked, key=lambda r: r["examples_per_s"])) if ranked else None


def busy_machine_notes(env: dict, threads: int | None) -> list[str]:
    """Warn when other processes already load the CPUs: threaded timings are then unreliable."""
    load = (env.get("load_avg_start") or [0.0])[0]
    cpus = env.get("cpu_count") or 1
    threads = threads or env.get("torch_threads") or cpus
    if load + threads <= cpus + 0.5:
        return []
    advice = "use a quiet machine" + (" or --threads 1" if threads > 1 else "")
    return [f"1-min load average {load:.2f} on {cpus} CPUs before the run: other processes "
            f"compete with the {threads} torch thread(s), so timings are slower and noisier "
            f"than on an idle machine (threads wait for descheduled peers); {advice}"]


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict], error_width: int = 70) -> str:
    head = (f"{'model':<12} {'mode':<17} {'batch':>5} {'ex/s':>10} {'step ms':>9} "
            f"{'x nonpriv':>9} {'x opacus':>8} {'peak MB':>8} {'tensor MB':>9}  error")
    lines = [head, "-" * len(head)]
    for r in rows:
        err = r["error"] or ""
        if len(err) > error_width:
            err = err[: error_width - 3] + "..."
        lines.append(
            f"{r['model']:<12} {r['mode']:<17} {r['batch_size']:>5} "
            f"{_fmt(r['examples_per_s'], '.1f'):>10} {_fmt(r['step_ms'], '.2f'):>9} "
            f"{_fmt(r['ratio_to_nonprivate'], '.2f'):>9} "
            f"{_fmt(r['ratio_to_best_opacus'], '.2f'):>8} "
            f"{_fmt(r['peak_mem_mb'], '.1f'):>8} {_fmt(r['peak_tensor_mb'], '.1f'):>9}  "
            f"{'FAILED: ' + err if err else ''}".rstrip())
    return "\n".join(lines)


def format_markdown(rows: list[dict]) -> str:
    """The same table as GitHub markdown (for the README)."""
    lines = ["| model | mode | batch | examples/s | step ms | × non-private | × best Opacus "
             "| peak MB | tensor MB | error |", "|" + "---|" * 2 + "---:|" * 7 + "---|"]
    for r in rows:
        err = (r["error"] or "").replace("|", "\\|")
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['batch_size']} | "
            f"{_fmt(r['examples_per_s'], '.1f')} | {_fmt(r['step_ms'], '.2f')} | "
            f"{_fmt(r['ratio_to_nonprivate'], '.2f')} | {_fmt(r['ratio_to_best_opacus'], '.2f')} | "
            f"{_fmt(r['peak_mem_mb'], '.1f')} | {_fmt(r['peak_tensor_mb'], '.1f')} | "
            f"{'failed: ' + err if err else ''} |")
    return "\n".join(lines)


def allocator_line(variables: dict[str, str], malloc: str) -> str:
    """How the cases' allocator was set up: environment variables and ``--malloc``."""
    parts = [f"{k}={v}" for k, v in variables.items()]
    if malloc == "retain":
        parts.append("--malloc retain (dplis.retain_freed_memory() in every case's process: "
                     "M_TRIM_THRESHOLD 256 MiB, M_MMAP_THRESHOLD 32 MiB)")
    return " ".join(parts) or "process defaults (no MALLOC_*, GLIBC_TUNABLES or LD_PRELOAD)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(max_grad_norm=args.max_grad_norm, noise_multiplier=args.noise_multiplier,
                        dplis_engine=args.dplis_engine)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment()
    started = time.time()
    notes = busy_machine_notes(env, args.threads)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    check_modes = tuple(m for m in args.modes if m in OPACUS_MODES)
    do_check = any(m != "nonprivate" for m in args.modes)
    rounds = min(args.rounds, args.steps)
    phases = [(1 if do_check else 0) + len(args.modes) + (0 if args.in_process else rounds)
              for _ in args.models]
    progress = Progress(sum(phases))
    ctx = None if args.in_process else context()

    rows, checks = [], []
    for model in args.models:
        check = None
        if do_check:
            progress.show(f"{model}: equivalence check (dplis K=1 vs Opacus, noise 0)")
            check = check_model(model, min(args.batch_size, EQUIVALENCE_MAX_BATCH),
                                device=args.device, modes=check_modes, seed=settings.seed,
                                dplis_options=dplis_options(settings))
            checks.append(check)
            progress.advance()
        measured: dict[str, Measurement] = {}
        todo = []
        for mode in args.modes:
            error = check.mode_error(mode) if check else None
            if error is not None:
                measured[mode] = Measurement(error=error)
            else:
                todo.append(dict(model=model, mode=mode, batch_size=args.batch_size,
                                 device=args.device, steps=args.steps, warmup=args.warmup,
                                 settings=settings, threads=args.threads,
                                 malloc=args.malloc))
        if ctx is None:
            for kwargs in todo:
                progress.show(f"{model} {kwargs['mode']} (batch {args.batch_size})")
                measured[kwargs["mode"]] = measure(**kwargs)
                progress.advance()
        else:
            def report(text: str, model=model) -> None:
                progress.show(f"{model}: {text}")
                progress.advance()

            results = measure_interleaved(ctx, todo, steps=args.steps, rounds=args.rounds,
                                          timeout=args.timeout, on_progress=report)
            measured.update({kwargs["mode"]: m for kwargs, m in zip(todo, results)})
        rows += [_row(model, mode, args.batch_size, measured[mode]) for mode in args.modes]
        progress.done = sum(phases[:args.models.index(model) + 1])
    progress.close()
    add_ratios(rows)

    worst = slowest(rows)
    engines = {}
    if any(m.startswith("dplis_") for m in args.modes):
        for model in args.models:
            try:
                engines[model] = dplis_engine_used(model, settings)
            except Exception as e:
                engines[model] = f"unknown ({describe(e)})"
    if hasattr(os, "getloadavg"):
        env["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    device_name = (torch.cuda.get_device_name() if args.device == "cuda"
                   else env.get("processor"))
    result = {
        "device": args.device,
        "torch": torch.__version__,
        "results": rows,
        "device_name": device_name,
        **env,
        "config": {
            "quick": args.quick, "batch_size": args.batch_size, "steps": args.steps,
            "warmup": args.warmup, "rounds": rounds, "threads": args.threads,
            "malloc": args.malloc,
            "models": args.models, "modes": args.modes,
            "isolated": ctx is not None, **settings.as_dict(), "dplis_engine_used": engines,
            "ratio_definition": "step_ms / step_ms of the reference mode (higher = slower)",
        },
        "memory_method": MEMORY_METHOD,
        "tensor_memory_method": TENSOR_METHOD,
        "equivalence": [c.as_dict() for c in checks],
        "slowest": worst,
        "lowest_throughput": lowest_throughput(rows),
        "warnings": notes,
        "wall_s": round(time.time() - started, 1),
    }

    commit = f" (git {env['git_commit']})" if env.get("git_commit") else ""
    print(f"dplis {env['dplis']}{commit} | torch {torch.__version__} | opacus {env['opacus']} | "
          f"{args.device}: {device_name} | {env['cpu_count']} CPUs, "
          f"{env['torch_threads']} torch threads")
    print(f"batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up, "
          f"C={settings.max_grad_norm}, sigma={settings.noise_multiplier}, SGD lr={settings.lr}"
          f"{' (--quick)' if args.quick else ''}")
    if engines:
        print("dplis engine: " + ", ".join(f"{m} {e}" for m, e in engines.items()))
    print(f"allocator: {allocator_line(env['allocator_env'], args.malloc)}")
    for note in notes:
        print(f"warning: {note}")
    print()
    print(format_markdown(rows) if args.markdown else format_table(rows))
    print()
    for c in checks:
        ok = [v.opacus_mode for v in c.verdicts if v.ok]
        bad = [v.opacus_mode for v in c.verdicts if not v.ok]
        status = "FAILED: " + c.dplis_error if c.dplis_error else "dplis K=1 matches " + (
            ", ".join(ok) if ok else "no Opacus mode")
        low_memory = (f"; low_memory FAILED: {c.low_memory_error}" if c.low_memory_error
                      else "; low_memory=True matches dplis K=1" if not c.dplis_error else "")
        print(f"equivalence {c.model} (batch {c.batch_size}, C = median norm"
              f"{'' if c.max_grad_norm is None else f' {c.max_grad_norm:.3g}'}): {status}"
              f"{'; not comparable: ' + ', '.join(bad) if bad else ''}{low_memory}")
    if worst:
        print(f"slowest model x mode: {worst['model']} x {worst['mode']} "
              f"({worst['ratio_to_nonprivate']:.2f}x the non-private step time, "
              f"{worst['examples_per_s']:.1f} examples/s)")
    if result["lowest_throughput"]:
        low = result["lowest_throughput"]
        print(f"lowest throughput: {low['model']} x {low['mode']} "
              f"({low['examples_per_s']:.1f} examples/s, {low['step_ms']:.1f} ms per step)")
    print(f"total wall time {result['wall_s']} s")

    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(folder, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")

    ours_failed = any(r["error"] for r in rows if not r["mode"].startswith("opacus_"))
    return 1 if ours_failed else 0


if __name__ == "__main__":
    sys.exit(main())
