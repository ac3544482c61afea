"""Take removed hidden units out of an ONNX model: smaller matrices, a smaller file.

For every neuron group (groups.py) and its keep-mask over the units: the producer's weight
rows and bias entries, the per-unit parameters of the path and the consumers' input columns
of the removed units are cut out of their initializers, in their stored orientation and
dtype, and the static last dimension of every unit tensor's value_info follows. Only values
change shape: names, dtypes, opsets, metadata and the graph's inputs and outputs stay as
they were. New values for the kept weights (a refit) are written afterwards by
`rewrite.replace_parameters` on the shrunk model.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import numpy_helper

from ecprune_onnx.groups import NeuronGroup
from ecprune_onnx.layers import DenseLayer, find_dense_layers
from ecprune_onnx.rewrite import fresh_name


def shrink(
    model: onnx.ModelProto, groups: list[NeuronGroup], keep: dict[str, np.ndarray]
) -> onnx.ModelProto:
    """A copy of `model` without the units that `keep[group.name]` marks False.

    The groups may come from an earlier version of the model (layers are looked up by name,
    initializers cut along the axis of the units whatever their current size). A group
    missing from `keep`, or keeping all its units, is left as it is.
    """
    model = copy.deepcopy(model)
    layers = {layer.name: layer for layer in find_dense_layers(model).layers}
    cutter = _Cutter(model)
    for group in groups:
        mask = keep.get(group.name)
        if mask is None or mask.all():
            continue
        if not mask.any():
            raise ValueError(f"group '{group.name}': cannot remove all {group.units} units")
        kept = np.flatnonzero(mask)
        for producer in (layers[p.name] for p in (group.producer, *group.partners)):
            cutter.cut(producer.weight_name, kept, axis=0 if producer.stored_as_out_in else -1)
            _cut_bias(cutter, producer, kept, group.units)
        for name in group.per_unit_params:
            cutter.cut(name, kept, axis=-1)
        for consumer in (layers[c.name] for c in group.consumers):
            cutter.cut(consumer.weight_name, kept, axis=-1 if consumer.stored_as_out_in else 0)
        cutter.resize_value_infos(group.unit_tensors, len(kept))
    return model


def cut_layer_rows(model: onnx.ModelProto, layer_name: str, kept: np.ndarray) -> None:
    """Keep only the output units `kept` of dense layer `layer_name`, in place: its weight
    rows and bias entries (a bias shared with another node is cloned first)."""
    layer = next(la for la in find_dense_layers(model).layers if la.name == layer_name)
    cutter = _Cutter(model)
    cutter.cut(layer.weight_name, kept, axis=0 if layer.stored_as_out_in else -1)
    _cut_bias(cutter, layer, kept, layer.out_features)


def cut_layer_columns(model: onnx.ModelProto, layer_name: str, kept: np.ndarray) -> None:
    """Keep only the inputs `kept` of dense layer `layer_name` (its weight columns), in place."""
    layer = next(la for la in find_dense_layers(model).layers if la.name == layer_name)
    _Cutter(model).cut(layer.weight_name, kept, axis=-1 if layer.stored_as_out_in else 0)


def _cut_bias(cutter: _Cutter, producer: DenseLayer, kept: np.ndarray, units: int) -> None:
    """Cut the producer's bias along its last axis, unless it is one value broadcast to all
    units (a scalar or size-1 C); a bias shared with another node is cloned first."""
    if producer.bias_name is None:
        return
    if cutter.last_dim(producer.bias_name) != units:
        return
    node = cutter.writer_of(producer.output_name)
    name = cutter.own(producer.bias_name, node)
    cutter.cut(name, kept, axis=-1)


class _Cutter:
    """Edits initializers and value_infos of one (copied) model in place."""

    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.initializers = {tensor.name: tensor for tensor in self.graph.initializer}
        # IR < 4 lists every initializer as a graph input too; its shape must follow.
        self.input_infos = {value.name: value for value in self.graph.input}
        self.value_infos: dict[str, list[onnx.ValueInfoProto]] = {}
        for info in self.graph.value_info:
            self.value_infos.setdefault(info.name, []).append(info)
        self.names = set(self.initializers) | set(self.input_infos)
        self.names |= {name for node in self.graph.node for name in node.output}

    def last_dim(self, name: str) -> int | None:
        dims = self.initializers[name].dims
        return dims[-1] if dims else None

    def cut(self, name: str, kept: np.ndarray, axis: int) -> None:
        """Keep the entries `kept` of initializer `name` along `axis`, in its own dtype."""
        array = numpy_helper.to_array(self.initializers[name])
        self._store(name, np.take(array, kept, axis=axis))

    def own(self, name: str, node: onnx.NodeProto) -> str:
        """The initializer `name` for `node` alone: a copy when other nodes read it too."""
        readers = sum(1 for other in self.graph.node for inp in other.input if inp == name)
        if readers <= 1:
            return name
        clone = self._fresh_name(f"{name}_ecprune_{node.name or node.output[0]}")
        tensor = numpy_helper.from_array(numpy_helper.to_array(self.initializers[name]), clone)
        self.graph.initializer.append(tensor)
        self.initializers[clone] = self.graph.initializer[-1]
        if name in self.input_infos:
            info = copy.deepcopy(self.input_infos[name])
            info.name = clone
            self.graph.input.append(info)
            self.input_infos[clone] = self.graph.input[-1]
        node.input[list(node.input).index(name)] = clone
        return clone

    def writer_of(self, tensor: str) -> onnx.NodeProto:
        return next(node for node in self.graph.node if tensor in node.output)

    def resize_value_infos(self, tensors: tuple[str, ...], size: int) -> None:
        """Set the static last dimension of the unit tensors' value_info to `size`."""
        names = set(tensors)
        for info in self.graph.value_info:
            if info.name in names and info.type.HasField("tensor_type"):
                shape = info.type.tensor_type.shape
                if len(shape.dim) and shape.dim[-1].HasField("dim_value"):
                    shape.dim[-1].dim_value = size

    def _store(self, name: str, array: np.ndarray) -> None:
        tensor = self.initializers[name]
        tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name))
        # IR < 4 lists initializers as graph inputs; torch's dynamo exporter gives them
        # value_info too. Either shape must follow, or onnx's full check fails.
        infos = [self.input_infos.get(name), *self.value_infos.get(name, [])]
        for info in (info for info in infos if info is not None):
            shape = info.type.tensor_type.shape
            del shape.dim[:]
            for size in array.shape:
                shape.dim.add().dim_value = size

    def _fresh_name(self, base: str) -> str:
        return fresh_name(base, self.names)
