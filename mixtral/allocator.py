"""glibc's malloc settings for a process that runs the model's steps on the CPU (a router, an expert host).

A prefill step allocates and frees blocks of tens of MB on every layer: torch's activations and the
expert kernel's scratch. By default glibc hands a freed block above its mmap threshold (which adapts, up to
32 MiB) back to the kernel, and trims the heap's free top beyond twice that, so the next layer maps the same
sizes anew and the kernel zeroes every page as it is first touched. On the 2-core machine a prefill of
32 x 128 tokens of the `mini` demo model took 80,000-95,000 page faults (330-370 MiB zeroed) that way, and
2,300-2,500 (on the engine's own thread) with the settings below: 2.05 s against 2.11-2.26 s per step.
Decode steps fault about never either way.

The price is memory the process keeps after a step: freed blocks stay in its heap for reuse instead of
going back to the system, up to TRIM_THRESHOLD of free heap top (the process's peak, its high-water mark,
is about the same). An operator who sets glibc's malloc tunables (`GLIBC_TUNABLES=glibc.malloc....`) keeps
theirs.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 256 * 2**20  # blocks below this come from the heap, and return to it when freed
TRIM_THRESHOLD = 512 * 2**20  # the heap gives its free top back to the system only beyond this
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def keep_freed_memory() -> bool:
    """Apply the thresholds above to this process's allocator; False where it is not glibc's or the operator
    set glibc's malloc tunables. Call it after loading weights, so that loading's temporaries go back (a live
    re-placement's load later keeps its own in the heap, up to TRIM_THRESHOLD)."""
    if not is_glibc() or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    libc = ctypes.CDLL(None)
    applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not applied:
        log.warning("glibc refused the malloc thresholds; prefill steps will fault their memory in anew")
    return applied


def is_glibc() -> bool:
    """Whether this process's C library is glibc (the thresholds above are glibc's)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):  # a platform without the name (macOS, musl)
        return False
