"""Kill a child process whose resident memory passes a limit (shared by the benchmarks)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

GIB = 1024**3


def watch_memory(
    process: subprocess.Popen, limit_gib: float, killed: list[str], interval: float = 0.1
) -> None:
    """Poll the child's VmRSS; above the limit, kill its process group and say why in
    `killed`. Returns when the child ends. Linux only (/proc).

    It reads /proc and never waits on the child: `process.poll()` would reap it, and the
    caller's `os.wait4` (for the child's peak RSS) would then find no child."""
    status = Path(f"/proc/{process.pid}/status")
    while True:
        try:
            text = status.read_text()
        except OSError:  # reaped by the caller
            return
        if "\nState:\tZ" in text:  # exited, not yet reaped
            return
        for line in text.splitlines():
            if line.startswith("VmRSS:") and int(line.split()[1]) * 1024 > limit_gib * GIB:
                killed.append(f"killed by the watchdog above {limit_gib:g} GiB RSS")
                os.killpg(process.pid, signal.SIGKILL)
                return
        time.sleep(interval)
