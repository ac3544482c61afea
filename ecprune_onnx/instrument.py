"""A torch copy of the graph that exposes what the statistics need, checked against onnxruntime.

The copy of the ONNX graph gets extra outputs: the input activation `a` of every dense
layer (its "tap") and the layer's output `z`. onnx2pytorch converts the copy; torch then
differentiates the outputs y with respect to the exposed z tensors. That is docs/method.md's
zero probe: with z' = z + p and p = 0, dy/dp = dy/dz, so exposing z gives the same
derivatives without feeding probe tensors whose shapes would have to be known in advance.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from ecprune_onnx import modelio
from ecprune_onnx.errors import UsageError
from ecprune_onnx.held import filled
from ecprune_onnx.layers import DenseLayer
from ecprune_onnx.runtime import open_session, run

# float32 torch and onnxruntime agree to ~1e-6 relative on dense nets; a converter bug
# (a dropped attribute, a wrong transpose) is off by O(1). 1e-3 of the output's scale
# separates the two with a wide margin; float16 graphs round at ~1e-3, so they get 2e-2.
PARITY_TOLERANCE = {np.dtype(np.float16): 2e-2, np.dtype(np.float32): 1e-3}
# A correct conversion rounds differently at every op, not only at the weights and inputs
# that `float32_noise` nudges: allow this multiple of that noise.
NOISE_FACTOR = 10.0


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
        return list(dict.fromkeys(softmax_input(model, name) or name for name in outputs))
    known = _tensor_names(model)
    for name in requested:
        if name not in known:
            choices = ", ".join(value.name for value in model.graph.output)
            raise UsageError(
                f"--output {name}: no tensor of that name in the model (graph outputs: {choices})"
            )
    return list(dict.fromkeys(requested))


def softmax_input(model: onnx.ModelProto, output: str) -> str | None:
    """The logits a graph output is the Softmax of (through Identity nodes), or None.

    A saturated Softmax hides how the outputs depend on the layers: in float32 its
    derivatives underflow to exactly 0 for confident samples, so every unit would look
    dead and be pruned freely (skl2onnx's MLPClassifier, whose output is probabilities,
    lost all its accuracy that way). The default y is the logits, as docs/method.md advises."""
    producers = {name: node for node in model.graph.node for name in node.output}
    node = producers.get(output)
    while node is not None and node.op_type == "Identity":
        node = producers.get(node.input[0])
    if node is not None and node.op_type == "Softmax" and node.domain in ("", "ai.onnx"):
        return node.input[0]
    return None


def with_outputs(
    model: onnx.ModelProto,
    names: list[str],
    given: dict[str, onnx.ValueInfoProto] | None = None,
) -> onnx.ModelProto:
    """A copy of `model` whose graph outputs are exactly `names`, with only the nodes and
    initializers they depend on (e.g. no ZipMap after the logits). Built from those alone:
    a deep copy of the whole model would hold every weight, read or not, until the copy is
    gone (protobuf's upb keeps deleted fields in the message's arena), 4 bytes per weight
    for each tap of a layer-input pass.

    `given`: inner tensors fed as graph inputs instead of computed (their type and shape),
    where the nodes needed read them; raises ValueError where a needed node writes one."""
    given = given or {}
    value_infos = modelio.value_infos(model)
    nodes, needed = _live_nodes(model.graph, set(names), stop=set(given))
    written = {name for node in nodes for name in node.output}
    if written & set(given):
        raise ValueError(f"with_outputs: a needed node writes {sorted(written & set(given))}")
    copied = onnx.ModelProto()
    modelio.copy_fields(model, copied, skip={"graph"})
    modelio.copy_fields(model.graph, copied.graph, skip={"node", "initializer", "output"})
    copied.graph.input.extend(info for name, info in given.items() if name in needed)
    copied.graph.node.extend(nodes)
    copied.graph.initializer.extend(t for t in model.graph.initializer if t.name in needed)
    for name in names:
        info = value_infos.get(name) or onnx.helper.make_empty_tensor_value_info(name)
        copied.graph.output.append(info)
    return copied


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

    def __init__(
        self,
        model: onnx.ModelProto,
        device: torch.device,
        held: Mapping[str, np.ndarray] | None = None,
    ):
        self.model = model  # may be hollow (held.py), its weights in `held`
        self.held = held or {}
        self.device = device
        # IR 3 models list initializers among the inputs too; they are weights, not feeds.
        weights = {init.name for init in model.graph.initializer}
        self.input_names = [v.name for v in model.graph.input if v.name not in weights]
        self.output_names = [value.name for value in model.graph.output]
        self.guessed_ops: list[str] = []
        self.warnings: list[str] = []  # what the converted ops warned while they ran
        self.module = self._convert(model).to(device).eval()

    def _convert(self, model: onnx.ModelProto) -> torch.nn.Module:
        from onnx2pytorch import ConvertModel  # heavy import, only when a model is converted

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                # onnx2pytorch edits the graph it is given (it folds MatMul + Add): pass a
                # copy, the whole one that `filled` makes of a hollow model (no second one)
                whole = filled(model, self.held)
                module = ConvertModel(copy.deepcopy(model) if whole is model else whole)
                del whole
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

    @contextlib.contextmanager
    def gradients_from(self, names: Iterable[str]) -> Iterator[None]:
        """While inside, the tensors `names` (the dense outputs z) require gradients wherever
        they are computed, so the outputs depend on them through autograd whatever the
        inputs are: token ids and bytes are integers and start no gradient themselves."""
        handles = []
        for name in names:
            producer = _producer(self.module, name)
            if producer is not None:
                handles.append(producer.register_forward_hook(_start_gradient))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def __call__(self, feeds: dict[str, np.ndarray], grad: bool = False) -> dict[str, torch.Tensor]:
        tensors = {name: torch.from_numpy(array).to(self.device) for name, array in feeds.items()}
        with torch.set_grad_enabled(grad), _collected_warnings(self.warnings):
            results = self.module(*[tensors[name] for name in self.input_names])
        if not isinstance(results, (list, tuple)):
            results = [results]
        named = dict(zip(self.output_names, results))
        named.update(tensors)  # graph inputs, for taps that are graph inputs
        return named


def _producer(module: torch.nn.Module, tensor: str) -> torch.nn.Module | None:
    """The submodule onnx2pytorch made of the node that writes `tensor` (nodes are keyed by
    their first output), or None."""
    name = getattr(module, "mapping", {}).get(tensor)
    producer = getattr(module, name, None) if name is not None else None
    return producer if isinstance(producer, torch.nn.Module) else None


def _start_gradient(module: torch.nn.Module, inputs, output):
    """Forward hook: a float output computed without autograd becomes a leaf that requires
    a gradient, so everything computed from it is differentiable with respect to it."""
    if (
        torch.is_grad_enabled()
        and isinstance(output, torch.Tensor)
        and output.is_floating_point()
        and not output.requires_grad
    ):
        return output.requires_grad_(True)
    return None


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


@dataclass(frozen=True)
class Parity:
    """How far the torch copy is from onnxruntime on one batch, against what float rounding
    alone moves this model's outputs (all relative to each output's largest magnitude)."""

    deviation: float  # max |torch - onnxruntime| / max |onnxruntime| over the outputs
    noise: float  # the same for onnxruntime against itself, weights and inputs one ulp off
    tolerance: float  # what the deviation may reach: max(floor, NOISE_FACTOR * noise), or set
    warnings: tuple[str, ...] = ()  # what the converted ops warned while they ran


def check_parity(
    graph: TorchGraph,
    feeds: dict[str, np.ndarray],
    source: str | os.PathLike = "the data",
    tolerance: float | None = None,
) -> Parity:
    """Compare the torch copy with onnxruntime on one batch; UsageError naming the op if off.

    The tolerance comes from the model itself (`float32_noise`) unless `tolerance` is given.
    `source` names the data in errors.
    """
    session = open_session(graph.model, device="cpu", held=graph.held)
    reference = dict(zip(graph.output_names, run(session, graph.output_names, feeds, source)))
    del session
    noise = float32_noise(graph.model, feeds, reference, graph.held)
    try:
        produced = graph(feeds)
    except Exception as err:  # any converted op that raises: TypeError, RuntimeError, ...
        text = " ".join(str(err).split())[:200]
        raise UsageError(
            f"the torch conversion of the model fails on {source} where onnxruntime runs it "
            f"({type(err).__name__}: {text}); first failing op: "
            f"{locate_mismatch(graph, feeds, parity_tolerance(np.dtype(np.float32), noise))}; "
            "nothing was written"
        ) from err
    worst, worst_name = 0.0, None
    for name in graph.output_names:
        actual = produced[name].detach().cpu().numpy()
        deviation = _relative_deviation(actual, reference[name])
        if not deviation <= worst:  # NaN counts as the worst
            worst, worst_name = deviation, name
    dtype = np.dtype(reference[worst_name].dtype) if worst_name else np.dtype(np.float32)
    allowed = parity_tolerance(dtype, noise) if tolerance is None else tolerance
    if not worst <= allowed:
        culprit = locate_mismatch(graph, feeds, allowed)
        raise UsageError(
            f"the torch conversion of the model disagrees with onnxruntime on tensor "
            f"'{worst_name}' (relative deviation {worst:.2e} > tolerance {allowed:.1e}, this "
            f"model's float rounding noise {noise:.1e}); first differing op: {culprit}; "
            "scores would be wrong, so nothing was written (--parity-tolerance sets the limit)"
        )
    return Parity(deviation=worst, noise=noise, tolerance=allowed)


def parity_tolerance(dtype: np.dtype, noise: float) -> float:
    """The largest relative deviation a correct conversion may show: NOISE_FACTOR times the
    model's own rounding noise, and never below the floor of its float type."""
    floor = PARITY_TOLERANCE.get(np.dtype(dtype), PARITY_TOLERANCE[np.dtype(np.float32)])
    return max(floor, NOISE_FACTOR * noise) if np.isfinite(noise) else floor


def float32_noise(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    held: Mapping[str, np.ndarray] | None = None,
) -> float:
    """How far onnxruntime's outputs move when every float weight and float input moves by
    one unit in the last place (random direction, seeded): the rounding a different but
    correct kernel may make. A model that cancels large terms (a LayerNorm written as
    E[x²] - E[x]², jax2tf's) shows 1e-3 here where a plain MLP shows 1e-7."""
    rng = np.random.default_rng(0)

    def nudged(array: np.ndarray) -> np.ndarray:
        if not np.issubdtype(array.dtype, np.floating):
            return array
        # towards zero or away from it; always towards zero at the float's largest values
        # (attention masks hold finfo.min), which a step away would turn into infinities
        away = (rng.random(array.shape) < 0.5) & (np.abs(array) < np.finfo(array.dtype).max)
        target = np.where(away, np.copysign(np.inf, array), 0.0).astype(array.dtype)
        return np.asarray(np.nextafter(array, target), dtype=array.dtype)

    session = open_session(model, device="cpu", transform=nudged, held=held)
    names = list(reference)
    outputs = run(session, names, {name: nudged(value) for name, value in feeds.items()})
    return max(
        (_relative_deviation(value, reference[name]) for name, value in zip(names, outputs)),
        default=0.0,
    )


@contextlib.contextmanager
def _collected_warnings(collected: list[str]) -> Iterator[None]:
    """Collect what the converted ops warn while they run (onnx2pytorch's Gather triggers
    torch's `non-tuple sequence` indexing warning on every batch) into `collected`, one
    entry per message, instead of printing them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        text = " ".join(str(warning.message).split())[:160]
        if text not in collected:
            collected.append(text)


def locate_mismatch(graph: TorchGraph, feeds: dict[str, np.ndarray], tolerance: float) -> str:
    """The first node, in graph order, whose converted op computes something other than
    onnxruntime (relative deviation above `tolerance`, or another shape), or raises.

    Each op the converter made for a node is watched as `graph` runs: its output is kept,
    and an op that started and never finished is the one that raised. The torch graph is
    the one that failed, with no tensor exposed (exposing a MatMul's output would undo
    onnx2pytorch's MatMul + Add fusion); only onnxruntime's copy exposes every tensor."""
    module = graph.module
    nodes = {node.output[0]: node for node in module.onnx_model.graph.node if node.output}
    produced: dict[str, torch.Tensor] = {}
    running: list[str] = []
    handles = []
    for tensor, attribute in module.mapping.items():
        op = getattr(module, attribute, None)
        if isinstance(op, torch.nn.Module) and tensor in nodes:
            handles.append(op.register_forward_pre_hook(_watcher(running, tensor)))
            handles.append(op.register_forward_hook(_recorder(running, produced, tensor)))
    raised = None
    try:
        graph(feeds)
    except Exception:
        raised = running[-1] if running else None
    finally:
        for handle in handles:
            handle.remove()
    names = [name for name in nodes if name in produced]
    reference = {}
    if names:
        session = open_session(with_outputs(graph.model, names), device="cpu", held=graph.held)
        reference = dict(zip(names, session.run(names, feeds)))
    for name in names:
        actual = produced[name].detach().cpu().numpy()
        if not _relative_deviation(actual, reference[name]) <= tolerance:
            return _describe(nodes[name])
    if raised is not None:
        return _describe(nodes[raised])
    if graph.guessed_ops:
        return f"{', '.join(sorted(set(graph.guessed_ops)))} (converted by guessing)"
    return "unknown"


def _describe(node: onnx.NodeProto) -> str:
    return f"{node.op_type} node '{node.name or node.output[0]}'"


def _watcher(running: list[str], tensor: str):
    def started(module, inputs) -> None:
        running.append(tensor)

    return started


def _recorder(running: list[str], produced: dict[str, torch.Tensor], tensor: str):
    def finished(module, inputs, output) -> None:
        running.pop()
        if isinstance(output, torch.Tensor):
            produced[tensor] = output

    return finished


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


def _live_nodes(
    graph: onnx.GraphProto, needed: set[str], stop: set[str] = frozenset()
) -> tuple[list, set[str]]:
    """The nodes that the tensors `needed` depend on, in graph order, and every name they
    read (`needed` grown by them); the tensors in `stop` are taken as given, not traced."""
    live = set()
    for index in reversed(range(len(graph.node))):
        node = graph.node[index]
        if any(name in needed and name not in stop for name in node.output):
            live.add(index)
            needed.update(name for name in node.input if name)
            needed.update(_subgraph_inputs(node))
    return [graph.node[index] for index in sorted(live)], needed


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names an If/Loop/Scan body reads from the outer scope (conservatively: all inputs)."""
    names = set()
    for _, subgraph in modelio.subgraphs(node):
        for inner in subgraph.node:
            names.update(name for name in inner.input if name)
    return names
