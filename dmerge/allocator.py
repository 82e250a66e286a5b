"""The process's C allocator: keep freed tensor memory for reuse, give it back when a
memory limit needs it.

glibc serves allocations above 128 KiB (every block and chunk temporary) with a fresh
``mmap`` and unmaps them on free, so each temporary costs page faults and the kernel
zeroing its pages: on the merge path that was a third of the CPU time, all in the
kernel. Raising the mmap and trim thresholds lets freed chunks be reused from the heap.
Peak memory is unchanged (the same temporaries, reused rather than remapped).

The price is a heap that keeps what it once held: two task threads interleaving
allocations leave it fragmented, and a worker's RSS was seen at 5 GB with 0.3 GB live.
A Dask worker with a memory limit judges the process by its RSS (it pauses at 80 % and
is killed at 95 %), so :func:`release_if_above` hands free heap pages back
(``malloc_trim``) after a task once RSS passes half the limit. That is also why the
trim threshold the Dask nanny puts in its workers' environment
(``MALLOC_TRIM_THRESHOLD_=65536``, which makes glibc give memory back after nearly every
free) is overridden: with it, a linear merge on two nanny workers took 1.55x the
in-process cluster's time, with the override 1.06x (docs/benchmarks.md), and the
release after each task keeps the limit honoured. ``DMERGE_MALLOC_TUNING=0`` leaves
glibc's settings alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False
_libc = None
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _load_libc():
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.mallopt  # noqa: B018 -- glibc has it; musl and others do not
            _libc.malloc_trim
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def keep_freed_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Tune glibc's malloc for this process (once); returns False where not applicable
    (another libc, or ``DMERGE_MALLOC_TUNING=0``)."""
    global _done
    if _done:
        return True
    libc = _load_libc()
    if libc is None or os.environ.get("DMERGE_MALLOC_TUNING", "1") == "0":
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1 and ok
    _done = ok
    return ok


def resident_bytes() -> int:
    """This process's resident set size (0 where /proc is not available)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def release_freed_memory() -> bool:
    """Give the heap's free pages back to the system (``malloc_trim(0)``)."""
    libc = _load_libc()
    return bool(libc is not None and libc.malloc_trim(0))


def release_if_above(limit: int | None, share: float = 0.5) -> bool:
    """After a task: release free heap pages when RSS exceeds ``share`` of ``limit``
    (a worker's memory limit; None or 0: no limit, nothing to do)."""
    if not limit or resident_bytes() <= share * limit:
        return False
    return release_freed_memory()
