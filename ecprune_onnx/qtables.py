"""Quantize embedding tables: float32 initializers that a Gather reads as its data (the
look-up of token ids), which the dense-layer pass leaves float (docs/method.md,
"Quantization", embedding tables).

A table [rows, dim] is quantized like a dense weight stored [out, in]: one grid per row
(int8) or per block of `group_size` entries of a row (int4), by round to nearest with the
clipping ratio that leaves the least squared error. There is no Hessian to weight it: a
looked-up row goes into the model as it is. The tables are quantized before the dense
layers, so the layer-sequential pass refits every layer to the model with its tables
already quantized and makes up for their error (qsequential.py).

Written in one of two forms:

- `gather`: onnxruntime's `com.microsoft.GatherBlockQuantized` (uint8 data, `bits` 8 or 4
  packed two to a byte low nibble first, scales and zero points per (row, block)): it
  gathers the codes and dequantizes only the rows looked up; the table is never float.
- `dequantize`: DequantizeLinear (per row at int8, blocked at int4, opset 21) writes the
  float table under its own name, which every reader keeps reading. A tied table (also read
  by another node, e.g. a language model's output MatMul) always takes this form, so every
  reader sees the same values from one copy of the codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ecprune_onnx import modelio, qformat, quantize
from ecprune_onnx.layers import node_attribute
from ecprune_onnx.quantize import Quantized, QuantSpec
from ecprune_onnx.rewrite import fresh_name

# GatherBlockQuantized's smallest block (onnxruntime 1.31: a power of two from 16).
GATHER_MIN_BLOCK = 16


@dataclass(frozen=True)
class Table:
    """A float32 [rows, dim] initializer gathered along its rows."""

    name: str
    gathers: int  # how many Gathers read it as data
    tied: bool  # read by some other node too (as an input of any other kind)
    dim: int


@dataclass(frozen=True)
class QuantizedTable:
    table: Table
    q: Quantized
    form: str  # "gather" | "dequantize"


def find_tables(model: onnx.ModelProto) -> list[Table]:
    """The float32 rank-2 initializers that some Gather on axis 0 reads as its data."""
    graph = model.graph
    floats = {
        t.name: t
        for t in graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2
    }
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name in floats:
                readers.setdefault(name, []).append((node, slot))
    tables = []
    for name, uses in readers.items():
        gathers = [node for node, slot in uses if _gathers_rows(node, slot)]
        if gathers:
            tied = len(gathers) < len(uses)
            tables.append(Table(name, len(gathers), tied, int(floats[name].dims[1])))
    return tables


def _gathers_rows(node: onnx.NodeProto, slot: int) -> bool:
    return node.op_type == "Gather" and node.domain in ("", "ai.onnx") and slot == 0 and (
        node_attribute(node, "axis", 0) in (0, -2)
    )  # fmt: skip


def table_form(table: Table, spec: QuantSpec, fmt: str, opset: int) -> str | None:
    """How the table is written: GatherBlockQuantized for the `nbits` format where it can
    hold it (untied; at int4 an even dim, since the codes pack in pairs along a row), else
    DequantizeLinear where the opset has it (int4: 21), else None (left float)."""
    packs = spec.bits == 8 or table.dim % 2 == 0
    if fmt == "nbits" and not table.tied and packs:
        return "gather"
    if opset >= qformat.dequantize_opset(spec.bits):
        return "dequantize"
    return None


def quantize_tables(
    model: onnx.ModelProto, spec: QuantSpec, fmt: str
) -> tuple[list[QuantizedTable], list[str]]:
    """Every table of `model` quantized by round to nearest; notes on those left float."""
    values = {t.name: t for t in model.graph.initializer}
    opset = qformat.model_opset(model)
    done, notes = [], []
    for table in find_tables(model):
        form = table_form(table, spec, fmt, opset)
        if form is None:
            notes.append(
                f"embedding table '{table.name}' left float32: it is read by other nodes too "
                f"and int{spec.bits} DequantizeLinear needs opset "
                f"{qformat.dequantize_opset(spec.bits)} (the model has {opset})"
            )
            continue
        weight = numpy_helper.to_array(values[table.name]).astype(np.float64)
        q = quantize.rtn(weight, None, spec)  # the dense layers' grid
        done.append(QuantizedTable(table, q, form))
    return done, notes


def describe(table: QuantizedTable) -> str:
    op = "GatherBlockQuantized" if table.form == "gather" else "DequantizeLinear"
    tied = ", tied: one copy for every reader" if table.table.tied else ""
    return f"embedding table '{table.table.name}' quantized int{table.q.spec.bits} ({op}{tied})"


def with_dequantized(model: onnx.ModelProto, tables: list[QuantizedTable]) -> onnx.ModelProto:
    """A copy of `model` whose tables hold their dequantized values (what the file will
    compute): the model the dense-layer pass refits to. The tables are not copied only to be
    overwritten (see `modelio.copy_with_empty_initializers`)."""
    values = {t.table.name: t.q.dequantize().astype(np.float32) for t in tables}
    copied = modelio.copy_with_empty_initializers(model, set(values))
    for tensor in copied.graph.initializer:
        if tensor.name in values:
            tensor.CopyFrom(numpy_helper.from_array(values[tensor.name], tensor.name))
    return copied


def write_tables(model: onnx.ModelProto, tables: list[QuantizedTable]) -> onnx.ModelProto:
    """`model` (edited in place and returned) with each table's float initializer replaced by
    its codes, in the table's form."""
    graph = model.graph
    names = {t.table.name for t in tables}
    # deleted one by one, not rebuilt: upb would keep the old copies of the kept initializers
    # in the message's arena beside the new ones; IR < 4 lists them as graph inputs too
    for field in (graph.initializer, graph.input):
        for index in reversed(range(len(field))):
            if field[index].name in names:
                del field[index]
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | names
    taken |= {v.name for v in graph.input}
    for table in tables:
        if table.form == "gather":
            _write_gather(graph, table, taken)
        else:
            qformat.write_dequantize(graph, table.table.name, table.q, taken, out_axis=0)
    if any(t.form == "gather" for t in tables):
        qformat.import_ms_domain(model)
    return model


def _write_gather(graph: onnx.GraphProto, table: QuantizedTable, taken: set[str]) -> None:
    """Each Gather of the table becomes GatherBlockQuantized on one shared set of codes."""
    q, name = table.q, table.table.name
    rows, dim = q.codes.shape
    block = gather_block(q.spec, dim)
    packed, scales, zeros = qformat.pack_nbits(q, block)
    # GatherBlockQuantized's data is [rows, dim · bits / 8]: the padding of the last block
    # (codes of a whole row in one power-of-two block) is not stored
    data = packed.reshape(rows, -1)[:, : dim * q.spec.bits // 8]
    inputs = [fresh_name(f"{name}_{s}", taken) for s in ("gather_codes", "scales", "zero_points")]
    for tensor_name, array in zip(inputs, (data, scales, zeros), strict=True):
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), tensor_name))
    positions = [
        i
        for i, node in enumerate(graph.node)
        if node.input[:1] == [name] and _gathers_rows(node, 0)
    ]
    for position in positions:
        node = graph.node[position]
        graph.node[position].CopyFrom(
            helper.make_node(
                "GatherBlockQuantized",
                [inputs[0], node.input[1], inputs[1], inputs[2]],
                list(node.output),
                name=fresh_name(f"{node.name or name}_GatherBlockQuantized", taken),
                domain=qformat.MS_DOMAIN,
                bits=q.spec.bits,
                block_size=block,
                gather_axis=0,
                quantize_axis=1,
            )
        )


def gather_block(spec: QuantSpec, dim: int) -> int:
    """GatherBlockQuantized's block: the grid's group, or (one grid per row) the smallest
    power of two from 16 that holds the row."""
    if spec.group_size is not None:
        return spec.group_size
    return max(GATHER_MIN_BLOCK, 1 << (dim - 1).bit_length())
