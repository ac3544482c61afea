"""Dense weights held once: a hollow model and the arrays that hold its dense weights.

A loaded ONNX model holds every weight in its protobuf message, and the dense layers' records
(layers.py) hold the same values again as numpy arrays, which torch and the solvers read. The
message cannot give its bytes back: protobuf's upb runtime frees a message's memory only with
the whole message. So where pruning reads the weights from the records anyway, the model is
replaced by a hollow copy whose dense weight initializers keep their name, type and shape,
marked as external data at `<name>.held`, while their values live in the records' arrays
(4 bytes per weight less through the statistics and the refits).

A hollow model never reaches a file or onnxruntime as it is: `filled` makes a full copy,
`runtime.open_session(..., held=...)` hands onnxruntime the arrays, and `rewrite` writes
every weight it finds hollow from its layer record.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx

from ecprune_onnx.layers import DenseLayer
from ecprune_onnx.modelio import INFERENCE_VALUE_ELEMENTS, copy_with_empty_initializers

HELD_SUFFIX = ".held"


def held_weights(
    layers: Iterable[DenseLayer], min_elements: int = INFERENCE_VALUE_ELEMENTS + 1
) -> dict[str, np.ndarray]:
    """The weights the layer records can stand in for, as their initializers store them
    (views of the records' arrays), by initializer name. Not those whose record holds other
    values (`DenseLayer.stored_weight`), nor small ones: shape inference reads the values of
    initializers up to INFERENCE_VALUE_ELEMENTS (modelio), and they save nothing."""
    held = {}
    for layer in layers:
        stored = layer.stored_weight
        if stored is not None and stored.size >= min_elements:
            held[layer.weight_name] = stored
    return held


def is_held(tensor: onnx.TensorProto) -> bool:
    """Whether `tensor` is a hollow initializer whose values are held elsewhere."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return False
    locations = [entry.value for entry in tensor.external_data if entry.key == "location"]
    return locations == [tensor.name + HELD_SUFFIX]


def hollowed(model: onnx.ModelProto, held: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` whose initializers named in `held` are hollow (`is_held`)."""
    names = {tensor.name for tensor in model.graph.initializer} & set(held)
    copied = copy_with_empty_initializers(model, names)
    for tensor in copied.graph.initializer:
        if tensor.name in names:
            mark_held(tensor)
    return copied


def mark_held(tensor: onnx.TensorProto) -> None:
    """Mark an emptied initializer as hollow (`is_held`)."""
    point_at(tensor, tensor.name + HELD_SUFFIX)


def point_at(tensor: onnx.TensorProto, location: str) -> None:
    """Make an emptied initializer external data at `location`, all of that file."""
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location


def hollow_names(model: onnx.ModelProto) -> set[str]:
    return {tensor.name for tensor in model.graph.initializer if is_held(tensor)}


def values_of_hollow(model: onnx.ModelProto, held: Mapping[str, np.ndarray]) -> dict:
    """The arrays of the model's hollow initializers, by name; every one must be in `held`."""
    names = hollow_names(model)
    missing = names - set(held)
    if missing:
        raise ValueError(f"hollow initializers without values: {sorted(missing)}")
    return {name: held[name] for name in names}


def filled(model: onnx.ModelProto, held: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """`model` itself where nothing in it is hollow, else a copy with every hollow
    initializer's values written from `held`."""
    values = values_of_hollow(model, held)
    if not values:
        return model
    copied = copy_with_empty_initializers(model, set(values))
    for tensor in copied.graph.initializer:
        if tensor.name in values:
            fill(tensor, values[tensor.name])
    return copied


def fill(tensor: onnx.TensorProto, array: np.ndarray) -> None:
    """Write `array`, of the emptied initializer's own dtype and shape, into it as raw bytes
    (tobytes writes C order from any layout: no contiguous copy first)."""
    dtype = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    if tuple(tensor.dims) != array.shape or tensor.data_type != dtype or tensor.raw_data:
        wanted = f"{array.dtype} {array.shape}"
        raise ValueError(f"{tensor.name}: not an emptied initializer of {wanted}")
    tensor.raw_data = array.tobytes()
