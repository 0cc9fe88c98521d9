"""Time (model, mode) cases and measure their peak memory, each case in its own process.

Timing: ``warmup`` untimed steps, then ``steps`` timed steps (``time.perf_counter`` around the
step closure, which waits for CUDA); the CLI reports the median. The CLI keeps the processes of
one model's modes alive together and interleaves their timed steps in rounds
(``measure_interleaved``), so a slow phase of a shared machine hits every mode alike; each
round starts with untimed steps (``rewarm``), so a mode is timed warm after the others' turns.

Peak memory (``MEMORY_METHOD``): the memory a training step adds on top of the already built
model, batch and optimizer.
- CPU: peak resident set size (RSS) during warm-up + timed steps minus the RSS right before the
  first step. Each case runs in its own fresh process (forked from a server that has only
  imported torch, dplis and opacus), so freed-but-cached memory of an earlier case never hides a
  later case's peak. On Linux the RSS high-water mark is reset first (``/proc/self/clear_refs``)
  and read from ``/proc/self/status`` (VmHWM); elsewhere ``resource.getrusage().ru_maxrss`` is
  used. RSS counts everything the process touches (tensors, autograd buffers, allocator slack),
  not only live tensors.
- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()`` minus
  ``torch.cuda.memory_allocated()`` right before the first step (tensor memory only).

Peak tensor memory (``TENSOR_METHOD``), after the timed steps: one more step, untimed, and the
peak of live tensor bytes it allocates above those live before it (CPU: the profiler's
allocation events, ``dplis.memory.peak_tensor_bytes``; CUDA: ``max_memory_allocated``). Unlike
RSS it leaves out allocator slack and heap fragmentation.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import resource
import sys
import time
import warnings
from dataclasses import dataclass

import torch

from dplis.allocator import MALLOC_MODES, retain_freed_memory
from dplis.memory import peak_tensor_bytes

from .cases import Settings, make_step
from .equivalence import describe

MEMORY_METHOD = (
    "peak memory = what the step adds on top of the built model, batch and optimizer, over "
    "warm-up + timed steps, each case in a fresh process. CPU: peak RSS minus RSS right before "
    "the first step (Linux: VmHWM reset via /proc/self/clear_refs; elsewhere ru_maxrss). "
    "CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() before the first step."
)
TENSOR_METHOD = (
    "tensor MB = peak bytes of the tensors one more (untimed) step allocates and still holds. "
    "CPU: torch.profiler's allocation events (dplis.memory.peak_tensor_bytes), which do not "
    "see frees of tensors older than the step, so a buffer the step replaces (a gradient) "
    "counts in full; CUDA: max_memory_allocated() above the bytes live before the step. No "
    "allocator slack or fragmentation, unlike peak MB."
)
_MB = 2**20


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class MemoryMeter:
    """Peak memory added between ``start()`` and ``peak_mb()``; see ``MEMORY_METHOD``."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        self.proc = False
        try:  # reset the RSS high-water mark to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.proc = _status_kb("VmRSS") is not None and _status_kb("VmHWM") is not None
        except OSError:
            pass
        self.base = _status_kb("VmRSS") * 1024 if self.proc else _maxrss_bytes()

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.proc:
            peak = _status_kb("VmHWM") * 1024
        else:
            peak = _maxrss_bytes()
        return max(0, peak - self.base) / _MB


@dataclass
class Measurement:
    """Raw timings (seconds) and peak memory of one case, or the error that stopped it."""

    times: list[float] | None = None
    peak_mem_mb: float | None = None
    error: str | None = None
    peak_tensor_mb: float | None = None


def tensor_peak_mb(step, device: torch.device) -> float:
    """Peak live tensor memory (MB) one call of ``step`` adds; see ``TENSOR_METHOD``."""
    if device.type != "cuda":
        return peak_tensor_bytes(step) / _MB
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    return max(0, torch.cuda.max_memory_allocated(device) - base) / _MB


def measure(model: str, mode: str, batch_size: int, *, device: str = "cpu", steps: int = 10,
            warmup: int = 2, settings: Settings | None = None,
            threads: int | None = None, malloc: str = "default") -> Measurement:
    """Build the case, run ``warmup`` + ``steps`` steps; never raises for a failing mode.

    ``malloc="retain"``: ``dplis.allocator.retain_freed_memory()`` first (every mode alike).
    """
    prepare(threads, malloc)
    dev = torch.device(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' notices would garble the progress line
        try:
            step = make_step(model, mode, batch_size, device=dev, settings=settings)
        except Exception as e:
            return Measurement(error=describe(e))
        meter = MemoryMeter(dev)
        meter.start()
        times = []
        try:
            for _ in range(warmup):
                step()
            for _ in range(steps):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            peak = meter.peak_mb()  # before the profiled step: the profiler's own memory
            tensors = tensor_peak_mb(step, dev)
        except Exception as e:
            return Measurement(error=describe(e))
        return Measurement(times=times, peak_mem_mb=peak, peak_tensor_mb=tensors)


def prepare(threads: int | None, malloc: str) -> None:
    """Process setup before a case is built: torch threads, and with ``malloc="retain"`` glibc
    keeps freed memory (``dplis.allocator.retain_freed_memory``: no page faults from step to
    step); applied alike to every mode, non-private and Opacus included."""
    if threads:
        torch.set_num_threads(threads)
    if malloc not in MALLOC_MODES:
        raise ValueError(f"malloc must be one of {MALLOC_MODES}, got {malloc!r}")
    if malloc == "retain" and not retain_freed_memory():
        raise RuntimeError("malloc='retain' needs glibc (mallopt); this C library is not glibc")


def _serve(conn, kwargs: dict) -> None:
    """Child process: build one case, warm it up, then time steps on request.

    Protocol (parent -> child / child -> parent): after start the child sends ("ready", None)
    or ("error", message); then each int n asks for n timed steps, answered by ("times", [s])
    or ("error", message); None ends it, answered by ("done", (peak_mem_mb, peak_tensor_mb))
    (the tensor peak from one more, profiled step; see ``TENSOR_METHOD``).
    """
    try:
        warnings.simplefilter("ignore")  # Opacus' notices would garble the progress line
        prepare(kwargs.get("threads"), kwargs.get("malloc", "default"))
        dev = torch.device(kwargs["device"])
        step = make_step(kwargs["model"], kwargs["mode"], kwargs["batch_size"], device=dev,
                         settings=kwargs.get("settings"))
        meter = MemoryMeter(dev)
        meter.start()
        for _ in range(kwargs["warmup"]):
            step()
    except BaseException as e:
        conn.send(("error", describe(e)))
        return
    conn.send(("ready", None))
    while True:
        n = conn.recv()
        if n is None:
            try:
                peak = meter.peak_mb()
                conn.send(("done", (peak, tensor_peak_mb(step, dev))))
            except BaseException as e:
                conn.send(("error", describe(e)))
            return
        try:
            rewarm(step)
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
        except BaseException as e:
            conn.send(("error", describe(e)))
            return
        conn.send(("times", times))


REWARM_STEPS, REWARM_S = 3, 0.02


def rewarm(step) -> None:
    """Untimed steps (at least REWARM_STEPS and REWARM_S seconds) before a round's timed ones.

    After the other cases' turns a process runs its first steps cold (caches, TLB, the
    allocator's heap given back to the system): measured on a 2-core VM, the MLP steps of the
    first few steps after a switch took up to 2x longer, which inflated the medians of modes
    with bigger working sets most.
    """
    start, done = time.perf_counter(), 0
    while done < REWARM_STEPS or (time.perf_counter() - start < REWARM_S and done < 50):
        step()
        done += 1


_PRELOAD = ["torch", "dplis", "bench.cases", "bench.runner", "opacus"]


def context():
    """forkserver where available (fresh, already-imported children); spawn otherwise."""
    if "forkserver" in mp.get_all_start_methods():
        from multiprocessing import forkserver

        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        forkserver.ensure_running()  # start (and preload) now, not inside the first case's timeout
        return ctx
    return mp.get_context("spawn")


class _Worker:
    """One case in its own process (see ``_serve``); errors end up in ``self.error``."""

    def __init__(self, ctx, kwargs: dict, timeout: float):
        self.timeout, self.times, self.error, self.peak = timeout, [], None, None
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, kwargs), daemon=True)
        self.proc.start()
        child.close()

    def _ask(self, message, expect: str):
        if self.error is not None:
            return None
        try:
            if message is not False:
                self.conn.send(message)
            if not self.conn.poll(self.timeout):
                self.error = f"timed out after {self.timeout:g} s"
                self.close()
                return None
            kind, value = self.conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            self.proc.join(timeout=5)
            self.error = f"worker process died (exit code {self.proc.exitcode})"
            return None
        if kind == "error":
            self.error = value
            self.close()
            return None
        assert kind == expect, (kind, expect)
        return value

    def wait_ready(self) -> None:
        self._ask(False, "ready")

    def run(self, n: int) -> None:
        times = self._ask(n, "times")
        if times:
            self.times += times

    def finish(self) -> Measurement:
        self.peak = self._ask(None, "done")
        self.close()
        if self.error is not None:
            return Measurement(error=self.error)
        return Measurement(times=self.times, peak_mem_mb=self.peak[0],
                           peak_tensor_mb=self.peak[1])

    def close(self) -> None:
        if self.proc.is_alive():
            self.proc.join(timeout=5 if self.error is None else 0)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def measure_interleaved(ctx, cases: list[dict], *, steps: int, rounds: int, timeout: float,
                        on_progress=None) -> list[Measurement]:
    """Measure several cases, each in its own process, interleaving their timed steps.

    Every case is built and warmed up first (one after the other); then ``rounds`` rounds each
    run ``steps / rounds`` timed steps of every case in turn, so a slow phase of the machine
    (another job, frequency change) falls on all cases alike and ratios between them stay
    meaningful. Peak memory is per process, hence per case.
    """
    rounds = max(1, min(rounds, steps))
    chunks = [steps // rounds + (1 if r < steps % rounds else 0) for r in range(rounds)]
    workers = []
    for i, kwargs in enumerate(cases):
        if on_progress:
            on_progress(f"building + warm-up {kwargs['mode']} ({i + 1}/{len(cases)})")
        worker = _Worker(ctx, kwargs, timeout)
        worker.wait_ready()
        workers.append(worker)
    for r, n in enumerate(chunks):
        if on_progress:
            on_progress(f"timing round {r + 1}/{rounds} ({n} step{'s' * (n > 1)} per mode)")
        for worker in workers:
            worker.run(n)
    return [worker.finish() for worker in workers]


def _git_commit() -> str | None:
    """Short HEAD of the checkout holding this file, "+dirty" if tracked files changed."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, text=True, capture_output=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


ALLOCATOR_ENV = ("LD_PRELOAD", "GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE")


def allocator_env() -> dict[str, str]:
    """Environment variables that change the process's memory allocator (glibc ``MALLOC_*``
    tunables, ``GLIBC_TUNABLES``, a preloaded jemalloc/tcmalloc, torch's huge-page switch):
    on CPU they move step times by up to 2x (page faults), so a run records them."""
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith("MALLOC_") or k in ALLOCATOR_ENV}


def environment() -> dict:
    """Versions and machine facts recorded with every run."""
    import platform

    try:
        import opacus

        opacus_version = opacus.__version__
    except ImportError:
        opacus_version = None
    import dplis

    info = {
        "opacus": opacus_version,
        "dplis": dplis.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "allocator_env": allocator_env(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["processor"] = names[0]
    except OSError:
        pass
    info["git_commit"] = _git_commit()
    if hasattr(os, "getloadavg"):
        info["load_avg_start"] = [round(v, 2) for v in os.getloadavg()]
    return info
