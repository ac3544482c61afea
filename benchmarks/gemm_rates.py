"""float32 GEMM rate of torch, numpy and onnxruntime on one shape, side by side.

    python benchmarks/gemm_rates.py [--shape 2560 7000 7000] [--repeats 5]

compress does its arithmetic in torch; the issue's reference rate R is onnxruntime's. This
times the same [m, k] × [k, n] float32 product in each, and in torch's oneDNN kernel, which
torch's own float32 matmul does not use (one untimed warm-up, then the best of `--repeats`),
and prints GFLOP/s. The default shape is the probe backward's GEMM at 100M
weights: 10 exact probes × 256 rows against a 7000 × 7000 hidden layer.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime
import torch
from onnx import TensorProto, helper, numpy_helper


def best_seconds(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def onnxruntime_matmul(weight: np.ndarray, rows: int) -> onnxruntime.InferenceSession:
    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)])
    return onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )


def _onednn_run(a: torch.Tensor, w: torch.Tensor) -> dict:
    """The same product through torch's oneDNN kernel (a private entry point, so only where
    this torch build has it): torch's matmul itself goes to MKL for float32."""
    linear = getattr(torch._C._nn, "mkldnn_linear", None)
    if linear is None or not torch.backends.mkldnn.is_available():
        return {}
    a_onednn, w_onednn = a.to_mkldnn(), w.T.contiguous().to_mkldnn()
    return {"torch's oneDNN kernel (mkldnn_linear)": lambda: linear(a_onednn, w_onednn)}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[2560, 7000, 7000])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    m, k, n = args.shape
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32)
    ta, tw = torch.from_numpy(a), torch.from_numpy(w)
    session = onnxruntime_matmul(w, m)
    runs = {
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)": lambda: ta @ tw,
        **_onednn_run(ta, tw),
        f"numpy {np.__version__}": lambda: a @ w,
        f"onnxruntime {onnxruntime.__version__} (CPU)": lambda: session.run(None, {"x": a}),
    }
    flops = 2.0 * m * k * n
    rates = {name: flops / best_seconds(run, args.repeats) / 1e9 for name, run in runs.items()}
    print(f"[{m}, {k}] x [{k}, {n}] float32, best of {args.repeats}:")
    for name, rate in rates.items():
        print(f"  {name}: {rate:.0f} GFLOP/s")
    return rates


if __name__ == "__main__":
    main()
