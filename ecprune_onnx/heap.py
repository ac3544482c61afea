"""Free pages of the C heap given back to the system (glibc's malloc_trim).

glibc serves an allocation below its mmap threshold from its heap, and that threshold rises
with every larger block freed, up to 32 MiB: the statistics' per-batch tensors (a [256, 7069]
float32 activation is 7 MiB) then come from the heap, and the pages of those freed stay
resident between the long-lived sums and weights, 0.1 GiB more with each few batches at a
100M-weight compress. `trim` hands them back; a later allocation faults them in again.

Fixing the threshold instead (mallopt, which sends every such tensor to a mapping of its
own) was measured at 100M weights, 4096 rows, `ec`, with glibc's MALLOC_MMAP_THRESHOLD_ at
1 MiB beside its own rule (BENCHMARKS.md, "Sixth round"): 23.0 against 23.6 bytes per
weight, but 75 against 64 s, the S1/S2 products' 8 MiB blocks faulted in afresh each time
(19 against 11 s). It would also bind every other library of the caller's process.
"""

from __future__ import annotations

import ctypes
import functools


def trim() -> None:
    """Give the heap's free pages back (glibc); nothing where the C library is another."""
    malloc_trim = _malloc_trim()
    if malloc_trim is not None:
        malloc_trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        return None
