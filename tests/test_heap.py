"""Tests for ecprune_onnx.heap: with the threshold fixed, freed temporaries leave the process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ecprune_onnx import heap

# Frees 64 temporaries of 4 MiB, each with a small long-lived block allocated after it, and
# prints the resident MiB. glibc's own threshold rose past 4 MiB when the 16 MiB block was
# freed, so it serves the temporaries from its heap, where the small blocks pin the pages.
SCRIPT = """
import sys
import numpy as np
from ecprune_onnx import heap

if sys.argv[1] == "fixed":
    assert heap.return_freed_memory()
big = np.ones(16 << 20, dtype=np.uint8)
del big
kept, temporaries = [], []
for _ in range(64):
    temporaries.append(np.ones(4 << 20, dtype=np.uint8))
    kept.append(np.ones(1 << 13, dtype=np.uint8))
del temporaries
with open("/proc/self/status") as status:
    print(next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmRSS")))
"""


def _resident_mib(mode: str) -> int:
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return int(run.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc: Linux only")
def test_freed_temporaries_go_back_to_the_system_once_the_threshold_is_fixed():
    if not heap.return_freed_memory():
        pytest.skip("the C library is not glibc")

    default, fixed = _resident_mib("default"), _resident_mib("fixed")

    assert default - fixed > 128  # of the 256 MiB freed
