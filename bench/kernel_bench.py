"""Bandwidth of the fused kernels: ``python -m bench.kernel_bench [--device cuda|cpu] [--json F]``.

The kernels are memory-bound, so the figure that matters is achieved bandwidth as a
fraction of what the device reaches on a plain copy. For each D, (K, B) and dtype it
times, on one flat ``[K, B, D]`` gradient buffer (the layout ``dplis.private_grad`` uses):

* ``fused_dp_step`` with the Triton backend and with the torch reference (public API,
  norms + clip factors + non-finite check + clipped noisy sum). Bytes counted: the
  K·B·D gradients read twice (norms pass, sum pass) plus the D outputs written.
* ``perturb`` (D parameters read, K·D written), both backends.
* ``copy``: ``dst.copy_(src)`` of a K·B·D buffer, counted as 2·K·B·D·itemsize bytes.

and reports GB/s and the fraction of the copy's GB/s. It also times ``ghost_sq_norms``
(the ghost engine's per-example norms of one layer, u [B, P, M], v [B, P, N]) on
transformer-shaped inputs, both backends; that op is compute-bound (two P x P Grams per
example), so its row gives the time and the input bytes read, and no copy fraction.
On CUDA times come from
``triton.testing.do_bench``; on CPU (``--device cpu``: tiny sizes, a smoke test) from
wall-clock medians, with the Triton backend only under ``TRITON_INTERPRET=1``.
Nothing touches CUDA at import time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
from dplis.kernels.backend import interpreting, triton_available

from dplis import kernels

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPU_SIZES = (1_000_000, 10_000_000, 30_000_000)
CPU_SIZES = (10_000, 100_000)
KB = ((1, 8), (4, 8))


def time_ms(fn: Callable[[], object], device: str, rep_ms: int) -> float:
    """Median milliseconds per call of ``fn``."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=max(rep_ms // 4, 5), rep=rep_ms))
    fn()  # warm-up
    times = []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def bench_case(D: int, K: int, B: int, dtype: torch.dtype, device: str, backends, rep_ms: int):
    """Rows for one (D, K, B, dtype): copy, then each op x backend."""
    item = torch.finfo(dtype).bits // 8
    grads = torch.randn(K, B, D, device=device, dtype=dtype)
    theta = torch.randn(D, device=device, dtype=dtype)
    base = dict(D=D, K=K, B=B, dtype=str(dtype).removeprefix("torch."), device=device)
    rows = []

    dst = torch.empty_like(grads)
    ms = time_ms(lambda: dst.copy_(grads), device, rep_ms)
    copy_gbps = 2 * grads.numel() * item / ms / 1e6
    rows.append(dict(base, op="copy", backend="torch", ms=ms, bytes=2 * grads.numel() * item))

    for backend in backends:
        step = lambda b=backend: kernels.fused_dp_step(  # noqa: E731
            [grads], max_grad_norm=1.0, noise_std=1.0, divisor=float(B), seed=0, backend=b,
            batch_dims=2,
        )  # fmt: skip
        nbytes = 2 * grads.numel() * item + D * item
        rows.append(dict(base, op="fused_dp_step", backend=backend,
                         ms=time_ms(step, device, rep_ms), bytes=nbytes))  # fmt: skip
        pert = lambda b=backend: kernels.perturb(  # noqa: E731
            [theta], std=0.01, num_perturbations=K, seed=0, backend=b
        )
        nbytes = D * item + K * D * item
        rows.append(dict(base, op="perturb", backend=backend,
                         ms=time_ms(pert, device, rep_ms), bytes=nbytes))  # fmt: skip
    for row in rows:
        row["GBps"] = row["bytes"] / row["ms"] / 1e6
        row["frac_of_copy"] = row["GBps"] / copy_gbps
    return rows


GPU_GHOST = ((32, 1024, 768, 768), (64, 128, 3072, 768))  # (B, P, M, N): GPT-2-sized layers
CPU_GHOST = ((4, 40, 32, 24),)


def bench_ghost(shape: tuple[int, int, int, int], dtype: torch.dtype, device: str, backends,
                rep_ms: int) -> list[dict]:
    """Rows of ``ghost_sq_norms`` for one (B, P, M, N) and dtype, one per backend."""
    B, P, M, N = shape
    u = torch.randn(B, P, M, device=device, dtype=dtype)
    v = torch.randn(B, P, N, device=device, dtype=dtype)
    nbytes = (u.numel() + v.numel()) * u.element_size()
    rows = []
    for backend in backends:
        ms = time_ms(lambda b=backend: kernels.ghost_sq_norms(u, v, backend=b), device, rep_ms)
        rows.append(dict(op="ghost_sq_norms", backend=backend, dtype=str(dtype).removeprefix(
            "torch."), K=1, B=B, D=P * (M + N), P=P, M=M, N=N, device=device, ms=ms,
            bytes=nbytes, GBps=nbytes / ms / 1e6, frac_of_copy=None))
    return rows


def print_table(rows) -> None:
    head = f"{'op':<14}{'backend':<8}{'dtype':<9}{'K':>3}{'B':>4}{'D':>12}"
    print(f"{head}{'ms':>10}{'GB/s':>10}{'of copy':>9}")
    for r in rows:
        print(
            f"{r['op']:<14}{r['backend']:<8}{r['dtype']:<9}{r['K']:>3}{r['B']:>4}{r['D']:>12,}"
            f"{r['ms']:>10.3f}{r['GBps']:>10.1f}"
            + (f"{r['frac_of_copy']:>9.1%}" if r["frac_of_copy"] is not None else f"{'-':>9}")
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernel_bench", description=__doc__)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda when available, else cpu")  # fmt: skip
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="D values")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--backends", nargs="+", choices=("triton", "torch"), default=None)
    parser.add_argument("--rep-ms", type=int, default=None, help="timing budget per measurement")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    triton_ok = triton_available() and (device == "cuda" or interpreting())
    backends = args.backends or (["triton", "torch"] if triton_ok else ["torch"])
    if "triton" in backends and not triton_ok:
        parser.error("the triton backend needs CUDA, or TRITON_INTERPRET=1 on cpu")
    sizes = args.sizes or (GPU_SIZES if device == "cuda" else CPU_SIZES)
    rep_ms = args.rep_ms or (100 if device == "cuda" else 200)

    rows = []
    for D in sizes:
        for K, B in KB:
            for name in args.dtypes:
                rows += bench_case(D, K, B, DTYPES[name], device, backends, rep_ms)
                if device == "cuda":
                    torch.cuda.empty_cache()
    for shape in GPU_GHOST if device == "cuda" else CPU_GHOST:
        for name in args.dtypes:
            rows += bench_ghost(shape, DTYPES[name], device, backends, rep_ms)
    print_table(rows)

    meta = dict(torch=torch.__version__, python=platform.python_version(), device=device,
                interpreted=interpreting())  # fmt: skip
    if device == "cuda":
        import triton

        meta.update(gpu=torch.cuda.get_device_name(), triton=triton.__version__)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
