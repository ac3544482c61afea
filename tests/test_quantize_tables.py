"""Embedding tables (Gather on a float initializer) quantized with --quantize: qtables.py."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from ecprune_onnx import qtables
from ecprune_onnx.compress import compress
from ecprune_onnx.quantize import QuantSpec

VOCAB, DIM, HIDDEN, STEPS = 300, 64, 48, 6


def _language_model(opset: int = 17, tied: bool = False, vocab: int = VOCAB) -> onnx.ModelProto:
    """ids → Gather(table) → MatMul + Add → Tanh → MatMul → logits, by a head of its own or
    (tied) by the table itself, transposed, as a language model's output layer."""
    rng = np.random.default_rng(0)
    table = rng.normal(size=(vocab, DIM)).astype(np.float32)
    weight = (rng.normal(size=(DIM, HIDDEN)) / 8).astype(np.float32)
    project = (rng.normal(size=(HIDDEN, DIM)) / 8).astype(np.float32)  # back to DIM
    inits = [
        numpy_helper.from_array(table, "table"),
        numpy_helper.from_array(weight, "W"),
        numpy_helper.from_array(np.zeros(HIDDEN, np.float32), "b"),
        numpy_helper.from_array(project, "P"),
    ]
    head = "table_T"
    if not tied:
        head_weight = rng.normal(size=(DIM, vocab)).astype(np.float32)
        inits.append(numpy_helper.from_array(head_weight, head))
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["embedded"], name="embed"),
        helper.make_node("MatMul", ["embedded", "W"], ["z"], name="mlp"),
        helper.make_node("Add", ["z", "b"], ["a"]),
        helper.make_node("Tanh", ["a"], ["h"]),
        helper.make_node("MatMul", ["h", "P"], ["back"], name="back"),
        helper.make_node("MatMul", ["back", head], ["logits"], name="head"),
    ]
    if tied:
        nodes.insert(0, helper.make_node("Transpose", ["table"], [head], perm=[1, 0]))
    graph = helper.make_graph(
        nodes,
        "lm",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", STEPS])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", STEPS, vocab]),
            helper.make_tensor_value_info("embedded", TensorProto.FLOAT, ["batch", STEPS, DIM]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset < 21 else 10
    return model


def _run(model: onnx.ModelProto, ids: np.ndarray) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(["embedded", "logits"], {"ids": ids})


def _ids(rows: int = 16, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(rows, STEPS)).astype(np.int64)


def _initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


@pytest.mark.parametrize("bits, block", [(8, None), (4, 32), (4, 16)])
def test_gathered_rows_are_the_dequantized_table_rows(bits, block):
    model = _language_model()
    spec = QuantSpec(bits, block, symmetric=False)
    tables, notes = qtables.quantize_tables(model, spec, "nbits")
    assert [t.form for t in tables] == ["gather"] and not notes
    written = qtables.write_tables(model, tables)
    ops = [node.op_type for node in written.graph.node]
    assert "Gather" not in ops and ops.count("GatherBlockQuantized") == 1
    assert "table" not in {t.name for t in written.graph.initializer}
    ids = _ids()
    embedded, _ = _run(written, ids)
    expected = tables[0].q.dequantize().astype(np.float32)[ids]
    np.testing.assert_allclose(embedded, expected, rtol=0, atol=1e-6)
    # and close to the float rows: a 2^bits-level grid over about 5 standard deviations
    table = _initializer(_language_model(), "table")
    relative = np.square(embedded - table[ids]).mean() / table.var()
    assert relative < (2e-4 if bits == 8 else 1.5e-2)


def test_a_tied_table_is_dequantized_once_for_every_reader():
    model = _language_model(tied=True)
    tables, _ = qtables.quantize_tables(model, QuantSpec(8, None, False), "nbits")
    assert tables[0].table.tied and tables[0].form == "dequantize"
    written = qtables.write_tables(model, tables)
    dequantize = [n for n in written.graph.node if n.op_type == "DequantizeLinear"]
    assert [n.output[0] for n in dequantize] == ["table"]
    assert sum(t.data_type == TensorProto.UINT8 for t in written.graph.initializer) == 2
    ids = _ids()
    embedded, logits = _run(written, ids)
    values = tables[0].q.dequantize().astype(np.float32)
    np.testing.assert_allclose(embedded, values[ids], rtol=0, atol=1e-6)
    # the head reads the same values: the logits of the float model with the table replaced
    same = qtables.with_dequantized(model, tables)
    np.testing.assert_allclose(logits, _run(same, ids)[1], rtol=0, atol=1e-5)


def test_a_tied_int4_table_needs_opset_21_else_it_stays_float():
    spec = QuantSpec(4, 32, False)
    tables, notes = qtables.quantize_tables(_language_model(17, tied=True), spec, "nbits")
    assert not tables and "opset 21" in notes[0]
    tables, notes = qtables.quantize_tables(_language_model(21, tied=True), spec, "nbits")
    written = qtables.write_tables(_language_model(21, tied=True), tables)
    ids = _ids()
    embedded, _ = _run(written, ids)
    values = tables[0].q.dequantize().astype(np.float32)
    np.testing.assert_allclose(embedded, values[ids], rtol=0, atol=1e-6)


def _calibration(path, rows=64, seed=2) -> None:
    np.savez(path, ids=_ids(rows, seed))


# rows of 64: a float32 scale and a zero point per 64 int8 codes (per 32 int4) cap the
# ratio at 4 / (1 + 5 / 64) = 3.71 (int8) and 8 / (1 + 9 / 32) = 6.24 (int4)
@pytest.mark.parametrize("bits, ratio", [(8, 3.5), (4, 5.7)])
def test_compress_writes_the_table_quantized(tmp_path, bits, ratio):
    source, calib = tmp_path / "lm.onnx", tmp_path / "calib.npz"
    onnx.save(_language_model(vocab=1024), source)
    _calibration(calib)
    output = tmp_path / "q.onnx"
    result = compress(source, calib, quantize=f"int{bits}", output=output, outputs=["logits"])
    assert any("'table' quantized" in note for note in result.notes)
    written = onnx.load(output)
    assert "GatherBlockQuantized" in {n.op_type for n in written.graph.node}
    largest_float = max(
        numpy_helper.to_array(t).nbytes
        for t in written.graph.initializer
        if t.data_type == TensorProto.FLOAT
    )
    assert largest_float <= 1024 * DIM * 4 / 8  # scales: one per 32 entries at most
    assert result.size_original.raw / result.size_output.raw >= ratio
    assert result.measured_mse < 0.05 * np.var(_run(_language_model(vocab=1024), _ids())[1])
