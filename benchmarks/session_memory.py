"""How much memory an onnxruntime session over one large MatMul holds, by the route its
weights take (runtime.open_session): in memory (OrtValues beside the serialised graph,
arrays kept alive) against a throwaway slice read from a temporary file (`consume=True`).
Also: does onnxruntime read the arrays it was handed, or its own copy of them?

    python -m benchmarks.session_memory [--width 7069]

Each route runs in a child process of its own, so that one route's freed memory does not
hide the next one's. RSS from /proc (Linux), counted from just before the session is made
with the model alive throughout (the file route empties its raw data, whose bytes protobuf
keeps in its arena); the creation peak from the kernel's high-water mark, reset then.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import gc, json, sys
import numpy as np
import onnx
from onnx import helper, numpy_helper
from benchmarks.peak_steps import high_water_gib, reset_high_water, resident_gib
from ecprune_onnx.runtime import open_session

route, width = sys.argv[1], int(sys.argv[2])
rss = lambda: resident_gib() * 1024  # MiB
high_water = lambda: high_water_gib() * 1024

weight = np.random.default_rng(0).standard_normal((width, width)).astype(np.float32)
graph = helper.make_graph(
    [helper.make_node("MatMul", ["x", "W"], ["y"])], "one_matmul",
    [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["rows", width])],
    [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["rows", width])],
    [numpy_helper.from_array(weight, "W")],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
x = np.random.default_rng(1).standard_normal((8, width)).astype(np.float32)
expected = x @ weight
del weight
gc.collect()
reset_high_water()
start = rss()
session = open_session(model, "cpu", consume=route == "file")  # the model stays alive
gc.collect()
held, peak = rss() - start, high_water() - start
for array in getattr(session, "shared_initializers", []):
    array.numpy()[...] = 0  # the arrays we keep alive for onnxruntime
reads_ours = not np.allclose(session.run(None, {"x": x})[0], expected, atol=1e-3)
print(json.dumps({"route": route, "held_mib": held, "creation_peak_mib": peak,
                  "reads_the_arrays_it_was_given": reads_ours}))
"""


def measure(route: str, width: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, route, str(width)],
        capture_output=True, text=True, check=True, cwd=ROOT,  # where `benchmarks` imports
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=7069)
    args = parser.parse_args()
    weight_mib = args.width**2 * 4 / 2**20
    print(f"one {args.width} x {args.width} float32 MatMul weight: {weight_mib:.0f} MiB")
    print("| route | held while the session lives, MiB | creation peak, MiB | reads our arrays |")
    print("|---|---|---|---|")
    for route in ("memory", "file"):
        r = measure(route, args.width)
        print(
            f"| {route} | {r['held_mib']:.0f} | {r['creation_peak_mib']:.0f} "
            f"| {r['reads_the_arrays_it_was_given'] if route == 'memory' else '–'} |"
        )


if __name__ == "__main__":
    main()
