"""A model beyond protobuf's 2 GB limit, compressed and written back with external data.

    python benchmarks/large_model.py [--weights 600e6] [--methods magnitude ec] [--rows 4]
                                     [--folder DIR] [--max-rss-gb 16] [--keep]
                                     [--max-memory SIZE]

Builds x → Gemm → Relu → Gemm → y, a square two-layer MLP of `--weights` float32 weights
(600e6 ≈ 2.4 GB by default), stored with external data: the weights are streamed to
`model.onnx.data` in chunks, so building it needs no more memory than one chunk. Then, for
each method, runs `python -m ecprune_onnx compress ... --ratio 0.5` in a child process
(its peak RSS comes from wait4; a watchdog kills it past `--max-rss-gb`), and checks the
output: `onnx.checker.check_model` on the path, the zeros of each weight counted straight
from the data file, and onnxruntime's outputs on the calibration rows against numpy.

Prints one line per step and a summary table (wall seconds and peak RSS of each child).
Scale down with e.g. `--weights 50e6` to see the memory per weight on a small machine.

`--max-memory SIZE` runs every method a second time with compress's `--max-memory SIZE`
(statistics in groups of layers, one pass of the calibration data each, when their sums need
more) and checks that it wrote the very same files as the run without it: both write
`pruned.onnx` (and its external data) in folders of their own, compared byte for byte.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

try:
    from benchmarks.memory_watch import watch_memory
except ImportError:  # run as `python benchmarks/<this script>.py`
    from memory_watch import watch_memory

CHUNK_ELEMENTS = 1 << 24  # 64 MiB of float32 per write
GIB = 1024**3


@dataclass
class Run:
    method: str
    status: int
    seconds: float
    peak_rss_gib: float
    message: str
    checks: str = ""


# ----------------------------------------------------------------------------- build


def _external(name: str, dims: list[int], location: str, offset: int) -> onnx.TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims)
    tensor.data_location = TensorProto.EXTERNAL
    length = math.prod(dims) * 4
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)
    return tensor


def _write_random(file, rows: int, cols: int, scale: float, rng) -> None:
    """rows × cols float32 normal(0, scale) values, appended in chunks."""
    rows_per_chunk = max(1, CHUNK_ELEMENTS // cols)
    for start in range(0, rows, rows_per_chunk):
        count = min(rows_per_chunk, rows - start)
        chunk = rng.standard_normal((count, cols), dtype=np.float32)
        chunk *= np.float32(scale)
        chunk.tofile(file)


def build_model(folder: Path, weights: float, seed: int = 0) -> tuple[Path, int]:
    """The two-layer MLP with weights in model.onnx.data; returns (path, width)."""
    width = int(round(math.sqrt(weights / 2)))
    rng = np.random.default_rng(seed)
    data_name = "model.onnx.data"
    layout = [("w1", [width, width]), ("b1", [width]), ("w2", [width, width]), ("b2", [width])]
    tensors, offset = [], 0
    with open(folder / data_name, "wb") as file:
        for name, dims in layout:
            rows, cols = (dims[0], dims[1]) if len(dims) == 2 else (1, dims[0])
            _write_random(file, rows, cols, 1 / math.sqrt(width), rng)
            tensors.append(_external(name, dims, data_name, offset))
            offset += math.prod(dims) * 4
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["z1"], name="fc1", transB=1),
        helper.make_node("Relu", ["z1"], ["h1"], name="relu"),
        helper.make_node("Gemm", ["h1", "w2", "b2"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "large_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])],
        tensors,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    path = folder / "model.onnx"
    onnx.save_model(model, path)  # the proto itself is tiny: the data is already written
    onnx.checker.check_model(str(path))
    return path, width


# --------------------------------------------------------------------------- compress


def run_compress(
    model: Path, calib: Path, method: str, output: Path, limit_gib: float, extra: list[str]
) -> Run:
    command = [sys.executable, "-m", "ecprune_onnx", "compress", str(model), "--calib"]
    command += [str(calib), "--ratio", "0.5", "--method", method, "-o", str(output)]
    command += ["--force", "--device", "cpu", "--batch-size", "64", *extra]
    started = time.perf_counter()
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a traceback cannot block it
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
        )
        killed: list[str] = []
        watchdog = threading.Thread(
            target=watch_memory, args=(process, limit_gib, killed), daemon=True
        )
        watchdog.start()
        _, status, usage = os.wait4(process.pid, 0)  # wait4: the child's own peak RSS
        seconds = time.perf_counter() - started
        code = os.waitstatus_to_exitcode(status)
        process.returncode = code
        log.seek(0)
        lines = log.read().decode(errors="replace").strip().splitlines()
    passes = re.search(r"statistics in \d+ passes", " ".join(lines))
    message = killed[0] if killed else (passes.group(0) if passes and code == 0 else "")
    message = message or (lines[-1] if lines and code != 0 else "")
    label = method + (" " + " ".join(extra) if extra else "")
    return Run(label, code, seconds, usage.ru_maxrss * 1024 / GIB, message[:300])


def same_files(first: Path, second: Path) -> str:
    """Whether two folders hold the same files, byte for byte (hashed, not loaded)."""
    digests = []
    for folder in (first, second):
        digests.append({path.name: _sha256(path) for path in sorted(folder.iterdir())})
    if digests[0] == digests[1]:
        return f"the same {len(digests[0])} files, byte for byte, as the run without it"
    return f"files differ from the run without it: {digests}"


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------ check


def _initializers(path: Path) -> dict[str, np.ndarray]:
    """Every initializer of a model file, external ones memory-mapped, not loaded."""
    model = onnx.load(str(path), load_external_data=False)
    arrays = {}
    for tensor in model.graph.initializer:
        shape = tuple(tensor.dims)
        if tensor.data_location == TensorProto.EXTERNAL:
            entries = {entry.key: entry.value for entry in tensor.external_data}
            arrays[tensor.name] = np.memmap(
                path.parent / entries["location"],
                dtype=np.float32,
                mode="r",
                offset=int(entries.get("offset", 0)),
                shape=shape,
            )
        else:
            arrays[tensor.name] = onnx.numpy_helper.to_array(tensor)
    return arrays


def check_output(output: Path, x: np.ndarray) -> str:
    """checker on the path, zeros per weight, onnxruntime against numpy on `x`."""
    import onnxruntime

    onnx.checker.check_model(str(output))
    arrays = _initializers(output)
    sparsity = {name: float((arrays[name] == 0).mean()) for name in ("w1", "w2")}
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    (y,) = session.run(["y"], {"x": x})
    hidden = np.maximum(x @ np.asarray(arrays["w1"]).T + arrays["b1"], 0)
    expected = hidden @ np.asarray(arrays["w2"]).T + arrays["b2"]
    deviation = float(np.abs(y - expected).max() / max(np.abs(expected).max(), 1e-12))
    del arrays
    zeros = ", ".join(f"{name} {share:.2%} zero" for name, share in sparsity.items())
    return f"checker ok; {zeros}; onnxruntime vs numpy relative deviation {deviation:.1e}"


def _checked(output: Path, x: np.ndarray) -> str:
    try:
        return check_output(output, x)
    except Exception as error:  # noqa: BLE001 - reported, not raised
        return f"check failed: {type(error).__name__}: {error}"[:300]


# ------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=float, default=600e6, help="dense weights in all")
    parser.add_argument("--methods", nargs="+", default=["magnitude", "ec"])
    parser.add_argument("--rows", type=int, default=4, help="calibration rows")
    parser.add_argument("--folder", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--max-rss-gb", type=float, default=16.0, help="watchdog limit (GiB)")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    parser.add_argument(
        "--max-memory", metavar="SIZE", help="also run with compress's --max-memory SIZE"
    )
    args = parser.parse_args(argv)

    folder = args.folder or Path(tempfile.mkdtemp(prefix="ecprune-large-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        model, width = build_model(folder, args.weights)
        data_bytes = (folder / "model.onnx.data").stat().st_size
        print(
            f"built {model}: 2 × [{width}, {width}] float32 = {2 * width * width / 1e6:.0f}M "
            f"weights, {data_bytes / GIB:.2f} GiB external data, "
            f"{time.perf_counter() - started:.1f} s"
        )
        x = np.random.default_rng(1).standard_normal((args.rows, width), dtype=np.float32)
        np.savez(folder / "calib.npz", x=x)
        runs = []
        for method in args.methods:
            variants = [[]] + ([["--max-memory", args.max_memory]] if args.max_memory else [])
            for index, extra in enumerate(variants):
                output = folder / f"{method}-{index}" / "pruned.onnx"
                output.parent.mkdir(exist_ok=True)
                run = run_compress(
                    model, folder / "calib.npz", method, output, args.max_rss_gb, extra
                )
                if run.status == 0:
                    run.checks = _checked(output, x)
                    if index:
                        run.checks += "; " + same_files(folder / f"{method}-0", output.parent)
                print(
                    f"{run.method}: exit {run.status}, {run.seconds:.1f} s, peak RSS "
                    f"{run.peak_rss_gib:.2f} GiB; {run.message} {run.checks}"
                )
                runs.append(run)
            for index in range(len(variants)):
                if not args.keep:
                    shutil.rmtree(folder / f"{method}-{index}", ignore_errors=True)
        print()
        print("| method | exit | wall s | peak RSS GiB | result |")
        print("|---|---|---|---|---|")
        for run in runs:
            result = f"{run.message} {run.checks}".strip() if run.status == 0 else run.message
            print(
                f"| {run.method} | {run.status} | {run.seconds:.1f} | "
                f"{run.peak_rss_gib:.2f} | {result} |"
            )
    finally:
        if not args.keep and args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
