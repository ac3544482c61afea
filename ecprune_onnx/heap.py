"""The C heap's hold on freed memory: large temporaries get mappings of their own.

glibc serves an allocation from its heap, not a mapping of its own, once a freed mapping
was larger than it: its threshold rises with every large block freed, up to 32 MiB. The
per-batch tensors of the statistics (a [256, 7069] float32 activation is 7 MiB) then come
from the heap, and the heap keeps the pages of those freed between the long-lived sums and
weights: 0.2 GiB at the batch loop's peak of a 100M-weight compress
(`benchmarks/peak_steps.py`). A fixed threshold keeps every allocation from
MMAP_THRESHOLD_BYTES up in its own mapping, which goes back to the system when freed.
"""

from __future__ import annotations

import ctypes
import functools

MMAP_THRESHOLD_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h


@functools.cache
def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD_BYTES for this process (once); False
    where the C library is not glibc (macOS, musl), which this leaves as it is."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
