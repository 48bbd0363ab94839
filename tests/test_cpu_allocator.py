"""``lazypass.tune_cpu_allocator``: glibc's malloc keeps freed memory (compiled lazy graphs on CPUs)."""

import platform
import subprocess
import sys

import pytest

import lazypass
from lazypass import cpu_allocator


class _Recorder:
    def __init__(self, answer=1):
        self.calls, self.answer = [], answer

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.answer


def test_sets_both_glibc_thresholds(monkeypatch):
    libc = _Recorder()
    monkeypatch.setattr(cpu_allocator, "_glibc", lambda: libc)
    assert lazypass.tune_cpu_allocator(mmap_threshold=1 << 20, trim_threshold=8 << 20) is True
    assert libc.calls == [(-3, 1 << 20), (-1, 8 << 20)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


def test_refused_setting_is_reported(monkeypatch):
    monkeypatch.setattr(cpu_allocator, "_glibc", lambda: _Recorder(answer=0))
    assert lazypass.tune_cpu_allocator() is False


def test_without_glibc_nothing_changes(monkeypatch):
    monkeypatch.setattr(cpu_allocator, "_glibc", lambda: None)
    assert lazypass.tune_cpu_allocator() is False


@pytest.mark.parametrize("bad", [0, -1, 2**31, 1.5, True, "64MB"])
def test_bad_sizes_are_refused_before_anything_changes(monkeypatch, bad):
    libc = _Recorder()
    monkeypatch.setattr(cpu_allocator, "_glibc", lambda: libc)
    with pytest.raises(ValueError, match="mmap_threshold must be a number of bytes"):
        lazypass.tune_cpu_allocator(mmap_threshold=bad)
    assert libc.calls == []


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_real_glibc_accepts_the_defaults():
    # in a child process: the setting lasts for the whole process
    code = "import lazypass, sys; sys.exit(0 if lazypass.tune_cpu_allocator() else 1)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
