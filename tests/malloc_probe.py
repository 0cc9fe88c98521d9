"""Run as a fresh process by ``test_allocator``: how glibc treats a step's worth of freed memory.

``python tests/malloc_probe.py TRIM`` calls ``dplis.retain_freed_memory(trim_threshold=TRIM)``
(bytes), then ROUNDS times allocates BLOCKS blocks of 24 MiB (each under the 32 MiB mmap
threshold, 192 MiB together), writes and frees them. It prints one JSON list: per round, the
heap size (glibc ``mallinfo2().arena``, bytes) before and after the free, and the round's
minor page faults. A fresh process, so that no other test's heap history (fragments that make
the heap grow) is in the figures.
"""

import ctypes
import json
import resource
import sys

import torch

import dplis

BLOCKS, BLOCK, ROUNDS = 8, 24 << 20, 12


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def main(trim_threshold: int) -> None:
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    assert dplis.retain_freed_memory(trim_threshold=trim_threshold)
    rounds = []
    for _ in range(ROUNDS):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [torch.empty(BLOCK, dtype=torch.uint8) for _ in range(BLOCKS)]
        for block in blocks:
            block.fill_(1)
        held = libc.mallinfo2().arena
        del blocks, block
        freed = libc.mallinfo2().arena
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        rounds.append({"heap_held": held, "heap_after_free": freed, "faults": faults})
    print(json.dumps(rounds))


if __name__ == "__main__":
    main(int(sys.argv[1]))
