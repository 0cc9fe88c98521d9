"""Peak tensor memory of a function on any device, from torch.profiler's allocator events.

CPU has no allocator statistics like ``torch.cuda.max_memory_allocated``; the profiler records
every allocation and free with the running total, whose maximum is the peak.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile


def peak_tensor_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of the tensors ``fn`` allocates and still holds. The profiler does not see
    frees of tensors allocated before ``fn`` started, so one ``fn`` frees and replaces (a
    gradient) still counts in full."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    memory = [e["args"] for e in events if e.get("name") == "[memory]"]
    if not memory:
        return 0
    start = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(m["Total Allocated"] for m in memory) - start
