"""keep_freed_memory: takes effect where glibc is, and is a no-op elsewhere."""

from __future__ import annotations

import ctypes

import bnlab.experiments.memory as memory


def test_sets_glibc_mmap_and_trim_thresholds(monkeypatch):
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    assert memory.keep_freed_memory() is True
    assert calls == [(-1, 1 << 30), (-3, 1 << 30)]  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD


def test_no_glibc_is_a_no_op(monkeypatch):
    def missing(name):
        raise OSError("no such library")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert memory.keep_freed_memory() is False
