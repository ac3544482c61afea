"""Neuron groups: the hidden units of a dense layer and everything that shrinks with them.

Removing hidden unit j of a dense layer removes row j of its weight and entry j of its bias,
entry j of every per-unit parameter on the way (a PRelu slope), and input column j of every
dense layer that reads the unit. That is only safe when every op between the producer and
its consumers treats the units independently (elementwise ops, per-unit parameters) and
every reader of the units is a dense layer with the unit on its input axis. Anything else
(LayerNormalization, Softmax, a residual Add, Concat, Reshape, a graph output...) mixes or
exposes the units: the group is reported as not prunable, with the reason. This is the
dependency analysis of Torch-Pruning's DepGraph (Fang et al. 2023), reduced to what dense
layers need.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import numpy_helper

from ecprune_onnx.layers import DenseLayer, find_dense_layers, node_attribute

# Ops whose output unit j depends on input unit j only (their other operands, if any, must be
# constants, per-unit or the same for every unit). The exact GELU's Erf/Mul/Add chain is built
# from these too.
UNARY_ELEMENTWISE = frozenset(
    {
        "Relu", "Tanh", "Sigmoid", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "Softplus",
        "Softsign", "HardSigmoid", "HardSwish", "Mish", "ThresholdedRelu", "Erf", "Exp", "Log",
        "Abs", "Neg", "Sqrt", "Reciprocal", "Sin", "Cos", "Identity", "Dropout", "Cast",
    }
)  # fmt: skip
BINARY_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "PRelu", "Clip"})


@dataclass(frozen=True)
class NeuronGroup:
    """The units of `producer` with what shrinks along: its output feeds `consumers` (dense
    layers reading unit j as their input j) through `path_nodes` (elementwise ops, by name).

    unit_tensors: every tensor indexed by the units on its last axis (the producer's output,
    the MatMul product before a bias Add, the path's outputs); their shapes change.
    per_unit_params: initializers of the path with one entry per unit on their last axis.
    """

    producer: DenseLayer
    path_nodes: tuple[str, ...]
    unit_tensors: tuple[str, ...]
    per_unit_params: tuple[str, ...]
    consumers: tuple[DenseLayer, ...]
    # Gated units (SwiGLU, GeGLU): dense layers reading the same input whose unit j is
    # multiplied into this one's unit j on the way; their row j goes too.
    partners: tuple[DenseLayer, ...] = ()

    @property
    def name(self) -> str:
        return self.producer.name

    @property
    def units(self) -> int:
        return self.producer.out_features


@dataclass(frozen=True)
class SkippedGroup:
    """A dense layer whose units cannot be removed, and why."""

    layer: str
    reason: str


@dataclass(frozen=True)
class GroupScan:
    groups: list[NeuronGroup]
    skipped: list[SkippedGroup]


class _NotPrunable(Exception):
    """Internal: the units of a layer cannot be removed; the message is the reason."""


def find_neuron_groups(model: onnx.ModelProto, layers: list[DenseLayer] | None = None) -> GroupScan:
    """The neuron group of every dense layer in `layers` (default: all prunable ones), in graph
    order, or the reason it has none. A consumer outside `layers` (excluded, or not prunable)
    makes its producer's group not prunable."""
    scan = find_dense_layers(model)
    layers = scan.layers if layers is None else layers
    graph = _Graph(model.graph, layers, {node.node: node.reason for node in scan.skipped})
    groups, skipped, partnered = [], [], set()
    for layer in layers:
        if layer.name in partnered:
            continue  # its units are those of an earlier group (the up projection of a gate)
        try:
            groups.append(graph.trace(layer))
        except _NotPrunable as reason:
            skipped.append(SkippedGroup(layer.name, str(reason)))
            continue
        partnered |= {partner.name for partner in groups[-1].partners}
    return GroupScan(groups, skipped)


class _Graph:
    """Look-ups over one graph: initializers, Constant nodes, readers of each tensor, and the
    dense layers by the tensor their Gemm/MatMul writes."""

    def __init__(self, graph: onnx.GraphProto, layers: list[DenseLayer], reasons: dict[str, str]):
        self.initializers = {tensor.name: tensor for tensor in graph.initializer}
        self.outputs = {value.name for value in graph.output}
        self.constants = {node.output[0]: node for node in graph.node if node.op_type == "Constant"}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in dict.fromkeys(node.input):  # a node reading a tensor twice counts once
                if name:
                    self.readers.setdefault(name, []).append(node)
        self.dense = {layer.node_output: layer for layer in layers}
        self.by_output = {layer.output_name: layer for layer in layers}
        self.writer = {out: node for node in graph.node for out in node.output if out}
        self.skip_reasons = reasons

    def trace(self, producer: DenseLayer) -> NeuronGroup:
        """Follow the producer's units forward to the dense layers that read them."""
        unit_tensors = {producer.node_output, producer.output_name}
        path: dict[int, onnx.NodeProto] = {}
        consumers: dict[str, DenseLayer] = {}
        frontier = [producer.output_name]
        while frontier:
            tensor = frontier.pop()
            if tensor in self.outputs:
                raise _NotPrunable(f"its units reach the graph output '{tensor}'")
            for node in self.readers.get(tensor, []):
                if id(node) in path or (node.output and node.output[0] in consumers):
                    continue
                consumer = self._consumer(node, tensor, producer)
                if consumer is not None:
                    consumers[node.output[0]] = consumer
                    continue
                path[id(node)] = node
                for output in _unit_outputs(node):
                    unit_tensors.add(output)
                    frontier.append(output)
        if not consumers:
            raise _NotPrunable("its units reach no dense layer")
        partners = self._partners(producer, path, unit_tensors)
        params = self._per_unit_params(list(path.values()), unit_tensors, producer.out_features)
        return NeuronGroup(
            producer=producer,
            path_nodes=tuple(_node_name(node) for node in path.values()),
            unit_tensors=tuple(sorted(unit_tensors)),
            per_unit_params=params,
            consumers=tuple(consumers.values()),
            partners=tuple(partners),
        )

    def _partners(self, producer: DenseLayer, path: dict, unit_tensors: set) -> list[DenseLayer]:
        """The gate partners of the path (SwiGLU's Mul(act(gate(x)), up(x))): a computed
        operand of a path node that elementwise ops derive from one other dense layer with as
        many units, reading the same input. Their ops join the path (in place, as do their
        tensors: unit_tensors) when nothing else reads them."""
        partners: dict[str, DenseLayer] = {}
        for node in list(path.values()):
            for name in node.input:
                if not name or name in unit_tensors or self._constant_shape(name) is not None:
                    continue
                chain, layer = self._gate_chain(name)
                if layer is None or layer is producer or layer.input_name != producer.input_name:
                    continue
                if layer.out_features != producer.out_features or layer.transpose_input:
                    continue
                chain_ids = {id(n) for n in chain} | set(path)
                tensors = {layer.node_output, layer.output_name} | {n.output[0] for n in chain}
                for tensor in tensors - {layer.node_output}:
                    if any(id(r) not in chain_ids for r in self.readers.get(tensor, [])):
                        raise _NotPrunable(f"the gate '{layer.name}' is also read elsewhere")
                for chained in chain:
                    path[id(chained)] = chained
                unit_tensors |= tensors
                partners[layer.name] = layer
        return list(partners.values())

    def _gate_chain(self, tensor: str) -> tuple[list[onnx.NodeProto], DenseLayer | None]:
        """The elementwise nodes that compute `tensor` from one dense layer's output, and that
        layer; (_, None) when it is computed otherwise."""
        chain, layers, frontier = {}, {}, [tensor]
        while frontier:
            name = frontier.pop()
            if name in self.by_output:
                layers[self.by_output[name].name] = self.by_output[name]
                continue
            node = self.writer.get(name)
            elementwise = (
                node is not None
                and node.domain in ("", "ai.onnx")
                and (node.op_type in UNARY_ELEMENTWISE or node.op_type in BINARY_ELEMENTWISE)
            )
            if not elementwise:
                return [], None
            chain[id(node)] = node
            for operand in node.input:
                if operand and self._constant_shape(operand) is None:
                    frontier.append(operand)
        if len(layers) != 1:
            return [], None
        return list(chain.values()), next(iter(layers.values()))

    def _consumer(self, node: onnx.NodeProto, tensor: str, producer: DenseLayer):
        """The dense layer `node` is, reading unit j as its input j; None for an elementwise
        op (the path goes on); _NotPrunable for anything else."""
        where = f"{node.op_type} node '{_node_name(node)}'"
        if node.op_type in ("Gemm", "MatMul") and node.domain in ("", "ai.onnx"):
            layer = self.dense.get(node.output[0])
            if layer is None:
                why = self.skip_reasons.get(_node_name(node), "excluded from pruning")
                raise _NotPrunable(f"its units are read by {where}, not a prunable layer ({why})")
            if layer.input_name != tensor:
                raise _NotPrunable(f"its units are read by {where} as a weight or bias")
            if layer.transpose_input:
                raise _NotPrunable(f"its units are read by {where} with transA=1 (units on rows)")
            if layer.in_features != producer.out_features:
                raise _NotPrunable(
                    f"{where} has {layer.in_features} inputs for {producer.out_features} units"
                )
            return layer
        if node.domain not in ("", "ai.onnx") or not (
            node.op_type in UNARY_ELEMENTWISE or node.op_type in BINARY_ELEMENTWISE
        ):
            raise _NotPrunable(f"its units feed {where}, which mixes or reshapes units")
        if node.op_type == "Dropout" and len(node.output) > 1 and self._used(node.output[1]):
            raise _NotPrunable(f"its units feed {where}, whose mask output is used")
        return None

    def _per_unit_params(self, path, unit_tensors, units) -> tuple[str, ...]:
        """The path's constant operands with `units` entries on their last axis; every other
        operand must be a unit tensor or the same for every unit (last axis 1, or a scalar)."""
        params: dict[str, None] = {}
        path_ids = {id(node) for node in path}
        for node in path:
            where = f"{node.op_type} node '{_node_name(node)}'"
            for name in node.input:
                if not name or name in unit_tensors:
                    continue
                shape = self._constant_shape(name)
                if shape is None:
                    raise _NotPrunable(
                        f"{where} combines its units with '{name}' from outside the group "
                        "(a residual or a gate)"
                    )
                if not shape or shape[-1] == 1:
                    continue  # the same value for every unit
                if shape[-1] != units:
                    raise _NotPrunable(
                        f"{where}: operand '{name}' of shape {shape} is not per-unit"
                    )
                if name not in self.initializers:
                    raise _NotPrunable(
                        f"{where}: per-unit operand '{name}' is not an initializer (fold it)"
                    )
                if any(id(reader) not in path_ids for reader in self.readers.get(name, [])):
                    raise _NotPrunable(f"per-unit parameter '{name}' is shared outside the group")
                params[name] = None
        return tuple(params)

    def _constant_shape(self, name: str) -> list[int] | None:
        """The shape of an initializer or Constant node output; None for a computed tensor."""
        if name in self.initializers:
            return list(self.initializers[name].dims)
        node = self.constants.get(name)
        if node is None:
            return None
        value = node_attribute(node, "value", None)
        if value is not None:
            return list(numpy_helper.to_array(value).shape)
        for attribute in ("value_floats", "value_ints"):
            values = node_attribute(node, attribute, None)
            if values is not None:
                return [len(values)]
        return []  # value_float, value_int: a scalar

    def _used(self, tensor: str) -> bool:
        return bool(tensor) and (tensor in self.outputs or bool(self.readers.get(tensor)))


def _unit_outputs(node: onnx.NodeProto) -> list[str]:
    """The outputs of an elementwise node that carry the units (Dropout's mask is checked
    unused, so only its first output goes on)."""
    return [node.output[0]] if node.op_type == "Dropout" else [n for n in node.output if n]


def _node_name(node: onnx.NodeProto) -> str:
    """A node's name, or `<op>_<first output>` when it has none (as layers.py names them)."""
    return node.name or f"{node.op_type}_{node.output[0]}"


def group_summary(group: NeuronGroup) -> dict:
    """What `inspect` shows of a group."""
    return {
        "producer": group.producer.name,
        "units": int(group.units),
        "path": list(group.path_nodes),
        "per_unit_params": list(group.per_unit_params),
        "consumers": [consumer.name for consumer in group.consumers],
        "partners": [partner.name for partner in group.partners],
    }
