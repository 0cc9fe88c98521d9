"""Keep freed CPU memory in the process (glibc ``mallopt``): no page faults from step to step.

With glibc's defaults, memory freed at the end of a training step is handed back to the
system (heap trimming, unmapped large blocks) and faulted in again, page by page, in the next
step. A private step holds more at once than a non-private one (layer inputs and output
gradients for the book-keeping, per-example convolution gradients), so it pays more such faults:
on a 2-core VM about 1.4 k per CNN step and 3 k per transformer step, a quarter of the step.

``retain_freed_memory`` raises the two thresholds that decide this, for the whole process
and for good (glibc has no way back to its adaptive defaults): freed memory up to
``trim_threshold`` stays in the heap, and blocks under ``mmap_threshold`` come from the heap
instead of fresh mappings. It is what the PyTorch CPU tuning guide reaches with an environment
variable or a preloaded jemalloc/tcmalloc, applied at run time. Nothing calls it implicitly:
``python -m dplis.train`` does (it owns its process); a library user calls it once.
"""

from __future__ import annotations

import ctypes

from . import checks

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses more on 64-bit (HEAP_MAX_SIZE / 2)
INT_MAX = 2**31 - 1
MALLOC_MODES = ("default", "retain")  # the --malloc choices of dplis.train and bench


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (has ``mallopt``), else None."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:  # Windows: no process-wide handle
        return None
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):
        return None  # macOS, musl: other allocators, other knobs
    return libc


def retain_freed_memory(trim_threshold: int = 256 << 20,
                        mmap_threshold: int = MMAP_THRESHOLD_MAX) -> bool:
    """Set glibc's M_TRIM_THRESHOLD and M_MMAP_THRESHOLD (bytes) for this process.

    Returns True when applied, False where the C library is not glibc (nothing changes).
    ``trim_threshold``: free heap memory kept before any is returned (default 256 MiB);
    ``mmap_threshold``: blocks at least this large get their own mapping (default and most:
    32 MiB). Process-wide and permanent; the cost is resident memory kept after a step: up
    to ``trim_threshold`` free at the heap's top, plus the holes that fragments leave.
    Same effect as ``MALLOC_TRIM_THRESHOLD_=268435456 MALLOC_MMAP_THRESHOLD_=33554432`` in
    the environment before Python starts.
    """
    trim_threshold = checks.integer("trim_threshold", trim_threshold, 1)
    mmap_threshold = checks.integer("mmap_threshold", mmap_threshold, 1)
    if trim_threshold > INT_MAX:
        raise ValueError(f"trim_threshold must be at most {INT_MAX} bytes (mallopt takes a C "
                         f"int), got {trim_threshold}")
    if mmap_threshold > MMAP_THRESHOLD_MAX:
        raise ValueError(f"mmap_threshold must be at most {MMAP_THRESHOLD_MAX} bytes (32 MiB, "
                         f"glibc's limit on 64-bit), got {mmap_threshold}")
    libc = _glibc()
    if libc is None:
        return False
    for name, option, value in (("M_MMAP_THRESHOLD", M_MMAP_THRESHOLD, mmap_threshold),
                                ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, trim_threshold)):
        if libc.mallopt(ctypes.c_int(option), ctypes.c_int(value)) != 1:
            raise OSError(f"glibc mallopt refused {name}={value}")
    return True
