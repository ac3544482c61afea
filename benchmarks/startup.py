"""Start-up time of the command line: wall time of answers that need no model work.

    python benchmarks/startup.py [--runs 15]

Runs each command `--runs` times in a fresh process (`python -m ecprune_onnx ...`, from
the repository root), alternating the commands so that machine noise reaches all alike,
beside `python -c pass` (the interpreter's own start). Prints a markdown table: median,
interquartile range and the slowest run, in seconds. Writes nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
SAMPLE = "samples/digits_mlp.onnx"

COMMANDS = {
    "python -c pass": ["-c", "pass"],
    "ecprune-onnx --help": ["-m", "ecprune_onnx", "--help"],
    "ecprune-onnx --version": ["-m", "ecprune_onnx", "--version"],
    "ecprune-onnx inspect --help": ["-m", "ecprune_onnx", "inspect", "--help"],
    "compress absent.onnx (error)": ["-m", "ecprune_onnx", "compress", "absent.onnx"],
    "compress --ratio 2 (error)": ["-m", "ecprune_onnx", "compress", SAMPLE, "--ratio", "2"],
}


def wall_seconds(arguments: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, *arguments],
        cwd=REPOSITORY,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    return time.perf_counter() - started


def measure(runs: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {label: [] for label in COMMANDS}
    for _ in range(runs):
        for label, arguments in COMMANDS.items():
            times[label].append(wall_seconds(arguments))
    return times


def table(times: dict[str, list[float]], runs: int) -> str:
    lines = [
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"{runs} runs per command, interleaved; seconds of wall time.",
        "",
        "| command | median | interquartile range | slowest |",
        "|---|---|---|---|",
    ]
    for label, seconds in times.items():
        q1, _, q3 = statistics.quantiles(seconds, n=4)
        lines.append(
            f"| `{label}` | {statistics.median(seconds):.3f} | {q1:.3f}–{q3:.3f} "
            f"| {max(seconds):.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="runs per command (at least 2)")
    args = parser.parse_args(argv)
    print(table(measure(max(args.runs, 2)), max(args.runs, 2)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
