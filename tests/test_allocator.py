"""``dplis.retain_freed_memory``: glibc keeps freed memory, so a re-allocation does not fault."""

import resource
from types import SimpleNamespace

import pytest
import torch

import dplis
from dplis import allocator

glibc = pytest.mark.skipif(allocator._glibc() is None, reason="needs glibc (mallopt)")


def _faults_of(fn) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@glibc
def test_freed_memory_is_touched_again_without_page_faults():
    assert dplis.retain_freed_memory() is True
    pages = (24 << 20) // resource.getpagesize()  # 24 MiB: above glibc's default thresholds

    def touch():
        buf = torch.empty(24 << 20, dtype=torch.uint8)
        buf.fill_(1)
        del buf

    touch()  # the first time may fault the pages in
    faults = min(_faults_of(touch) for _ in range(3))
    # given back and mapped again, each touch would fault every page in (6144 of 4 KiB)
    assert faults < pages // 20, f"{faults} page faults re-touching {pages} retained pages"


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
