"""Keep freed CPU memory in the process, so that compiled lazy graphs do not page-fault.

Inductor plans buffers per graph: each ``cond`` branch of a lazy graph allocates its own
buffers and frees them when it returns, where the plain graph reuses one buffer across all
blocks. glibc's malloc serves such sizes (megabytes: DiT-S/2's MLP hidden activation at batch 2
is 3 MB) with fresh pages, mapped on each allocation or trimmed off the heap on each free, so
every branch call page-faults when it first touches them. Measured on the 2-core CPU: the bias
fill of that buffer took 2.2 ms per block in a branch against 1.0 ms in the plain graph, and a
0%-lazy ``lazydit`` call cost 1.056x plain Inductor (1.016x with :func:`tune_cpu_allocator`;
``benchmarks/allocator.py``).
GPUs are unaffected (PyTorch's caching allocator keeps freed blocks).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def tune_cpu_allocator(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Make glibc's malloc keep freed memory for reuse: allocations below ``mmap_threshold``
    bytes come from the heap, and the heap keeps up to ``trim_threshold`` bytes of free memory
    instead of handing it back to the system at every free.

    Process-wide and lasting (it also fixes glibc's thresholds, which it otherwise adapts): the
    process keeps what it freed, up to ``trim_threshold``, in exchange for no page faults on
    memory it reuses. Call it once, before compiling, on Linux CPU inference. Returns True if
    applied; False where the C library is not glibc (macOS, Windows, musl), changing nothing.
    Environment variables do the same without code: ``MALLOC_MMAP_THRESHOLD_=67108864
    MALLOC_TRIM_THRESHOLD_=268435456``; so does running under jemalloc or tcmalloc.

    Example:
        >>> import lazypass
        >>> lazypass.tune_cpu_allocator() in (True, False)
        True
    """
    for name, v in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 < v < 2**31:
            raise ValueError(f"tune_cpu_allocator: {name} must be a number of bytes between 1 and 2**31 - 1, "
                             f"got {v!r}")
    libc = _glibc()
    if libc is None:
        return False
    done = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
    return libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1 and done
