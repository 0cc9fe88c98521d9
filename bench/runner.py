"""Time one (model, mode) case and measure its peak memory, each in a fresh process.

Timing: ``warmup`` untimed steps, then ``steps`` timed steps (``time.perf_counter`` around the
step closure, which waits for CUDA); the CLI reports the median.

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

from .cases import Settings, make_step
from .equivalence import describe

MEMORY_METHOD = (
    "peak memory = what the step adds on top of the built model, batch and optimizer, over "
    "warm-up + timed steps, each case in a fresh process. CPU: peak RSS minus RSS right before "
    "the first step (Linux: VmHWM reset via /proc/self/clear_refs; elsewhere ru_maxrss). "
    "CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() before the first step."
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


def measure(model: str, mode: str, batch_size: int, *, device: str = "cpu", steps: int = 10,
            warmup: int = 2, settings: Settings | None = None,
            threads: int | None = None) -> Measurement:
    """Build the case, run ``warmup`` + ``steps`` steps; never raises for a failing mode."""
    if threads:
        torch.set_num_threads(threads)
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
        except Exception as e:
            return Measurement(error=describe(e))
        return Measurement(times=times, peak_mem_mb=meter.peak_mb())


def _worker(conn, kwargs: dict) -> None:
    try:
        result = measure(**kwargs)
    except BaseException as e:  # keep the parent informed whatever happens
        result = Measurement(error=describe(e))
    conn.send(result)
    conn.close()


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


def measure_isolated(ctx, *, timeout: float, **kwargs) -> Measurement:
    """``measure(**kwargs)`` in a fresh child process; a crash or timeout becomes an error."""
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(child, kwargs), daemon=True)
    proc.start()
    child.close()
    result = None
    try:
        if parent.poll(timeout):
            result = parent.recv()
        else:
            proc.kill()
            result = Measurement(error=f"timed out after {timeout:g} s")
    except EOFError:  # the child died without sending anything
        pass
    finally:
        parent.close()
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if result is None:
        result = Measurement(error=f"worker process died (exit code {proc.exitcode})")
    return result


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
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["processor"] = names[0]
    except OSError:
        pass
    if hasattr(os, "getloadavg"):
        info["load_avg_start"] = [round(v, 2) for v in os.getloadavg()]
    return info
