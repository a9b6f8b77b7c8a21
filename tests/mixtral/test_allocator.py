"""The serving processes' malloc settings: a freed block of a prefill's size comes back without page faults.

Each case runs in a fresh Python (mallopt's settings are the whole process's), which frees a 64 MiB torch
tensor and then counts the page faults of allocating and filling a 48 MiB one. (The same size again is not
always reused: torch asks for its blocks aligned, glibc takes a little more than the size for that, and a
small allocation may since have taken the freed block's neighbour.)
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mixtral.allocator import is_glibc

pytestmark = pytest.mark.skipif(not is_glibc(), reason="glibc's allocator only")

SCRIPT = """
import resource, sys, torch
from mixtral.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tuned" else None
torch.empty(64 << 20, dtype=torch.uint8).fill_(1)  # allocated, touched, freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(48 << 20, dtype=torch.uint8).fill_(1)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = (48 << 20) // 4096  # of the second block


def refill_faults(mode: str, **env: str) -> tuple[str, int]:
    """(what keep_freed_memory returned, page faults of the 48 MiB block) in a fresh process."""
    environment = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"} | env
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True,
                         env=environment).stdout.split()
    return out[0], int(out[1])


def test_a_freed_block_is_reused_without_faulting_it_in_again() -> None:
    default_applied, default_faults = refill_faults("default")
    tuned_applied, tuned_faults = refill_faults("tuned")
    assert (default_applied, tuned_applied) == ("None", "True")
    # glibc's own settings give a block this size back on free: the next one is faulted in page by page.
    assert default_faults > PAGES // 2, default_faults
    assert tuned_faults < PAGES // 20, tuned_faults


def test_the_operators_own_malloc_tunables_are_kept() -> None:
    # A trim threshold alone turns glibc's adaptive mmap threshold off: the block is mapped anew each time.
    applied, faults = refill_faults("tuned", GLIBC_TUNABLES="glibc.malloc.trim_threshold=1048576")
    assert applied == "False"
    assert faults > PAGES // 2, faults
