"""``dplis.retain_freed_memory``: glibc keeps freed memory, so a re-allocation does not fault."""

import json
import resource
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import dplis
from dplis import allocator

glibc = pytest.mark.skipif(allocator._glibc() is None, reason="needs glibc (mallopt)")
mallinfo2 = pytest.mark.skipif(not hasattr(allocator._glibc(), "mallinfo2"),
                               reason="needs glibc 2.33 or newer (mallinfo2)")

PROBE = Path(__file__).with_name("malloc_probe.py")


def _probe(trim_threshold: int) -> list[dict]:
    """Rounds of ``malloc_probe`` (8 freed blocks of 24 MiB each) in a fresh process."""
    proc = subprocess.run([sys.executable, str(PROBE), str(trim_threshold)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@glibc
@mallinfo2
def test_freed_memory_is_kept_and_touched_again_without_page_faults():
    """The default thresholds keep a step's 192 MiB in the heap: once the heap has settled
    (fragments from the first rounds), re-allocating it faults no page in. The control, the
    same call with a 1 MiB trim threshold, hands the freed heap top back and faults it in
    again every round or two: the measurement sees a trim when there is one."""
    block_pages = (24 << 20) // resource.getpagesize()
    kept, trimmed = _probe(256 << 20), _probe(1 << 20)
    assert all(r["heap_after_free"] == r["heap_held"] for r in kept), kept
    assert any(r["heap_after_free"] < r["heap_held"] for r in trimmed), trimmed
    settled = sum(r["faults"] for r in kept[-4:])
    assert settled < block_pages // 4, f"{settled} page faults in the last 4 rounds: {kept}"
    refaulted = sum(r["faults"] for r in trimmed[-4:])
    assert refaulted >= block_pages, f"control: {refaulted} faults in 4 rounds: {trimmed}"


@glibc
def test_mallopt_refusal_is_an_error(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: SimpleNamespace(mallopt=lambda o, v: 0))
    with pytest.raises(OSError, match="mallopt refused M_MMAP_THRESHOLD"):
        dplis.retain_freed_memory()


def test_without_glibc_nothing_changes(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "_glibc", lambda: calls.append(1))
    assert dplis.retain_freed_memory() is False and calls == [1]


@pytest.mark.parametrize("kwargs, error, match", [
    ({"mmap_threshold": (32 << 20) + 1}, ValueError, "at most 33554432"),
    ({"trim_threshold": 2**31}, ValueError, "C int"),
    ({"trim_threshold": 0}, ValueError, "trim_threshold must be an int >= 1"),
    ({"mmap_threshold": 1.5}, TypeError, "mmap_threshold must be an int"),
    ({"trim_threshold": True}, TypeError, "trim_threshold must be an int"),
])
def test_bad_thresholds_are_refused_before_any_change(monkeypatch, kwargs, error, match):
    monkeypatch.setattr(allocator, "_glibc", lambda: pytest.fail("reached mallopt"))
    with pytest.raises(error, match=match):
        dplis.retain_freed_memory(**kwargs)
