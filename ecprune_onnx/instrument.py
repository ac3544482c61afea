"""A torch copy of the graph that exposes what the statistics need, checked against onnxruntime.

The copy of the ONNX graph gets extra outputs: the input activation `a` of every dense
layer (its "tap") and the layer's output `z`. onnx2pytorch converts the copy; torch then
differentiates the outputs y with respect to the exposed z tensors. That is docs/method.md's
zero probe: with z' = z + p and p = 0, dy/dp = dy/dz, so exposing z gives the same
derivatives without feeding probe tensors whose shapes would have to be known in advance.
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from ecprune_onnx.errors import UsageError
from ecprune_onnx.layers import DenseLayer
from ecprune_onnx.runtime import open_session, run

# float32 torch and onnxruntime agree to ~1e-6 relative on dense nets; a converter bug
# (a dropped attribute, a wrong transpose) is off by O(1). 1e-3 of the output's scale
# separates the two with a wide margin; float16 graphs round at ~1e-3, so they get 2e-2.
PARITY_TOLERANCE = {np.dtype(np.float16): 2e-2, np.dtype(np.float32): 1e-3}


@dataclass(frozen=True)
class TensorRoles:
    """Names of the tensors the statistics read: outputs y, and per layer its input and z."""

    outputs: list[str]
    taps: dict[str, str]
    dense_outputs: dict[str, str]


def float_outputs(model: onnx.ModelProto) -> list[str]:
    """The graph outputs that are float tensors: the default y of docs/method.md."""
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    return [
        value.name
        for value in model.graph.output
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type in float_types
    ]


def choose_outputs(model: onnx.ModelProto, requested: list[str] | tuple[str, ...]) -> list[str]:
    """The tensors that count as y: `--output` names (any tensor of the graph) or the default."""
    if not requested:
        outputs = float_outputs(model)
        if not outputs:
            raise UsageError("the model has no float tensor output; name one with --output")
        return outputs
    known = _tensor_names(model)
    for name in requested:
        if name not in known:
            choices = ", ".join(value.name for value in model.graph.output)
            raise UsageError(
                f"--output {name}: no tensor of that name in the model (graph outputs: {choices})"
            )
    return list(dict.fromkeys(requested))


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph outputs are exactly `names`, dead nodes removed."""
    model = copy.deepcopy(model)
    value_infos = _value_infos(model)
    graph = model.graph
    del graph.output[:]
    for name in names:
        info = value_infos.get(name) or onnx.helper.make_empty_tensor_value_info(name)
        graph.output.append(info)
    _remove_dead_nodes(graph, set(names))
    return model


def instrument(model: onnx.ModelProto, layers: list[DenseLayer], outputs: list[str]):
    """The ONNX copy with y, the taps and the z tensors as outputs, and the roles of each."""
    inputs = {value.name for value in model.graph.input}
    roles = TensorRoles(
        outputs=outputs,
        taps={layer.name: layer.input_name for layer in layers},
        dense_outputs={layer.name: layer.output_name for layer in layers},
    )
    # A tap that is a graph input is read from the feed, not exposed as an output.
    exposed = outputs + [name for name in roles.taps.values() if name not in inputs]
    exposed += list(roles.dense_outputs.values())
    return with_outputs(model, list(dict.fromkeys(exposed))), roles


def resolve_device(device: str) -> torch.device:
    """`auto` → CUDA when torch sees a GPU, else CPU; `cuda` without a GPU is an error."""
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {device}: expected auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no usable CUDA GPU on this machine")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


class TorchGraph:
    """The converted module on a device, called with numpy feeds, returning named tensors."""

    def __init__(self, model: onnx.ModelProto, device: torch.device):
        self.model = model
        self.device = device
        # IR 3 models list initializers among the inputs too; they are weights, not feeds.
        weights = {init.name for init in model.graph.initializer}
        self.input_names = [v.name for v in model.graph.input if v.name not in weights]
        self.output_names = [value.name for value in model.graph.output]
        self.guessed_ops: list[str] = []
        self.module = self._convert(model).to(device).eval()

    def _convert(self, model: onnx.ModelProto) -> torch.nn.Module:
        from onnx2pytorch import ConvertModel  # heavy import, only when a model is converted

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                # onnx2pytorch edits the graph it is given (it folds MatMul + Add): pass a copy.
                module = ConvertModel(copy.deepcopy(model))
            except Exception as err:
                raise UsageError(_conversion_error(model, err)) from err
        # The module holds the weights as tensors now and reads only the nodes of its
        # proto when it runs: keep a copy without the weights. Deleting them from the proto
        # itself frees nothing: protobuf's upb runtime keeps a message's memory in one arena
        # until the whole message is gone (4 bytes per weight).
        del module.onnx_model.graph.initializer[:]
        slim = onnx.ModelProto()
        slim.CopyFrom(module.onnx_model)
        module.onnx_model = slim
        _drop_unread_buffers(module)
        # onnx2pytorch 0.6 maps an op it does not know to torch.<op> with a warning and
        # drops its attributes; remember them to name them if the parity check fails.
        for warning in caught:
            found = re.search(r"op_type=(\w+)", str(warning.message))
            if found:
                self.guessed_ops.append(found.group(1))
        return module

    def share_weights(self, layers: list[DenseLayer]) -> None:
        """Point each dense layer's nn.Linear at the layer's own float32 weight on the CPU,
        where the two hold the same values: the module then keeps no second copy of the
        dense weights (4 bytes per weight while the batches stream). For the statistics
        only, which never write a weight: the layers' arrays are read-only views of the
        ONNX tensors' bytes, which torch would otherwise warn about."""
        if self.device.type != "cpu":
            return  # on a GPU the module's host copy is gone already
        for layer in layers:
            linear = converted_layer(self.module, layer)
            weight = layer.compact_weight
            if not isinstance(linear, torch.nn.Linear) or weight.dtype != np.float32:
                continue
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                shared = torch.from_numpy(weight)
            if linear.weight.dtype == shared.dtype and torch.equal(linear.weight.detach(), shared):
                linear.weight = torch.nn.Parameter(shared, requires_grad=False)

    def drop_model(self) -> None:
        """Forget the ONNX copy, which only the parity check reads: the batch loop then holds
        the module's weights alone (4 bytes per weight less)."""
        self.model = None

    def __call__(self, feeds: dict[str, np.ndarray], grad: bool = False) -> dict[str, torch.Tensor]:
        tensors = {name: torch.from_numpy(array).to(self.device) for name, array in feeds.items()}
        if grad:
            for tensor in tensors.values():
                if tensor.is_floating_point():
                    tensor.requires_grad_(True)
        with torch.set_grad_enabled(grad):
            results = self.module(*[tensors[name] for name in self.input_names])
        if not isinstance(results, (list, tuple)):
            results = [results]
        named = dict(zip(self.output_names, results))
        named.update(tensors)  # graph inputs, for taps that are graph inputs
        return named


def converted_layer(module: torch.nn.Module, layer: DenseLayer) -> torch.nn.Module | None:
    """What onnx2pytorch made of a dense layer: for a Gemm an nn.Linear (transA=1: the one
    inside Sequential(Transpose, Linear)), for a MatMul(+Add) an nn.Linear; None where it
    made nothing under that name or a Sequential without a Linear."""
    # A folded MatMul + Add is registered under the Add's output, anything else its own.
    key = layer.node_output if layer.node_output in module.mapping else layer.output_name
    converted = getattr(module, module.mapping[key]) if key in module.mapping else None
    if isinstance(converted, torch.nn.Sequential):
        converted = next((m for m in converted if isinstance(m, torch.nn.Linear)), None)
    return converted


def _drop_unread_buffers(module: torch.nn.Module) -> None:
    """onnx2pytorch registers every initializer as a buffer, and also copies each Gemm's and
    MatMul's weight into its nn.Linear: two copies of every dense weight. Its forward reads
    the buffers only as inputs of ops other than those layers (STANDARD_LAYERS), so the
    buffers no such op reads are dropped (4 bytes per weight). A graph with an If or Loop
    keeps them all (a body reads the outer initializers by name), and so does a module
    that is not laid out as onnx2pytorch 0.6 lays it out."""
    try:
        from onnx2pytorch.constants import COMPOSITE_LAYERS, STANDARD_LAYERS
        from onnx2pytorch.convert.operations import get_buffer_name

        nodes, mapping = module.onnx_model.graph.node, module.mapping
        ops = [getattr(module, mapping[node.output[0]]) for node in nodes]
    except (ImportError, AttributeError, KeyError, IndexError):
        return
    if any(_subgraph_inputs(node) for node in nodes):
        return
    read = set()
    for node, op in zip(nodes, ops):
        parts = op.modules() if isinstance(op, COMPOSITE_LAYERS) else [op]
        if not any(isinstance(part, STANDARD_LAYERS) for part in parts):
            read.update(get_buffer_name(name) for name in node.input)
    for name, _ in list(module.named_buffers(recurse=False)):
        if name.startswith("_initializer_") and name not in read:
            delattr(module, name)


def check_parity(
    graph: TorchGraph, feeds: dict[str, np.ndarray], source: str | os.PathLike = "the data"
) -> float:
    """Compare the torch copy with onnxruntime on one batch; UsageError naming the op if off.

    Returns the worst relative deviation seen (max |torch - ort| / max |ort|). `source`
    names the data in errors.
    """
    session = open_session(graph.model, device="cpu")
    reference = dict(zip(graph.output_names, run(session, graph.output_names, feeds, source)))
    try:
        produced = graph(feeds)
    except RuntimeError as err:  # e.g. a converted op that computes the wrong shape
        text = " ".join(str(err).split())[:200]
        raise UsageError(
            f"the torch conversion of the model fails on {source} where onnxruntime runs it "
            f"({text}); first differing op: {locate_mismatch(graph, feeds)}; "
            "nothing was written"
        ) from err
    worst = 0.0
    for name in graph.output_names:
        expected = reference[name]
        actual = produced[name].detach().cpu().numpy()
        deviation = _relative_deviation(actual, expected)
        worst = max(worst, deviation)
        tolerance = PARITY_TOLERANCE.get(np.dtype(expected.dtype), 1e-3)
        if not deviation <= tolerance:  # NaN counts as a mismatch
            culprit = locate_mismatch(graph, feeds)
            raise UsageError(
                f"the torch conversion of the model disagrees with onnxruntime on tensor "
                f"'{name}' (relative deviation {deviation:.2e} > {tolerance:.0e}); "
                f"first differing op: {culprit}; scores would be wrong, so nothing was written"
            )
    return worst


def locate_mismatch(graph: TorchGraph, feeds: dict[str, np.ndarray]) -> str:
    """The first node, in graph order, whose output differs between torch and onnxruntime."""
    model = graph.model
    names = [
        name
        for node in model.graph.node
        for name in node.output
        if name and name not in graph.input_names
    ]
    debug_model = with_outputs(model, names)
    session = open_session(debug_model, device="cpu")
    reference = dict(zip(names, session.run(names, feeds)))
    try:
        produced = TorchGraph(debug_model, graph.device)(feeds)
    except (UsageError, RuntimeError):
        return _first_failing_node(model, feeds, graph.device, names)
    producers = {name: node for node in model.graph.node for name in node.output}
    for name in names:
        if name not in produced:
            continue  # folded away by the converter (MatMul + Add → Linear)
        actual = produced[name].detach().cpu().numpy()
        expected = reference[name]
        if actual.shape != expected.shape or _relative_deviation(actual, expected) > 1e-3:
            node = producers[name]
            return f"{node.op_type} node '{node.name or name}'"
    if graph.guessed_ops:
        return f"{', '.join(sorted(set(graph.guessed_ops)))} (converted by guessing)"
    return "unknown"


def _first_failing_node(model, feeds, device, names) -> str:
    """When the converted graph raises, the first node whose prefix of the graph already
    raises (or differs): found by converting growing prefixes of the graph."""
    producers = {name: node for node in model.graph.node for name in node.output}
    reference_session = open_session(with_outputs(model, names), device="cpu")
    reference = dict(zip(names, reference_session.run(names, feeds)))
    for name in names:
        node = producers[name]
        try:
            produced = TorchGraph(with_outputs(model, [name]), device)(feeds)[name]
        except (UsageError, RuntimeError):
            return f"{node.op_type} node '{node.name or name}'"
        actual = produced.detach().cpu().numpy()
        if (
            actual.shape != reference[name].shape
            or _relative_deviation(actual, reference[name]) > 1e-3
        ):
            return f"{node.op_type} node '{node.name or name}'"
    return "unknown"


def _relative_deviation(actual: np.ndarray, expected: np.ndarray) -> float:
    if actual.shape != expected.shape:
        return float("inf")
    if not np.issubdtype(expected.dtype, np.floating):
        return 0.0 if np.array_equal(actual, expected) else float("inf")
    expected = expected.astype(np.float64)
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-6)
    return float(np.abs(actual.astype(np.float64) - expected).max(initial=0.0)) / scale


def _conversion_error(model: onnx.ModelProto, err: Exception) -> str:
    node = _failing_node(model)
    where = f"{node.op_type} node '{node.name or node.output[0]}'" if node is not None else "?"
    if re.search(r"op_type=(\w+)", str(err)):
        return f"{where} is not supported by the onnx2pytorch converter"
    text = " ".join(str(err).split())[:160]
    return f"the onnx2pytorch converter failed on {where}: {type(err).__name__}: {text}"


def _failing_node(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """Replay onnx2pytorch's node-by-node conversion to find the node it stops at."""
    from onnx2pytorch.convert.model import get_opset_version
    from onnx2pytorch.convert.operations import convert_operations

    graph = copy.deepcopy(model.graph)
    converted = 0
    try:
        for _ in convert_operations(graph, get_opset_version(model), 0, False):
            converted += 1  # the generator folds MatMul + Add in `graph` as it goes
    except Exception:
        return graph.node[converted] if converted < len(graph.node) else None
    return None


def _tensor_names(model: onnx.ModelProto) -> set[str]:
    graph = model.graph
    names = {value.name for value in graph.input} | {value.name for value in graph.output}
    names |= {init.name for init in graph.initializer}
    return names | {name for node in graph.node for name in node.output}


def _value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Type and shape of every tensor that shape inference can tell."""
    try:
        inferred = onnx.shape_inference.infer_shapes(_weightless(model)).graph
    except Exception:  # inference is a convenience here: outputs may go untyped
        inferred = model.graph
    infos = {}
    for value in [*inferred.value_info, *inferred.input, *inferred.output]:
        infos.setdefault(value.name, value)
    return infos


# Initializers up to this many elements keep their values for shape inference (a Reshape's
# shape, a Slice's starts); larger ones are weights, of which inference needs only the shape.
INFERENCE_VALUE_ELEMENTS = 1024


def _weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model for shape inference, with every large initializer replaced by a graph input
    of its type and shape. Inference serialises the model it is given and returns a parsed
    copy: with the weights that was four copies of them (2.5 s at 100M weights)."""
    graph = model.graph
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    light_graph = light.graph
    for field in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(light_graph, field).extend(getattr(graph, field))
    inputs = {value.name for value in graph.input}
    for tensor in graph.initializer:
        if np.prod(tensor.dims, dtype=np.int64) <= INFERENCE_VALUE_ELEMENTS:
            light_graph.initializer.append(tensor)
        elif tensor.name not in inputs:  # IR 3 lists initializers among the inputs already
            info = onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            light_graph.input.append(info)
    return light


def _remove_dead_nodes(graph: onnx.GraphProto, needed: set[str]) -> None:
    """Drop the nodes that no requested output depends on (e.g. a ZipMap after the logits)."""
    keep = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            keep.append(node)
            needed.update(name for name in node.input if name)
            needed.update(_subgraph_inputs(node))
    kept_ids = {id(node) for node in keep}
    survivors = [copy.deepcopy(node) for node in graph.node if id(node) in kept_ids]
    del graph.node[:]
    graph.node.extend(survivors)
    # deleted one by one, not rebuilt: upb would keep the old copies in the message's
    # arena beside the new ones (4 bytes per weight)
    for index in reversed(range(len(graph.initializer))):
        if graph.initializer[index].name not in needed:
            del graph.initializer[index]


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names an If/Loop/Scan body reads from the outer scope (conservatively: all inputs)."""
    names = set()
    for attr in node.attribute:
        for subgraph in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            for inner in subgraph.node:
                names.update(name for name in inner.input if name)
    return names
