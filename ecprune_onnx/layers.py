"""Find the dense layers of an ONNX graph: Gemm, MatMul + Add, and MatMul alone.

Everything downstream sees plain `DenseLayer` records with the *effective* weight and
bias of docs/method.md (w_ij from input j to unit i; b_i), never the ONNX patterns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from ecprune_onnx.modelio import subgraphs


@dataclass(frozen=True)
class DenseLayer:
    """One prunable dense layer: z = W a + b, with W the effective [out, in] weight.

    kind: "gemm", "matmul_add" or "matmul".
    node: name of the Gemm or MatMul node (made unique); node_output: the tensor it writes.
    add_node: the Add node's name (matmul_add).
    weight_name / bias_name: the initializers holding them (bias_name None: no bias).
    input_name: the activation a flowing in; output_name: the tensor z (after the bias).
    compact_weight: the effective weight [out, in] in the narrowest float type that holds it
    exactly: float32 for float32, float16 and bfloat16 models without a Gemm alpha, else
    float64. `weight` is the same values as float64 (a fresh copy where compact_weight is
    float32); bias: effective bias, float64 [out].
    transpose_input: Gemm transA=1, the activation arrives as [in, rows].
    stored_as_out_in: the weight initializer is stored [out, in] (Gemm transB=1), not [in, out].
    alpha: a Gemm's alpha, folded into compact_weight.
    """

    name: str
    kind: str
    node: str
    node_output: str
    weight_name: str
    bias_name: str | None
    input_name: str
    output_name: str
    compact_weight: np.ndarray
    bias: np.ndarray
    weight_dtype: np.dtype
    add_node: str | None = None
    transpose_input: bool = False
    stored_as_out_in: bool = False
    alpha: float = 1.0

    @property
    def weight(self) -> np.ndarray:
        """The effective weight as float64. Where compact_weight is float32 this is a new
        copy at each call (8 bytes per weight): the hot paths of a large compress read
        compact_weight instead, a block at a time."""
        return np.asarray(self.compact_weight, dtype=np.float64)

    @property
    def stored_weight(self) -> np.ndarray | None:
        """The weight as its initializer stores it ([in, out] or [out, in], its own dtype),
        as a view of compact_weight; None where compact_weight holds other values (a Gemm's
        alpha folded in, float16 or bfloat16 widened)."""
        if self.alpha != 1.0 or self.compact_weight.dtype != self.weight_dtype:
            return None
        return self.compact_weight if self.stored_as_out_in else self.compact_weight.T

    @property
    def shape(self) -> tuple[int, int]:
        return self.compact_weight.shape

    @property
    def out_features(self) -> int:
        return self.compact_weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.compact_weight.shape[1]


@dataclass(frozen=True)
class SkippedNode:
    """A Gemm or MatMul that is not prunable, and why."""

    node: str
    op_type: str
    reason: str


@dataclass(frozen=True)
class LayerScan:
    layers: list[DenseLayer]
    skipped: list[SkippedNode]


FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
}


class NotPrunable(Exception):
    """Internal: a Gemm/MatMul that cannot be pruned; the message is the reason."""


class _Graph:
    """Look-ups over one graph: initializers, producers and consumers of each tensor."""

    def __init__(self, graph: onnx.GraphProto, held: Mapping[str, np.ndarray]):
        self.initializers = {tensor.name: tensor for tensor in graph.initializer}
        self.held = held
        self.outputs = {value.name for value in graph.output}
        self.producers: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.output:
                self.producers[name] = node
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)

    def weight(self, name: str, role: str) -> onnx.TensorProto:
        """The initializer `name`, checked to be a float weight used by one node only."""
        if name not in self.initializers:
            source = self.producers.get(name)
            origin = (
                f"produced by {source.op_type} node '{source.name}'" if source else "a graph input"
            )
            raise NotPrunable(f"{role} '{name}' is {origin}, not an initializer")
        tensor = self.initializers[name]
        if tensor.data_type not in FLOAT_TYPES:
            dtype = onnx.TensorProto.DataType.Name(tensor.data_type)
            raise NotPrunable(f"{role} '{name}' has type {dtype}; only float weights are pruned")
        users = len(self.consumers.get(name, []))
        if users > 1:
            raise NotPrunable(f"{role} '{name}' is shared by {users} nodes")
        return tensor

    def values(self, tensor: onnx.TensorProto) -> np.ndarray:
        """An initializer's values: the held array of a hollow one, else a copy."""
        if tensor.name in self.held:
            return self.held[tensor.name]
        return onnx.numpy_helper.to_array(tensor)


def find_dense_layers(
    model: onnx.ModelProto,
    only: set[str] | None = None,
    held: Mapping[str, np.ndarray] | None = None,
) -> LayerScan:
    """Every Gemm / MatMul(+Add) of the main graph, as prunable layers or skipped with a reason;
    with `only`, just the nodes of those names (each layer read copies its weight). `held`:
    the values of hollow weight initializers by name (held.py), read without a copy."""
    graph = _Graph(model.graph, held or {})
    layers, skipped = [], []
    names = _unique_node_names(model.graph)
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        name = names[id(node)]
        if only is not None and name not in only:
            continue
        if node.op_type == "Einsum":
            skipped.append(SkippedNode(name, "Einsum", _einsum_reason(node)))
        elif node.op_type in ("Gemm", "MatMul"):
            try:
                read = _read_gemm if node.op_type == "Gemm" else _read_matmul
                layers.append(read(node, name, graph))
            except NotPrunable as reason:
                skipped.append(SkippedNode(name, node.op_type, str(reason)))
        else:
            skipped.extend(_nested_dense_nodes(node, name, graph))
    return LayerScan(layers, skipped)


def _einsum_reason(node: onnx.NodeProto) -> str:
    equation = node_attribute(node, "equation", b"")
    equation = equation.decode() if isinstance(equation, bytes) else str(equation)
    return (
        f"Einsum '{equation}' is not an activation times a 2-D initializer weight over the "
        "activation's last axis"
    )


def _nested_dense_nodes(node: onnx.NodeProto, name: str, graph: _Graph) -> list[SkippedNode]:
    """The Gemm, MatMul and Einsum nodes inside the subgraphs of an If, Loop or Scan node,
    each with why the statistics cannot reach it (an If whose condition is a constant was
    inlined by `normalize` before this runs)."""
    if node.op_type == "If":
        inputs = _graph_inputs_reached(node.input[0], graph)
        named = ", ".join(f"'{n}'" for n in inputs) or "a computed value"
        why = (
            f"its condition depends on {named}, so which branch runs is decided per call; "
            "layers inside a branch are not pruned"
        )
    else:
        why = "its body runs once per iteration; layers inside a loop body are not pruned"
    found = []
    for attribute, subgraph in subgraphs(node):
        for inner in _walk(subgraph):
            if inner.op_type in ("Gemm", "MatMul", "Einsum"):
                inner_name = inner.name or f"{inner.op_type}_{inner.output[0]}"
                reason = f"inside the {attribute} of {node.op_type} node '{name}': {why}"
                found.append(SkippedNode(inner_name, inner.op_type, reason))
    return found


def _walk(graph: onnx.GraphProto):
    """Every node of `graph` and of the subgraphs nested in it."""
    for node in graph.node:
        yield node
        for _, subgraph in subgraphs(node):
            yield from _walk(subgraph)


def _graph_inputs_reached(tensor: str, graph: _Graph) -> list[str]:
    """The graph inputs that `tensor` is computed from."""
    reached, pending, seen = [], [tensor], set()
    while pending:
        name = pending.pop()
        if name in seen or name in graph.initializers:
            continue
        seen.add(name)
        node = graph.producers.get(name)
        if node is None:
            reached.append(name)
        else:
            pending.extend(n for n in node.input if n)
    return sorted(reached)


def _unique_node_names(graph: onnx.GraphProto) -> dict[int, str]:
    """Node names as written, or `<op>_<first output>` where a name is missing or repeated."""
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.name] = counts.get(node.name, 0) + 1
    return {
        id(node): node.name
        if node.name and counts[node.name] == 1
        else f"{node.op_type}_{node.output[0]}"
        for node in graph.node
    }


def node_attribute(node: onnx.NodeProto, name: str, default):
    """The value of a node's attribute, or `default` when the node does not set it."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _read_gemm(node: onnx.NodeProto, name: str, graph: _Graph) -> DenseLayer:
    """Gemm: Y = alpha * A' B' + beta * C, so w_ij = alpha * B'[j, i] and b = beta * C."""
    weight_tensor = graph.weight(node.input[1], "weight B")
    weight = _compact(graph.values(weight_tensor))
    if weight.ndim != 2:
        raise NotPrunable(f"weight B '{node.input[1]}' has rank {weight.ndim}; expected 2")
    alpha = float(node_attribute(node, "alpha", 1.0))
    beta = float(node_attribute(node, "beta", 1.0))
    transposed = bool(node_attribute(node, "transB", 0))
    effective = weight if transposed else weight.T
    if alpha != 1.0:  # alpha·B is exact in float64, not in float32
        effective = alpha * effective.astype(np.float64)
    out_features = effective.shape[0]
    bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    bias = np.zeros(out_features)
    if bias_name is not None:
        bias = beta * _unit_bias(graph, bias_name, out_features, max_rank=2)
    return DenseLayer(
        name=name,
        kind="gemm",
        node=name,
        node_output=node.output[0],
        weight_name=node.input[1],
        bias_name=bias_name,
        input_name=node.input[0],
        output_name=node.output[0],
        compact_weight=effective,
        bias=bias,
        weight_dtype=onnx.helper.tensor_dtype_to_np_dtype(weight_tensor.data_type),
        transpose_input=bool(node_attribute(node, "transA", 0)),
        stored_as_out_in=transposed,
        alpha=alpha,
    )


def _read_matmul(node: onnx.NodeProto, name: str, graph: _Graph) -> DenseLayer:
    """MatMul(X, W) with W [in, out]: w_ij = W[j, i]; the bias is a following Add, if any."""
    activation, weight_name = node.input[0], node.input[1]
    if activation in graph.initializers and weight_name not in graph.initializers:
        raise NotPrunable("the initializer is the first operand (W @ X); expected X @ W")
    if _computed(activation, graph) and _computed(weight_name, graph):
        raise NotPrunable(
            "both operands are computed (a product of activations, such as attention's), "
            "not a layer with a weight"
        )
    weight_tensor = graph.weight(weight_name, "weight")
    weight = _compact(graph.values(weight_tensor))
    if weight.ndim != 2:
        raise NotPrunable(f"weight '{weight_name}' has rank {weight.ndim}; expected 2")
    out_features = weight.shape[1]
    add = _bias_add(node, graph)
    layer = dict(
        name=name,
        node=name,
        node_output=node.output[0],
        weight_name=weight_name,
        input_name=activation,
        compact_weight=weight.T,
        weight_dtype=onnx.helper.tensor_dtype_to_np_dtype(weight_tensor.data_type),
    )
    if add is None:
        return DenseLayer(
            kind="matmul",
            bias_name=None,
            output_name=node.output[0],
            bias=np.zeros(out_features),
            **layer,
        )
    add_node, bias_name = add
    bias = _unit_bias(graph, bias_name, out_features, max_rank=None)
    return DenseLayer(
        kind="matmul_add",
        bias_name=bias_name,
        output_name=add_node.output[0],
        bias=bias,
        add_node=add_node.name,
        **layer,
    )


def _computed(name: str, graph: _Graph) -> bool:
    """Whether tensor `name` is computed by nodes from a graph input, not from constants."""
    return name in graph.producers and bool(_graph_inputs_reached(name, graph))


def _compact(weight: np.ndarray) -> np.ndarray:
    """A float weight (FLOAT_TYPES) as float32 or float64, whichever holds its values
    exactly: float16 and bfloat16 widen to float32. Not float64 throughout: at 10^8 weights
    that copy took 1.7 s and 4 more bytes per weight for the whole compress."""
    if weight.dtype in (np.float32, np.float64):
        return weight
    return weight.astype(np.float32)


def _bias_add(node: onnx.NodeProto, graph: _Graph) -> tuple[onnx.NodeProto, str] | None:
    """The Add that adds an initializer to this MatMul's output (either operand), if any."""
    product = node.output[0]
    users = graph.consumers.get(product, [])
    if len(users) != 1 or product in graph.outputs or users[0].op_type != "Add":
        return None
    add_node = users[0]
    other = [name for name in add_node.input if name != product]
    if len(other) != 1 or other[0] not in graph.initializers:
        return None  # a residual or computed addend: the MatMul stands alone
    return add_node, other[0]


def _unit_bias(graph: _Graph, name: str, out_features: int, max_rank: int | None) -> np.ndarray:
    """The bias initializer broadcast to [out], or NotPrunable if it does not broadcast so."""
    tensor = graph.initializers.get(name)
    if tensor is None:
        raise NotPrunable(f"bias '{name}' is not an initializer")
    if tensor.data_type not in FLOAT_TYPES:
        raise NotPrunable(f"bias '{name}' is not a float tensor")
    bias = onnx.numpy_helper.to_array(tensor).astype(np.float64)
    leading_ones = all(size == 1 for size in bias.shape[:-1])
    rank_ok = max_rank is None or bias.ndim <= max_rank
    if bias.ndim == 0 or (leading_ones and rank_ok and bias.shape[-1] in (1, out_features)):
        return np.broadcast_to(bias.reshape(-1), (out_features,)).copy()
    shape = list(bias.shape)
    raise NotPrunable(f"bias '{name}' of shape {shape} does not broadcast to [{out_features}]")
