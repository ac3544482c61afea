"""Tests for ecprune_onnx.heap: trimming gives freed heap pages back to the system."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Frees 64 temporaries of 4 MiB, each with a small long-lived block allocated after it, and
# prints the resident MiB before and after heap.trim(). glibc's own threshold rose past
# 4 MiB when the 16 MiB block was freed, so it served the temporaries from its heap, where
# the small blocks keep the heap from shrinking at its top.
SCRIPT = """
import numpy as np
from ecprune_onnx import heap

def resident_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmRSS"))

big = np.ones(16 << 20, dtype=np.uint8)
del big
kept, temporaries = [], []
for _ in range(64):
    temporaries.append(np.ones(4 << 20, dtype=np.uint8))
    kept.append(np.ones(1 << 13, dtype=np.uint8))
del temporaries
before = resident_mib()
heap.trim()
print(before, resident_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc: Linux only")
def test_trim_gives_the_pages_of_freed_temporaries_back():
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    before, after = map(int, run.stdout.split())

    assert before - after > 128  # of the 256 MiB freed
