"""Write masks and bias shifts back into a copy of the ONNX model, in the model's own dtypes.

Only the initializers of pruned layers change (a shared bias is cloned first); a Gemm
without C gets one, a MatMul without bias gets an Add. Names, opsets, metadata and every
other node and initializer stay as they were.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ecprune_onnx.held import fill, hollow_names, is_held
from ecprune_onnx.layers import DenseLayer, node_attribute
from ecprune_onnx.modelio import copy_with_empty_initializers


def rewrite(
    model: onnx.ModelProto,
    layers: list[DenseLayer],
    masks: dict[str, np.ndarray],
    bias_shifts: dict[str, np.ndarray],
) -> onnx.ModelProto:
    """A pruned copy: weights zeroed where masks are False, biases shifted by bias_shifts.
    The layers' weights that `model` holds hollow (held.py) are written from their records."""
    zeroed = {layer.weight_name for layer in layers if not np.all(masks.get(layer.name, True))}
    hollow = hollow_names(model) & {layer.weight_name for layer in layers}
    model, editor = _edited_copy(model, zeroed | hollow)
    for layer in layers:
        keep = masks.get(layer.name)
        if keep is not None and not keep.all():
            editor.zero_weights(layer, keep)
        elif layer.weight_name in hollow:
            editor.fill(layer.weight_name, layer.stored_weight)
        shift = bias_shifts.get(layer.name)
        if shift is not None and np.any(shift != 0):
            editor.shift_bias(layer, shift)
    return model


def _edited_copy(
    model: onnx.ModelProto, replaced: set[str]
) -> tuple[onnx.ModelProto, _GraphEditor]:
    """A copy to edit, without the weights `replaced` (the editor reads them from `model`)."""
    sources = {tensor.name: tensor for tensor in model.graph.initializer}
    copied = copy_with_empty_initializers(model, replaced)
    return copied, _GraphEditor(copied.graph, copied.ir_version < 4, sources)


class _GraphEditor:
    def __init__(
        self,
        graph: onnx.GraphProto,
        initializers_are_inputs: bool,
        sources: dict[str, onnx.TensorProto],
    ):
        self.graph = graph
        # the original initializers, where the weights being replaced are read
        self.sources = sources
        # IR < 4 requires every initializer to be listed as a graph input too.
        self.initializers_are_inputs = initializers_are_inputs
        self.initializers = {init.name: init for init in graph.initializer}
        self.names = set(self.initializers) | {n for node in graph.node for n in node.output}
        self.names |= {value.name for value in graph.input}

    def zero_weights(self, layer: DenseLayer, keep: np.ndarray) -> None:
        """Zero the removed weights in the stored orientation, keeping the dtype."""
        source = self.sources[layer.weight_name]
        stored = layer.stored_weight if is_held(source) else numpy_helper.to_array(source)
        stored_keep = keep if layer.stored_as_out_in else keep.T
        zero = np.zeros((), dtype=stored.dtype)  # keeps the dtype: no cast, no copy for it
        self.fill(layer.weight_name, np.where(stored_keep, stored, zero))

    def shift_bias(self, layer: DenseLayer, shift: np.ndarray) -> None:
        new_bias = layer.bias + shift  # effective bias, float64 [out]
        if layer.kind == "gemm":
            self._shift_gemm(layer, new_bias)
        elif layer.kind == "matmul_add":
            self._shift_add(layer, new_bias)
        else:
            self._insert_bias_add(layer, new_bias)

    def _shift_gemm(self, layer: DenseLayer, new_bias: np.ndarray) -> None:
        """Write C = b + δ as [out] and set beta = 1, so C holds the effective bias exactly."""
        node = self._producer(layer.node_output)
        if node_attribute(node, "beta", 1.0) != 1.0:
            _set_beta_to_one(node)
        dtype = self._bias_dtype(layer)
        if layer.bias_name is None:
            name = self._fresh_name(f"{layer.weight_name}_ecprune_bias")
            self._add_initializer(name, new_bias.astype(dtype))
            if len(node.input) == 2:
                node.input.append(name)
            else:  # C given as "" (omitted optional input)
                node.input[2] = name
            return
        name = self._own_bias(layer.bias_name, node, index=2)
        self._replace(name, new_bias.astype(dtype))

    def _shift_add(self, layer: DenseLayer, new_bias: np.ndarray) -> None:
        """Write the Add's initializer as b + δ, keeping its rank ([1, .., out])."""
        add_node = self._producer(layer.output_name)
        stored = numpy_helper.to_array(self.initializers[layer.bias_name])
        shape = (1,) * max(stored.ndim - 1, 0) + (layer.out_features,)
        index = list(add_node.input).index(layer.bias_name)
        name = self._own_bias(layer.bias_name, add_node, index=index)
        self._replace(name, new_bias.reshape(shape).astype(stored.dtype))

    def _insert_bias_add(self, layer: DenseLayer, new_bias: np.ndarray) -> None:
        """MatMul alone: route its product through a new Add, under the original output name."""
        node = self._producer(layer.node_output)
        product = self._fresh_name(f"{layer.output_name}_ecprune_product")
        bias_name = self._fresh_name(f"{layer.weight_name}_ecprune_bias")
        self._add_initializer(bias_name, new_bias.astype(layer.weight_dtype))
        node.output[0] = product
        if not node.name:  # keep the layer's name (derived from the output) stable on a re-scan
            node.name = self._fresh_name(layer.name)
        add = onnx.helper.make_node(
            "Add",
            [product, bias_name],
            [layer.output_name],
            name=self._fresh_name(f"{node.name or layer.output_name}_ecprune_bias_add"),
        )
        position = list(self.graph.node).index(node)
        self.graph.node.insert(position + 1, add)

    def _own_bias(self, name: str, node: onnx.NodeProto, index: int) -> str:
        """The bias initializer this node may change: a clone when other nodes read it too."""
        readers = sum(1 for other in self.graph.node for inp in other.input if inp == name)
        if readers <= 1:
            return name
        clone = self._fresh_name(f"{name}_ecprune_{node.name or node.output[0]}")
        self._add_initializer(clone, numpy_helper.to_array(self.initializers[name]))
        node.input[index] = clone
        return clone

    def _bias_dtype(self, layer: DenseLayer) -> np.dtype:
        if layer.bias_name is None:
            return layer.weight_dtype
        return numpy_helper.to_array(self.initializers[layer.bias_name]).dtype

    def _producer(self, tensor: str) -> onnx.NodeProto:
        """The node writing `tensor` (ONNX tensors have one writer; node names may be empty)."""
        return next(node for node in self.graph.node if tensor in node.output)

    def _replace(self, name: str, array: np.ndarray) -> None:
        tensor = self.initializers[name]
        tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name))

    def fill(self, name: str, array: np.ndarray) -> None:
        """Write `array`, of the initializer's own dtype and shape, into the emptied copy of
        it (`copy_with_empty_initializers`) as raw bytes: one copy fewer than building a
        tensor and copying it in (`_replace`), about a second per 10^8 weights."""
        fill(self.initializers[name], array)

    def _add_initializer(self, name: str, array: np.ndarray) -> None:
        tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
        self.graph.initializer.append(tensor)
        self.initializers[name] = self.graph.initializer[-1]
        if self.initializers_are_inputs:
            self.graph.input.append(
                onnx.helper.make_tensor_value_info(name, tensor.data_type, array.shape)
            )
        self.names.add(name)

    def _fresh_name(self, base: str) -> str:
        return fresh_name(base, self.names)


def fresh_name(base: str, taken: set[str]) -> str:
    """`base`, or `base_2`, `base_3`, … : the first name not in `taken`, which it joins."""
    name, counter = base, 1
    while name in taken:
        counter += 1
        name = f"{base}_{counter}"
    taken.add(name)
    return name


def _set_beta_to_one(node: onnx.NodeProto) -> None:
    for attr in node.attribute:
        if attr.name == "beta":
            attr.f = 1.0


def replace_parameters(
    model: onnx.ModelProto,
    layers: list[DenseLayer],
    weights: dict[str, np.ndarray],
    biases: dict[str, np.ndarray],
) -> onnx.ModelProto:
    """A copy with new effective weights [out, in] and biases [out] of `layers`, by layer name.

    Weights go back in the stored orientation and dtype (divided by a Gemm's alpha, since
    layers.py reads w = alpha·B'). Biases are written the way `rewrite` writes shifted ones:
    as [out] (a Gemm's beta set to 1, a shared initializer cloned, a missing one created). A
    layer missing from `weights` or `biases` keeps that parameter, so a MatMul or Gemm without
    a bias stays without one unless a bias is given for it.
    """
    replaced = {layer.weight_name for layer in layers if layer.name in weights}
    model, editor = _edited_copy(model, replaced)
    for layer in layers:
        if layer.name in weights:
            _write_effective_weight(editor, layer, weights[layer.name])
        if layer.name in biases:
            editor.shift_bias(layer, np.asarray(biases[layer.name], np.float64) - layer.bias)
    return model


def _write_effective_weight(editor: _GraphEditor, layer: DenseLayer, weight: np.ndarray) -> None:
    """Store W_eff / alpha, transposed back to [in, out] unless the initializer is [out, in]."""
    weight = np.asarray(weight)  # float32 stays float32 (a float64 copy is 8 bytes per weight)
    if weight.shape != layer.shape:
        raise ValueError(f"{layer.name}: new weight {weight.shape}, expected {layer.shape}")
    dtype = onnx.helper.tensor_dtype_to_np_dtype(editor.sources[layer.weight_name].data_type)
    alpha = 1.0
    if layer.kind == "gemm":
        alpha = float(node_attribute(editor._producer(layer.node_output), "alpha", 1.0))
    unscaled = weight if alpha == 1.0 else np.asarray(weight, dtype=np.float64) / alpha
    oriented = unscaled if layer.stored_as_out_in else unscaled.T
    editor.fill(layer.weight_name, oriented.astype(dtype, copy=False))  # a view where it can
