"""How fast onnxruntime looks up rows of a quantized embedding table, in each form
qtables.py can write (docs/design.md, "Quantized files").

    python -m benchmarks.gather_tables

A float32 Gather against GatherBlockQuantized (int8, int4 blocks of 32) and DequantizeLinear
→ Gather (the same), on a small table (the char LM's 103 × 64) and GPT-2's (50257 × 768),
8 × 128 ids, one thread, median of 30 runs after one warm-up. Prints one line per table.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

from ecprune_onnx import qtables
from ecprune_onnx.quantize import QuantSpec

TABLES = ((103, 64), (50257, 768))
FORMS = {  # label: grid, --quant-format
    "GatherBlockQuantized int8": (QuantSpec(8, None, False), "nbits"),
    "GatherBlockQuantized int4/32": (QuantSpec(4, 32, False), "nbits"),
    "DequantizeLinear→Gather int8": (QuantSpec(8, None, False), "qdq"),
    "DequantizeLinear→Gather int4/32": (QuantSpec(4, 32, False), "qdq"),
}
ROUNDS = 30


def table_model(rows: int, dim: int) -> onnx.ModelProto:
    table = np.random.default_rng(0).normal(size=(rows, dim)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"])],
        "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "t"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", dim])],
        [numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10  # opset 21: int4 DequantizeLinear
    return model


def median_ms(model: onnx.ModelProto, ids: np.ndarray) -> float:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    session.run(None, {"ids": ids})
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        session.run(None, {"ids": ids})
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1000


def main() -> None:
    for rows, dim in TABLES:
        ids = np.random.default_rng(1).integers(0, rows, size=(8, 128))
        timings = {"float32 Gather": median_ms(table_model(rows, dim), ids)}
        for label, (spec, fmt) in FORMS.items():
            model = table_model(rows, dim)
            tables, _ = qtables.quantize_tables(model, spec, fmt)
            timings[label] = median_ms(qtables.write_tables(model, tables), ids)
        cells = ", ".join(f"{label} {ms:.3f}" for label, ms in timings.items())
        print(f"{rows} x {dim}, ms: {cells}")


if __name__ == "__main__":
    main()
