"""Models from real exporters, end to end; and the converter survey of docs/SUPPORTED.md.

Exporters: torch's TorchScript exporter (Gemm), torch's dynamo exporter (MatMul + Add on
rank-3 activations, opset 18, and a model it saves with external data), skl2onnx's
MLPClassifier (with and without ZipMap) and MLPRegressor, a float16 torch export, and
every opset from 13 to the newest onnx knows. Each is compressed, checked, evaluated, and
compressed at ratio 0, whose onnxruntime outputs must equal the original's.

The survey builds Gemm → OP → Gemm (or MatMul + Add around rank-3 activations) for the ops
found around MLPs and runs the parity check; the statuses are read from the table in
docs/SUPPORTED.md, so the document cannot drift from what the converter does.
`python -m tests.test_exporters` prints the table as measured here.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ecprune_onnx import compress, evaluate, modelio
from ecprune_onnx.errors import UsageError
from ecprune_onnx.instrument import TorchGraph, check_parity, choose_outputs, instrument
from ecprune_onnx.layers import find_dense_layers
from ecprune_onnx.modelio import file_uses_external_data
from tests import graphs

ROOT = Path(__file__).resolve().parent.parent
SUPPORTED_MD = ROOT / "docs" / "SUPPORTED.md"

# onnxruntime 1.31 officially supports ai.onnx up to opset 26 and refuses newer stamps
# ("Opset 27 is under development"); raise this when onnxruntime is upgraded.
NEWEST_ONNXRUNTIME_OPSET = 26

CALIB_ROWS = 48


# ------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Exported:
    """A model file written by an exporter, the data to run it on, and --output names."""

    name: str
    path: Path
    feeds: dict[str, np.ndarray]
    outputs: tuple[str, ...] = ()


def run_onnxruntime(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, object]:
    """Every graph output by name (maps and sequences included), from the file on disk."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file in a folder, by name."""
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.iterdir())
        if path.is_file()
    }


def dense_weight_zeros(path: Path) -> int:
    """Zeros in the weights of the dense layers of a model file."""
    model = onnx.load(str(path))
    return sum(int((layer.weight == 0).sum()) for layer in find_dense_layers(model).layers)


def assert_compresses(exported: Exported, folder: Path, ratio: float = 0.5) -> None:
    """compress, check the file, evaluate; ratio 0 gives onnxruntime's original outputs."""
    calib = folder / f"{exported.name}.calib.npz"
    np.savez(calib, **exported.feeds)
    before = digest(exported.path.parent)
    pruned = folder / f"{exported.name}.pruned.onnx"

    # ec, not the default ecr: ecr also zeroes the weights of inputs that are dead on the
    # calibration rows (reconstruct._zero_dead_inputs) without counting them as removed, so
    # the zeros of a model with a dead ReLU unit (the regressor) exceed `removed`.
    result = compress(
        exported.path, calib, ratio, output=pruned, outputs=exported.outputs, method="ec"
    )

    onnx.checker.check_model(str(pruned), full_check=True)
    weights = sum(layer.weights for layer in result.layers)
    removed = sum(layer.removed for layer in result.layers)
    assert abs(removed - ratio * weights) <= 1, (removed, weights)
    assert dense_weight_zeros(pruned) == removed
    assert result.measured_deviation is not None and np.isfinite(result.measured_deviation)
    report = evaluate(exported.path, pruned, calib)
    assert sum(layer.zeros for layer in report.layers) == removed
    assert all(np.isfinite(output.mse) for output in report.outputs)

    identity = folder / f"{exported.name}.ratio0.onnx"
    zero = compress(exported.path, calib, 0.0, output=identity, outputs=exported.outputs)
    assert zero.measured_deviation == 0.0
    original = run_onnxruntime(exported.path, exported.feeds)
    again = run_onnxruntime(identity, exported.feeds)
    assert original.keys() == again.keys()
    for name, value in original.items():
        if isinstance(value, np.ndarray):
            assert np.array_equal(again[name], value), name
        else:  # ZipMap's list of dicts
            assert again[name] == value, name
    after = digest(exported.path.parent)
    assert {name: after.get(name) for name in before} == before, "a file there changed"


def _dynamic_batch(names: list[str]) -> dict[str, dict[int, str]]:
    return {name: {0: "batch"} for name in names}


def export_torchscript(module: torch.nn.Module, x: np.ndarray, path: Path, opset: int) -> Path:
    """torch.onnx.export with the TorchScript exporter: nn.Linear on rank 2 becomes Gemm."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated
        torch.onnx.export(
            module.eval(),
            (torch.from_numpy(x),),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes=_dynamic_batch(["x", "y"]),
        )
    return path


def export_dynamo(module: torch.nn.Module, x: np.ndarray, path: Path, **options) -> Path:
    """torch.onnx.export with the dynamo exporter (torch.export + onnxscript)."""
    torch.onnx.export(
        module.eval(),
        (torch.from_numpy(x),),
        str(path),
        dynamo=True,
        opset_version=18,
        input_names=["x"],
        output_names=["y"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
        **options,
    )
    return path


def rows(shape: tuple[int, ...], dtype=np.float32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


# ----------------------------------------------------------------------- exporters


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("exporters")


def test_torchscript_exporter_gemm(folder):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8), torch.nn.Tanh()
    )
    mlp.append(torch.nn.Linear(8, 3))
    x = rows((CALIB_ROWS, 6))
    path = export_torchscript(mlp, x, folder / "torchscript.onnx", opset=17)
    layers = find_dense_layers(onnx.load(str(path))).layers
    assert [layer.kind for layer in layers] == ["gemm"] * 3
    assert_compresses(Exported("torchscript", path, {"x": x}), folder)


def test_dynamo_exporter_matmul_add_rank3(folder):
    torch.manual_seed(1)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    x = rows((CALIB_ROWS, 5, 6), seed=1)
    subfolder = folder / "dynamo"
    subfolder.mkdir()
    path = export_dynamo(mlp, x, subfolder / "dynamo.onnx")
    model = onnx.load(str(path))
    assert model.opset_import[0].version >= 18
    assert len(model.graph.input[0].type.tensor_type.shape.dim) == 3
    # GELU is exported as Div, Erf, Add, Mul, Mul; nn.Linear on rank 3 as MatMul + Add.
    assert {"Erf", "MatMul", "Add"} <= {node.op_type for node in model.graph.node}
    layers = find_dense_layers(model).layers
    assert [layer.kind for layer in layers] == ["matmul_add"] * 2
    assert_compresses(Exported("dynamo", path, {"x": x}), folder)


def test_dynamo_exporter_with_external_data(folder):
    torch.manual_seed(2)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    x = rows((CALIB_ROWS, 16), seed=2)
    subfolder = folder / "external"
    subfolder.mkdir()
    path = export_dynamo(mlp, x, subfolder / "model.onnx", external_data=True)
    assert (subfolder / "model.onnx.data").is_file()
    assert file_uses_external_data(path)
    assert_compresses(Exported("external", path, {"x": x}), subfolder)
    assert file_uses_external_data(subfolder / "external.pruned.onnx")
    assert (subfolder / "external.pruned.onnx.data").is_file()


def test_output_over_the_protobuf_limit_is_written_with_external_data(
    folder, monkeypatch, checker_refuses_protos
):
    # The 2 GB case scaled down: a single-file input whose pruned copy is "too big" for one
    # protobuf must come out as <output> + <output>.data, loadable by path, and nothing on
    # the way may check an in-memory proto (onnx refuses that past 2 GB).
    torch.manual_seed(5)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    x = rows((CALIB_ROWS, 16), seed=5)
    subfolder = folder / "over_limit"
    subfolder.mkdir()
    path = export_torchscript(mlp, x, subfolder / "single.onnx", opset=17)
    assert not file_uses_external_data(path)
    monkeypatch.setattr(modelio, "PROTOBUF_LIMIT_BYTES", 1000)
    assert_compresses(Exported("over", path, {"x": x}), subfolder)
    assert file_uses_external_data(subfolder / "over.pruned.onnx")
    assert (subfolder / "over.pruned.onnx.data").is_file()


def test_float16_torch_export(folder):
    torch.manual_seed(3)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    x = rows((CALIB_ROWS, 6), np.float16, seed=3)
    path = export_torchscript(mlp.half(), x, folder / "half.onnx", opset=17)
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert_compresses(Exported("half", path, {"x": x}), folder)
    pruned = onnx.load(str(folder / "half.pruned.onnx"))
    assert {tensor.data_type for tensor in pruned.graph.initializer} == {TensorProto.FLOAT16}


# skl2onnx -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sklearn_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = rows((CALIB_ROWS, 5), seed=4)
    classes = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 0.5)
    target = x @ np.linspace(-1, 1, 5)
    return x, classes, target


def skl2onnx_file(estimator, x: np.ndarray, path: Path, options=None) -> Path:
    from skl2onnx import to_onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = to_onnx(estimator, x[:1], options=options, target_opset={"": 17, "ai.onnx.ml": 3})
    onnx.save(model, path)
    return path


def mlp_classifier(x, classes):
    from sklearn.neural_network import MLPClassifier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # did not converge in 60 iterations: fine here
        return MLPClassifier(hidden_layer_sizes=(7,), max_iter=60, random_state=0).fit(x, classes)


def softmax_output(path: Path) -> str:
    """The float tensor skl2onnx's ZipMap and ArgMax read: the class probabilities."""
    model = onnx.load(str(path))
    (softmax,) = [node for node in model.graph.node if node.op_type == "Softmax"]
    return softmax.output[0]


def test_skl2onnx_classifier_with_zipmap(folder, sklearn_data):
    x, classes, _ = sklearn_data
    path = skl2onnx_file(mlp_classifier(x, classes), x, folder / "zipmap.onnx")
    model = onnx.load(str(path))
    kinds = {output.name: output.type.WhichOneof("value") for output in model.graph.output}
    assert kinds == {"output_label": "tensor_type", "output_probability": "sequence_type"}
    np.savez(folder / "zipmap.npz", X=x)
    # No float tensor among the graph outputs: refused with a pointer to --output ...
    with pytest.raises(UsageError, match="no float tensor output; name one with --output"):
        compress(path, folder / "zipmap.npz", 0.5, output=folder / "zipmap.refused.onnx")
    assert not (folder / "zipmap.refused.onnx").exists()
    # ... and the probabilities feeding the ZipMap calibrate it; the map output is only run.
    assert_compresses(Exported("zipmap", path, {"X": x}, (softmax_output(path),)), folder)


def test_skl2onnx_classifier_without_zipmap(folder, sklearn_data):
    x, classes, _ = sklearn_data
    estimator = mlp_classifier(x, classes)
    path = skl2onnx_file(estimator, x, folder / "nozipmap.onnx", {"zipmap": False})
    assert [layer.kind for layer in find_dense_layers(onnx.load(str(path))).layers] == [
        "matmul_add"
    ] * 2
    assert_compresses(Exported("nozipmap", path, {"X": x}), folder)


def test_skl2onnx_regressor(folder, sklearn_data):
    from sklearn.neural_network import MLPRegressor

    x, _, target = sklearn_data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        estimator = MLPRegressor(hidden_layer_sizes=(7, 6), max_iter=60, random_state=0)
        estimator.fit(x, target)
    path = skl2onnx_file(estimator, x, folder / "regressor.onnx")
    assert len(find_dense_layers(onnx.load(str(path))).layers) == 3
    assert_compresses(Exported("regressor", path, {"X": x}), folder)


# opsets ---------------------------------------------------------------------------


def opset_model(opset: int) -> tuple[onnx.ModelProto, np.ndarray]:
    """x → Gemm(transB) → Relu → MatMul + Add → y, stamped with `opset`, IR 10."""
    builder = graphs.GraphBuilder(opset)
    hidden, _ = builder.gemm("l1", "x", (6, 5), trans_b=1)
    activated = builder.node("Relu", [hidden], "l1_act", "act")
    y, _ = builder.matmul_add("l2", activated, (5, 4))
    return graphs.make_model(
        builder.nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 6])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["rows", 4])],
        builder.initializers,
        opset=opset,
        ir_version=10,
    ), builder.array((CALIB_ROWS, 6))


@pytest.mark.parametrize("opset", range(13, onnx.defs.onnx_opset_version() + 1))
def test_every_opset(tmp_path, opset):
    model, x = opset_model(opset)
    path = tmp_path / f"opset{opset}.onnx"
    onnx.save(model, path)
    if opset <= NEWEST_ONNXRUNTIME_OPSET:
        assert_compresses(Exported(f"opset{opset}", path, {"x": x}), tmp_path)
        return
    np.savez(tmp_path / "calib.npz", x=x)
    with pytest.raises(UsageError, match=f"onnxruntime cannot load the model.*[Oo]pset {opset}"):
        compress(path, tmp_path / "calib.npz", 0.5, output=tmp_path / "pruned.onnx")
    assert not (tmp_path / "pruned.onnx").exists()


def test_the_opset_range_is_not_empty():
    # onnx 1.23 knows opset 28; if onnxruntime ever ran all of them the refusal branch
    # above would be dead code, and if it ran fewer than 21 the upper range would be.
    assert 21 <= NEWEST_ONNXRUNTIME_OPSET < onnx.defs.onnx_opset_version()


# ------------------------------------------------------------------ converter survey

IN_FEATURES, HIDDEN, OUT_FEATURES, SEQ = 6, 8, 3, 2


@dataclass(frozen=True)
class OpProbe:
    """OP between two dense layers: nodes from tensor "z" to tensor "h".

    z has shape [n, HIDDEN] ([n, SEQ, HIDDEN] when rank3); h has shape [n, *tail].
    positive: x, the first weight and bias are made positive, so z > 0 (Sqrt, Log).
    """

    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]
    tail: tuple[int, ...] = (HIDDEN,)
    opset: int = 17
    rank3: bool = False
    positive: bool = False


def _op(op_type: str, inputs: list[str], output: str = "h", **attrs) -> onnx.NodeProto:
    return helper.make_node(op_type, inputs, [output], name=f"op_{output}", **attrs)


def _const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _floats(name: str, *shape: int, positive: bool = False) -> onnx.TensorProto:
    array = np.random.default_rng(len(name) + sum(shape)).normal(size=shape)
    return _const(name, (np.abs(array) + 0.5 if positive else array).astype(np.float32))


def _ints(name: str, values) -> onnx.TensorProto:
    return _const(name, np.array(values, dtype=np.int64))


def _unary(op_type: str, opset: int = 17, positive: bool = False, **attrs) -> OpProbe:
    return OpProbe([_op(op_type, ["z"], **attrs)], [], opset=opset, positive=positive)


def _binary(op_type: str, constant_first: bool = False, positive: bool = False) -> OpProbe:
    inputs = ["k", "z"] if constant_first else ["z", "k"]
    return OpProbe([_op(op_type, inputs)], [_floats("k", HIDDEN, positive=positive)])


def _pair(first: onnx.NodeProto, second: onnx.NodeProto, inits=(), **options) -> OpProbe:
    return OpProbe([first, second], list(inits), **options)


def _reduce(op_type: str, opset: int, axes_as_input: bool, keepdims: int = 1) -> OpProbe:
    if axes_as_input:
        node, inits = _op(op_type, ["z", "axes"], keepdims=keepdims), [_ints("axes", [1])]
    else:
        node, inits = _op(op_type, ["z"], axes=[1], keepdims=keepdims), []
    if keepdims:
        return OpProbe([node], inits, (1,), opset)
    node = helper.make_node(op_type, node.input, ["r"], name="op_r", keepdims=0)
    unsqueeze = _op("Unsqueeze", ["r", "one"])
    return OpProbe([node, unsqueeze], [*inits, _ints("one", [1])], (1,), opset)


def _shape_reshape() -> OpProbe:
    """TorchScript's x.view(x.size(0), -1): Shape → Gather → Unsqueeze → Concat → Reshape."""
    nodes = [
        _op("Shape", ["z"], "s"),
        _op("Gather", ["s", "zero"], "n0", axis=0),
        _op("Unsqueeze", ["n0", "axis0"], "n1"),
        _op("Concat", ["n1", "minus1"], "target", axis=0),
        _op("Reshape", ["z", "target"]),
    ]
    inits = [_ints("zero", 0), _ints("axis0", [0]), _ints("minus1", [-1])]
    return OpProbe(nodes, inits)


def _batch_norm(opset: int = 17) -> OpProbe:
    inits = [_floats(name, HIDDEN) for name in ("scale", "shift", "mean")]
    inits.append(_floats("var", HIDDEN, positive=True))
    node = _op("BatchNormalization", ["z", "scale", "shift", "mean", "var"], epsilon=1e-3)
    return OpProbe([node], inits, opset=opset)


SURVEY: dict[str, Callable[[], OpProbe]] = {
    # activations
    "Relu": lambda: _unary("Relu"),
    "Tanh": lambda: _unary("Tanh"),
    "Sigmoid": lambda: _unary("Sigmoid"),
    "Gelu": lambda: _unary("Gelu", opset=20),
    "Gelu (approximate=tanh)": lambda: _unary("Gelu", opset=20, approximate="tanh"),
    "LeakyRelu": lambda: _unary("LeakyRelu", alpha=0.3),
    "LeakyRelu (default alpha)": lambda: _unary("LeakyRelu"),
    "PRelu": lambda: _binary("PRelu"),
    "Elu": lambda: _unary("Elu", alpha=0.7),
    "Selu": lambda: _unary("Selu", alpha=1.5, gamma=1.2),
    "Celu": lambda: _unary("Celu", alpha=0.6),
    "Softplus": lambda: _unary("Softplus"),
    "Softsign": lambda: _unary("Softsign"),
    "HardSigmoid": lambda: _unary("HardSigmoid", alpha=0.3, beta=0.4),
    "HardSwish": lambda: _unary("HardSwish"),
    "Mish": lambda: _unary("Mish", opset=18),
    "Swish": lambda: _unary("Swish", opset=24, alpha=0.7),
    "ThresholdedRelu": lambda: _unary("ThresholdedRelu", alpha=0.4),
    "Shrink": lambda: _unary("Shrink", lambd=0.4, bias=0.1),
    "Erf": lambda: _unary("Erf"),
    "Softmax": lambda: _unary("Softmax", axis=-1),
    "Softmax (opset 11)": lambda: _unary("Softmax", opset=11, axis=1),
    "Softmax (opset 11, rank 3, axis 1)": lambda: OpProbe(
        [_op("Softmax", ["z"], axis=1)], [], (SEQ, HIDDEN), opset=11, rank3=True
    ),
    "LogSoftmax": lambda: _unary("LogSoftmax", axis=-1),
    "LogSoftmax (opset 11, rank 3, axis 1)": lambda: OpProbe(
        [_op("LogSoftmax", ["z"], axis=1)], [], (SEQ, HIDDEN), opset=11, rank3=True
    ),
    "Hardmax": lambda: _unary("Hardmax"),
    # elementwise
    "Identity": lambda: _unary("Identity"),
    "Dropout": lambda: OpProbe([_op("Dropout", ["z", "p"])], [_const("p", np.float32(0.5))]),
    "Dropout (opset 11, ratio attribute)": lambda: _unary("Dropout", opset=11, ratio=0.3),
    "Cast (to double and back)": lambda: _pair(
        _op("Cast", ["z"], "d", to=TensorProto.DOUBLE), _op("Cast", ["d"], to=TensorProto.FLOAT)
    ),
    "Cast (to float16 and back)": lambda: _pair(
        _op("Cast", ["z"], "d", to=TensorProto.FLOAT16), _op("Cast", ["d"], to=TensorProto.FLOAT)
    ),
    "Add": lambda: _binary("Add"),
    "Sub": lambda: _binary("Sub", constant_first=True),
    "Mul": lambda: _binary("Mul"),
    "Div": lambda: _binary("Div", positive=True),
    "Max": lambda: _binary("Max"),
    "Min": lambda: _binary("Min"),
    "Sum": lambda: OpProbe([_op("Sum", ["z", "k", "z"])], [_floats("k", HIDDEN)]),
    "Mean": lambda: _binary("Mean"),
    "Pow": lambda: OpProbe([_op("Pow", ["z", "e"])], [_const("e", np.float32(2.0))]),
    "Sqrt": lambda: _unary("Sqrt", positive=True),
    "Exp": lambda: _unary("Exp"),
    "Log": lambda: _unary("Log", positive=True),
    "Reciprocal": lambda: _unary("Reciprocal", positive=True),
    "Abs": lambda: _unary("Abs"),
    "Neg": lambda: _unary("Neg"),
    "Clip": lambda: OpProbe(
        [_op("Clip", ["z", "lo", "hi"])],
        [_const("lo", np.float32(-0.5)), _const("hi", np.float32(0.7))],
    ),
    "Clip (min only)": lambda: OpProbe(
        [_op("Clip", ["z", "lo"])], [_const("lo", np.float32(-0.5))]
    ),
    "Clip (opset 10, attributes)": lambda: _unary("Clip", opset=10, min=-0.5, max=0.7),
    "Where": lambda: OpProbe(
        [_op("Where", ["cond", "z", "k"])],
        [_const("cond", np.arange(HIDDEN) % 2 == 0), _floats("k", HIDDEN)],
    ),
    # normalisation
    "LayerNormalization": lambda: OpProbe(
        [_op("LayerNormalization", ["z", "g", "b"], axis=-1, epsilon=1e-3)],
        [_floats("g", HIDDEN), _floats("b", HIDDEN)],
    ),
    "LayerNormalization (rank 3)": lambda: OpProbe(
        [_op("LayerNormalization", ["z", "g"], axis=-1)],
        [_floats("g", HIDDEN)],
        (SEQ, HIDDEN),
        rank3=True,
    ),
    "BatchNormalization (inference)": lambda: _batch_norm(),
    "BatchNormalization (opset 9)": lambda: _batch_norm(opset=9),
    # shapes
    "Flatten": lambda: _unary("Flatten", axis=1),
    "Flatten (rank 3)": lambda: OpProbe(
        [_op("Flatten", ["z"], axis=1)], [], (SEQ * HIDDEN,), rank3=True
    ),
    "Reshape": lambda: OpProbe([_op("Reshape", ["z", "shape"])], [_ints("shape", [-1, HIDDEN])]),
    "Reshape (from Shape, Gather, Unsqueeze, Concat)": _shape_reshape,
    "Transpose (perm 1,0 twice)": lambda: _pair(
        _op("Transpose", ["z"], "t", perm=[1, 0]), _op("Transpose", ["t"], perm=[1, 0])
    ),
    "Transpose (rank 3, perm 0,2,1 twice)": lambda: _pair(
        _op("Transpose", ["z"], "t", perm=[0, 2, 1]),
        _op("Transpose", ["t"], perm=[0, 2, 1]),
        tail=(SEQ, HIDDEN),
        rank3=True,
    ),
    "Unsqueeze, Squeeze": lambda: _pair(
        _op("Unsqueeze", ["z", "axes"], "u"), _op("Squeeze", ["u", "axes"]), [_ints("axes", [1])]
    ),
    "Unsqueeze, Squeeze (no axes)": lambda: _pair(
        _op("Unsqueeze", ["z", "axes"], "u"), _op("Squeeze", ["u"]), [_ints("axes", [1])]
    ),
    "Concat": lambda: OpProbe([_op("Concat", ["z", "z"], axis=1)], [], (2 * HIDDEN,)),
    "Concat (axis -1)": lambda: OpProbe([_op("Concat", ["z", "z"], axis=-1)], [], (2 * HIDDEN,)),
    "Split, Concat": lambda: _pair(
        helper.make_node("Split", ["z", "sizes"], ["a", "b"], name="op_split", axis=1),
        _op("Concat", ["b", "a"], axis=1),
        [_ints("sizes", [3, 5])],
    ),
    "Gather": lambda: OpProbe(
        [_op("Gather", ["z", "idx"], axis=1)], [_ints("idx", [0, 2, 4, 7, 7])], (5,)
    ),
    "Gather (negative indices)": lambda: OpProbe(
        [_op("Gather", ["z", "idx"], axis=1)], [_ints("idx", [-1, 0, -3])], (3,)
    ),
    "Gather (axis -1)": lambda: OpProbe(
        [_op("Gather", ["z", "idx"], axis=-1)], [_ints("idx", [1, 0, 3])], (3,)
    ),
    "Gather (axis -1, a permutation)": lambda: OpProbe(
        [_op("Gather", ["z", "idx"], axis=-1)], [_ints("idx", [7, 6, 5, 4, 3, 2, 1, 0])]
    ),
    "Slice": lambda: OpProbe(
        [_op("Slice", ["z", "starts", "ends", "axes"])],
        [_ints("starts", [1]), _ints("ends", [7]), _ints("axes", [1])],
        (6,),
    ),
    "Slice (step -1)": lambda: OpProbe(
        [_op("Slice", ["z", "starts", "ends", "axes", "steps"])],
        [_ints("starts", [-1]), _ints("ends", [-100]), _ints("axes", [1]), _ints("steps", [-1])],
    ),
    "Pad": lambda: OpProbe(
        [_op("Pad", ["z", "pads", "value"])],
        [_ints("pads", [0, 1, 0, 2]), _const("value", np.float32(0.5))],
        (HIDDEN + 3,),
    ),
    "Expand": lambda: OpProbe([_op("Expand", ["z", "shape"])], [_ints("shape", [1, HIDDEN])]),
    "Tile": lambda: OpProbe([_op("Tile", ["z", "reps"])], [_ints("reps", [1, 2])], (2 * HIDDEN,)),
    # reductions
    "ReduceMean": lambda: _reduce("ReduceMean", 18, axes_as_input=True),
    "ReduceMean (opset 17, axes attribute)": lambda: _reduce("ReduceMean", 17, False),
    "ReduceSum": lambda: _reduce("ReduceSum", 17, axes_as_input=True),
    "ReduceSum (keepdims 0)": lambda: _reduce("ReduceSum", 17, True, keepdims=0),
    "ReduceMax": lambda: _reduce("ReduceMax", 18, axes_as_input=True),
    # products
    "MatMul": lambda: OpProbe([_op("MatMul", ["z", "k"])], [_floats("k", HIDDEN, 5)], (5,)),
    "Gemm (transB, alpha, beta)": lambda: OpProbe(
        [_op("Gemm", ["z", "k", "kb"], transB=1, alpha=0.5, beta=2.0)],
        [_floats("k", 5, HIDDEN), _floats("kb", 5)],
        (5,),
    ),
    "Einsum": lambda: OpProbe(
        [_op("Einsum", ["z", "k"], equation="ij,jk->ik")], [_floats("k", HIDDEN, 5)], (5,)
    ),
}


def _dense(prefix: str, a: str, out: str, n_in: int, n_out: int, rank3: bool, rng, positive):
    """Gemm (rank 2) or MatMul + Add (rank 3) from `a` to `out`: nodes and initializers."""
    weight = rng.normal(size=(n_out, n_in)).astype(np.float32)
    bias = rng.normal(size=n_out).astype(np.float32)
    if positive:
        weight, bias = np.abs(weight), np.abs(bias) + 0.1
    if rank3:
        nodes = [
            helper.make_node("MatMul", [a, f"{prefix}_w"], [f"{prefix}_xw"], name=prefix),
            helper.make_node("Add", [f"{prefix}_xw", f"{prefix}_b"], [out], name=f"{prefix}_add"),
        ]
        weight = weight.T
    else:
        inputs = [a, f"{prefix}_w", f"{prefix}_b"]
        nodes = [helper.make_node("Gemm", inputs, [out], name=prefix, transB=1)]
    return nodes, [_const(f"{prefix}_w", weight), _const(f"{prefix}_b", bias)]


def survey_model(probe: OpProbe) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x → dense → OP → dense → y, and 16 rows of x."""
    rng = np.random.default_rng(0)
    lead = ["n", SEQ] if probe.rank3 else ["n"]
    first, first_inits = _dense(
        "fc1", "x", "z", IN_FEATURES, HIDDEN, probe.rank3, rng, probe.positive
    )
    h_rank3 = len(probe.tail) == 2
    lead_h = ["n", SEQ] if h_rank3 else ["n"]
    second, second_inits = _dense(
        "fc2", "h", "y", probe.tail[-1], OUT_FEATURES, h_rank3, rng, False
    )
    graph = helper.make_graph(
        [*first, *probe.nodes, *second],
        "survey",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*lead, IN_FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*lead_h, OUT_FEATURES])],
        [*first_inits, *probe.initializers, *second_inits],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", probe.opset)], ir_version=10
    )
    onnx.checker.check_model(model, full_check=True)
    x = rng.normal(size=(16, SEQ, IN_FEATURES) if probe.rank3 else (16, IN_FEATURES))
    x = np.abs(x) if probe.positive else x
    return model, {"x": x.astype(np.float32)}


def survey(name: str) -> tuple[str, str]:
    """(status, detail) of one op: "pass", "fails parity", "refused" or "crash"."""
    model, feeds = survey_model(SURVEY[name]())
    layers = find_dense_layers(model).layers
    instrumented, _ = instrument(model, layers, choose_outputs(model, []))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # onnx2pytorch's indexing deprecation warnings
        try:
            graph = TorchGraph(instrumented, torch.device("cpu"))
        except UsageError as error:
            return "refused", str(error)
        try:
            deviation = check_parity(graph, feeds)
        except UsageError as error:
            found = re.search(r"first (?:differing|failing) op: (.*?);", str(error))
            if found is None:  # onnxruntime refused the probe itself: a bug of the probe
                raise
            return "fails parity", found.group(1)
        except Exception as error:  # noqa: BLE001 - what escapes is what we document
            return "crash", f"{type(error).__name__}: {' '.join(str(error).split())[:120]}"
    return "pass", f"{deviation.deviation:.0e}"


def documented_statuses() -> dict[str, str]:
    """op → status from the survey table of docs/SUPPORTED.md."""
    text = SUPPORTED_MD.read_text(encoding="utf-8")
    table = text.split("<!-- survey:begin -->")[1].split("<!-- survey:end -->")[0]
    statuses = {}
    for line in table.strip().splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        statuses[cells[0].strip("`")] = cells[2]
    return statuses


def test_supported_md_lists_every_surveyed_op_and_the_versions():
    assert list(documented_statuses()) == list(SURVEY)
    text = SUPPORTED_MD.read_text(encoding="utf-8")
    for package in ("onnx2pytorch", "onnxruntime-gpu", "onnx", "torch"):
        assert f"{package} {metadata.version(package)}" in text, package


@pytest.mark.parametrize("name", list(SURVEY))
def test_converter_survey_matches_supported_md(name):
    status, detail = survey(name)
    assert status == documented_statuses()[name], detail


def survey_table() -> str:
    """The markdown table of docs/SUPPORTED.md, as measured now."""
    lines = ["| op | opset | status | detail |", "|---|---|---|---|"]
    for name in SURVEY:
        status, detail = survey(name)
        lines.append(f"| `{name}` | {SURVEY[name]().opset} | {status} | {detail} |")
    return "\n".join(lines)


if __name__ == "__main__":
    for package in ("onnx2pytorch", "onnxruntime-gpu", "onnx", "torch"):
        print(f"{package} {metadata.version(package)}")
    print(survey_table())
