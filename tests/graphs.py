"""Small ONNX graphs of every dense pattern of docs/design.md, with a numpy reference for each.

A `Case` is a model that onnxruntime runs, the feeds to run it on, the layers that
`find_dense_layers` must find (with their effective weight and bias computed here by hand,
independently of `layers.py`), and `forward(weights, biases)`: the network in numpy, taking
the effective [out, in] weights and [out] biases of those layers, so that the masked network
with shifted biases has a reference too. A `SkipCase` is a graph with dense-looking nodes
that must be reported as not prunable, with a key word of the reason.

Opset 17 / IR 8: checked with onnx 1.23 and onnxruntime 1.32 (CPU).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
METADATA = {"author": "ecprune-onnx tests", "dataset": "none, random weights"}

IN_FEATURES, HIDDEN, OUT_FEATURES = 6, 5, 4
ROWS, SEQ = 7, 3

ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Relu": lambda a: np.maximum(a, 0.0),
    "Tanh": np.tanh,
}

# Relative tolerance of onnxruntime's output against the float64 numpy reference: float32
# accumulates rounding of ~1e-7 per term over a handful of terms; float16 rounds every
# stored intermediate at ~5e-4.
RTOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5, np.dtype(np.float16): 1e-2}

Forward = Callable[[list[np.ndarray], list[np.ndarray]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class ExpectedLayer:
    """What `find_dense_layers` must report for one dense layer."""

    name: str
    kind: str
    weight: np.ndarray  # effective, float64 [out, in]
    bias: np.ndarray  # effective, float64 [out]
    weight_name: str
    bias_name: str | None
    input_name: str
    output_name: str
    weight_dtype: np.dtype
    transpose_input: bool = False
    stored_as_out_in: bool = False


@dataclass(frozen=True)
class Case:
    """A prunable graph, its feeds, its expected layers and its numpy reference."""

    name: str
    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    layers: list[ExpectedLayer]
    forward: Forward
    dtype: np.dtype
    tags: frozenset[str] = field(default_factory=frozenset)

    def reference(
        self, weights: list[np.ndarray] | None = None, biases: list[np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """The graph outputs in float64, with the given effective weights/biases (or its own)."""
        weights = [layer.weight for layer in self.layers] if weights is None else weights
        biases = [layer.bias for layer in self.layers] if biases is None else biases
        return self.forward(weights, biases)

    @property
    def rtol(self) -> float:
        return RTOL[np.dtype(self.dtype)]


@dataclass(frozen=True)
class SkipCase:
    """A graph whose nodes in `skipped` (node name → key word of the reason) are not prunable."""

    name: str
    model: onnx.ModelProto
    skipped: dict[str, str]
    prunable: list[str]


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto],
    opset: int = OPSET,
    ir_version: int = IR_VERSION,
) -> onnx.ModelProto:
    """A model (opset 17 / IR 8 unless told) with metadata props set, validated by the checker."""
    graph = helper.make_graph(nodes, "dense_test", inputs, outputs, initializer=initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=ir_version,
        producer_name="ecprune-onnx-tests",
    )
    helper.set_model_props(model, METADATA)
    onnx.checker.check_model(model, full_check=True)
    return model


class GraphBuilder:
    """Appends nodes and initializers; each dense method returns (output, ExpectedLayer)."""

    def __init__(self, seed: int, dtype: np.dtype = np.float32):
        self.rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def array(self, shape: tuple[int, ...], dtype: np.dtype | None = None) -> np.ndarray:
        return self.rng.normal(size=shape).astype(dtype or self.dtype)

    def initializer(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], output: str, name: str = "", **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output

    def gemm(
        self,
        prefix: str,
        a: str,
        sizes: tuple[int, int],
        trans_a: int = 0,
        trans_b: int = 0,
        alpha: float = 1.0,
        beta: float = 1.0,
        c_shape: tuple[int, ...] | str | None = (-1,),
        weight_dtype: np.dtype | None = None,
    ) -> tuple[str, ExpectedLayer]:
        """Gemm on the activation `a` ([rows, in]); -1 in c_shape stands for out.

        c_shape None: no C; "": C given as the empty name (an omitted optional input).
        """
        n_in, n_out = sizes
        weight_dtype = np.dtype(weight_dtype or self.dtype)
        layer_input = a
        if trans_a:  # Gemm reads A^T: feed it [in, rows] so the layer still sees [rows, in]
            layer_input = self.node("Transpose", [a], f"{prefix}_aT", f"{prefix}_transpose")
        b = self.array((n_out, n_in) if trans_b else (n_in, n_out), weight_dtype)
        inputs = [layer_input, self.initializer(f"{prefix}_B", b)]
        effective_bias = np.zeros(n_out)
        bias_name = None
        if c_shape == "":
            inputs.append("")
        elif c_shape is not None:
            c = self.array(tuple(n_out if size == -1 else size for size in c_shape), weight_dtype)
            bias_name = self.initializer(f"{prefix}_C", c)
            inputs.append(bias_name)
            effective_bias = beta * np.broadcast_to(c.astype(np.float64).reshape(-1), (n_out,))
        attrs = {"transA": trans_a, "transB": trans_b, "alpha": alpha, "beta": beta}
        output = self.node("Gemm", inputs, f"{prefix}_z", prefix, **attrs)
        b64 = b.astype(np.float64)
        return output, ExpectedLayer(
            name=prefix,
            kind="gemm",
            weight=alpha * (b64 if trans_b else b64.T),
            bias=np.array(effective_bias, dtype=np.float64),
            weight_name=f"{prefix}_B",
            bias_name=bias_name,
            input_name=layer_input,
            output_name=output,
            weight_dtype=weight_dtype,
            transpose_input=bool(trans_a),
            stored_as_out_in=bool(trans_b),
        )

    def matmul_add(
        self,
        prefix: str,
        a: str,
        sizes: tuple[int, int],
        bias_first: bool = False,
        bias_shape: tuple[int, ...] = (-1,),
    ) -> tuple[str, ExpectedLayer]:
        """MatMul(a, W) then Add with the bias initializer as first or second input."""
        n_in, n_out = sizes
        w = self.array((n_in, n_out))
        product = self.node(
            "MatMul", [a, self.initializer(f"{prefix}_W", w)], f"{prefix}_xw", prefix
        )
        bias = self.array(tuple(n_out if size == -1 else size for size in bias_shape))
        bias_name = self.initializer(f"{prefix}_b", bias)
        addends = [bias_name, product] if bias_first else [product, bias_name]
        output = self.node("Add", addends, f"{prefix}_z", f"{prefix}_add")
        return output, ExpectedLayer(
            name=prefix,
            kind="matmul_add",
            weight=w.astype(np.float64).T,
            bias=np.broadcast_to(bias.astype(np.float64).reshape(-1), (n_out,)).copy(),
            weight_name=f"{prefix}_W",
            bias_name=bias_name,
            input_name=a,
            output_name=output,
            weight_dtype=self.dtype,
        )

    def matmul(
        self, prefix: str, a: str, sizes: tuple[int, int], node_name: str | None = None
    ) -> tuple[str, ExpectedLayer]:
        """MatMul(a, W) alone; node_name "" leaves the node unnamed."""
        n_in, n_out = sizes
        w = self.array((n_in, n_out))
        name = prefix if node_name is None else node_name
        output = self.node("MatMul", [a, self.initializer(f"{prefix}_W", w)], f"{prefix}_z", name)
        return output, ExpectedLayer(
            name=name or f"MatMul_{output}",
            kind="matmul",
            weight=w.astype(np.float64).T,
            bias=np.zeros(n_out),
            weight_name=f"{prefix}_W",
            bias_name=None,
            input_name=a,
            output_name=output,
            weight_dtype=self.dtype,
        )


DenseStep = Callable[[GraphBuilder, str, str, tuple[int, int]], tuple[str, ExpectedLayer]]


def one_matmul(weight: np.ndarray) -> onnx.ModelProto:
    """x [n, in] → MatMul with the float32 `weight` [in, out] → y, nothing else."""
    in_features, out_features = weight.shape
    return make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", out_features])],
        [numpy_helper.from_array(weight, "w")],
    )


def chain_case(
    name: str,
    dense: DenseStep,
    activation: str = "Relu",
    rank: int = 2,
    dtype: np.dtype = np.float32,
    output_scale: bool = False,
    tags: tuple[str, ...] = (),
    seed: int = 0,
) -> Case:
    """x → dense(l1) → activation → dense(l2) → y [→ Mul by an unrelated initializer → y]."""
    dtype = np.dtype(dtype)
    builder = GraphBuilder(seed, dtype)
    leading = ["rows"] if rank == 2 else ["batch", SEQ]
    elem = helper.np_dtype_to_tensor_dtype(dtype)
    hidden, l1 = dense(builder, "l1", "x", (IN_FEATURES, HIDDEN))
    activated = builder.node(activation, [hidden], "l1_act", "act")
    y, l2 = dense(builder, "l2", activated, (HIDDEN, OUT_FEATURES))
    scale = None
    if output_scale:
        scale = builder.array((1,))
        builder.node("Mul", [y, builder.initializer("out_scale", scale)], "y", "scale")
        y = "y"
    model = make_model(
        builder.nodes,
        [helper.make_tensor_value_info("x", elem, [*leading, IN_FEATURES])],
        [helper.make_tensor_value_info(y, elem, [*leading, OUT_FEATURES])],
        builder.initializers,
    )
    shape = (ROWS, IN_FEATURES) if rank == 2 else (ROWS, SEQ, IN_FEATURES)
    x = builder.array(shape)

    def forward(weights: list[np.ndarray], biases: list[np.ndarray]) -> dict[str, np.ndarray]:
        a = x.astype(np.float64)
        a = ACTIVATIONS[activation](a @ weights[0].T + biases[0])
        a = a @ weights[1].T + biases[1]
        if scale is not None:
            a = a * scale.astype(np.float64)
        return {y: a}

    return Case(name, model, {"x": x}, [l1, l2], forward, dtype, frozenset(tags))


def _c_label(c_shape: tuple[int, ...] | str | None) -> str:
    if c_shape is None or c_shape == "":
        return "none" if c_shape is None else "empty-name"
    return "[" + ",".join("out" if size == -1 else str(size) for size in c_shape) + "]"


GEMM_C_SHAPES: list[tuple[int, ...] | None] = [None, (), (1,), (-1,), (1, -1)]


def gemm_cases() -> list[Case]:
    """Gemm with every combination of transA, transB, alpha, beta and shape of C."""
    cases = []
    combos = itertools.product((0, 1), (0, 1), (1.0, 0.5), (1.0, 2.0), GEMM_C_SHAPES)
    for seed, (trans_a, trans_b, alpha, beta, c_shape) in enumerate(combos):
        name = f"gemm-tA{trans_a}-tB{trans_b}-alpha{alpha:g}-beta{beta:g}-C{_c_label(c_shape)}"

        def dense(builder, prefix, a, sizes, attrs=(trans_a, trans_b, alpha, beta, c_shape)):
            return builder.gemm(prefix, a, sizes, *attrs)

        tags = ["gemm"] + (["beta-scalar-C"] if beta != 1 and c_shape == () else [])
        activation = "Tanh" if seed % 2 else "Relu"
        cases.append(chain_case(name, dense, activation, tags=tuple(tags), seed=seed))
    return cases


def matmul_add_cases() -> list[Case]:
    """MatMul + Add: bias second or first, of every shape that broadcasts to [out], rank 2 or 3."""
    cases = []
    shapes = {2: [(-1,), (1, -1), (), (1,)], 3: [(-1,), (1, -1), (1, 1, -1)]}
    for rank in (2, 3):
        for bias_first, bias_shape in itertools.product((False, True), shapes[rank]):
            label = _c_label(bias_shape)
            side = "first" if bias_first else "second"
            name = f"matmul_add-rank{rank}-bias{label}-{side}"

            def dense(builder, prefix, a, sizes, options=(bias_first, bias_shape)):
                return builder.matmul_add(prefix, a, sizes, *options)

            cases.append(
                chain_case(name, dense, "Tanh", rank=rank, output_scale=True, seed=100 + len(cases))
            )
    return cases


def gemm_edge_cases() -> list[Case]:
    """C as an empty input name, C of shape [1, 1], beta 0 (C ignored), float64."""
    options = {
        "gemm-C-empty-name": {"c_shape": ""},
        "gemm-C[1,1]": {"c_shape": (1, 1), "beta": 2.0},
        "gemm-beta0": {"beta": 0.0, "trans_b": 1},
        "gemm-float64": {"trans_a": 1, "alpha": 0.5},
    }
    cases = []
    for seed, (name, attrs) in enumerate(options.items()):

        def dense(builder, prefix, a, sizes, attrs=attrs):
            return builder.gemm(prefix, a, sizes, **attrs)

        dtype = np.float64 if "float64" in name else np.float32
        cases.append(chain_case(name, dense, dtype=dtype, tags=("gemm",), seed=150 + seed))
    return cases


def matmul_cases() -> list[Case]:
    """MatMul alone, its output the graph output; named and unnamed nodes."""
    cases = []
    for rank, node_name in ((2, None), (3, None), (2, "")):
        label = "unnamed" if node_name == "" else "named"

        def dense(builder, prefix, a, sizes, node_name=node_name):
            return builder.matmul(prefix, a, sizes, node_name)

        case = chain_case(
            f"matmul-rank{rank}-{label}", dense, rank=rank, tags=("matmul",), seed=200 + rank
        )
        cases.append(case)
    return cases


def float16_cases() -> list[Case]:
    """float16 graphs end to end (onnxruntime's CPU kernels run Gemm/MatMul/Add in float16)."""

    def gemm(builder, prefix, a, sizes):
        return builder.gemm(prefix, a, sizes, trans_b=1, beta=2.0, c_shape=())

    def matmul_add(builder, prefix, a, sizes):
        return builder.matmul_add(prefix, a, sizes, bias_shape=(1, -1))

    def matmul(builder, prefix, a, sizes):
        return builder.matmul(prefix, a, sizes)

    return [
        chain_case(
            "float16-gemm", gemm, dtype=np.float16, tags=("gemm", "beta-scalar-C"), seed=300
        ),
        chain_case("float16-matmul_add", matmul_add, rank=3, dtype=np.float16, seed=301),
        chain_case("float16-matmul", matmul, dtype=np.float16, tags=("matmul",), seed=302),
        float16_weights_float32_io_case(),
    ]


def float16_weights_float32_io_case() -> Case:
    """float32 input and output, a float16 Gemm in between (Cast on each side)."""
    builder = GraphBuilder(303, np.float16)
    x16 = builder.node("Cast", ["x"], "x16", "cast_in", to=TensorProto.FLOAT16)
    hidden, l1 = builder.gemm("l1", x16, (IN_FEATURES, HIDDEN), trans_a=1, alpha=0.5)
    activated = builder.node("Relu", [hidden], "l1_act", "act")
    z, l2 = builder.gemm("l2", activated, (HIDDEN, OUT_FEATURES), c_shape=None)
    builder.node("Cast", [z], "y", "cast_out", to=TensorProto.FLOAT)
    model = make_model(
        builder.nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", IN_FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", OUT_FEATURES])],
        builder.initializers,
    )
    x = builder.array((ROWS, IN_FEATURES), np.float32)

    def forward(weights, biases):
        a = x.astype(np.float16).astype(np.float64)
        a = np.maximum(a @ weights[0].T + biases[0], 0.0)
        return {"y": a @ weights[1].T + biases[1]}

    return Case(
        "float16-weights-float32-io", model, {"x": x}, [l1, l2], forward, np.dtype(np.float16)
    )


def shared_bias_add_case() -> Case:
    """l1's Add bias is also read by an Identity whose output is a second graph output."""
    builder = GraphBuilder(400)
    hidden, l1 = builder.matmul_add("l1", "x", (IN_FEATURES, HIDDEN))
    builder.node("Identity", [l1.bias_name], "bias_copy", "bias_reader")
    activated = builder.node("Relu", [hidden], "l1_act", "act")
    y, l2 = builder.matmul_add("l2", activated, (HIDDEN, OUT_FEATURES))
    model = make_model(
        builder.nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", IN_FEATURES])],
        [
            helper.make_tensor_value_info(y, TensorProto.FLOAT, ["rows", OUT_FEATURES]),
            helper.make_tensor_value_info("bias_copy", TensorProto.FLOAT, [HIDDEN]),
        ],
        builder.initializers,
    )
    x = builder.array((ROWS, IN_FEATURES))
    original_bias = l1.bias.copy()

    def forward(weights, biases):
        a = np.maximum(x.astype(np.float64) @ weights[0].T + biases[0], 0.0)
        return {y: a @ weights[1].T + biases[1], "bias_copy": original_bias}

    tags = frozenset({"shared-bias"})
    return Case("shared-bias-add", model, {"x": x}, [l1, l2], forward, np.dtype(np.float32), tags)


def shared_c_gemm_case() -> Case:
    """Two Gemm layers (beta 1 and 2) read the same C: both prunable, each its own bias."""
    builder = GraphBuilder(401)
    hidden, l1 = builder.gemm("l1", "x", (IN_FEATURES, HIDDEN), trans_b=1)
    activated = builder.node("Relu", [hidden], "l1_act", "act")
    w2 = builder.array((HIDDEN, HIDDEN))
    builder.initializer("l2_B", w2)
    y = builder.node("Gemm", [activated, "l2_B", "l1_C"], "l2_z", "l2", beta=2.0)
    c = numpy_helper.to_array(builder.initializers[1]).astype(np.float64)
    l2 = ExpectedLayer(
        "l2",
        "gemm",
        w2.astype(np.float64).T,
        2.0 * c,
        "l2_B",
        "l1_C",
        activated,
        y,
        l1.weight_dtype,
    )
    model = make_model(
        builder.nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", IN_FEATURES])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["rows", HIDDEN])],
        builder.initializers,
    )
    x = builder.array((ROWS, IN_FEATURES))

    def forward(weights, biases):
        a = np.maximum(x.astype(np.float64) @ weights[0].T + biases[0], 0.0)
        return {y: a @ weights[1].T + biases[1]}

    tags = frozenset({"gemm", "shared-bias"})
    return Case("shared-bias-gemm", model, {"x": x}, [l1, l2], forward, np.dtype(np.float32), tags)


def ir3_case() -> Case:
    """IR version 3 (opset 8), where every initializer must also be a graph input: a MatMul
    without bias and a Gemm whose C an Identity reads too, so that a rewrite has to create
    one bias and clone the other (Gemm before opset 11 requires C)."""
    builder = GraphBuilder(600)
    hidden, l1 = builder.matmul("l1", "x", (IN_FEATURES, HIDDEN))
    activated = builder.node("Relu", [hidden], "l1_act", "act")
    y, l2 = builder.gemm("l2", activated, (HIDDEN, OUT_FEATURES), trans_b=1)
    builder.node("Identity", [l2.bias_name], "bias_copy", "bias_reader")
    weights = [
        helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
        for tensor in builder.initializers
    ]
    model = make_model(
        builder.nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", IN_FEATURES]), *weights],
        [
            helper.make_tensor_value_info(y, TensorProto.FLOAT, ["rows", OUT_FEATURES]),
            helper.make_tensor_value_info("bias_copy", TensorProto.FLOAT, [OUT_FEATURES]),
        ],
        builder.initializers,
        opset=8,
        ir_version=3,
    )
    x = builder.array((ROWS, IN_FEATURES))
    original_bias = l2.bias.copy()

    def forward(weights, biases):
        a = np.maximum(x.astype(np.float64) @ weights[0].T + biases[0], 0.0)
        return {y: a @ weights[1].T + biases[1], "bias_copy": original_bias}

    return Case("ir3", model, {"x": x}, [l1, l2], forward, np.dtype(np.float32))


def prunable_cases() -> list[Case]:
    return [
        *gemm_cases(),
        *gemm_edge_cases(),
        *matmul_add_cases(),
        *matmul_cases(),
        *float16_cases(),
        shared_bias_add_case(),
        shared_c_gemm_case(),
    ]


def run_onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All graph outputs of `model` on `feeds`, by name, from onnxruntime on the CPU."""
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float, name: str = "") -> None:
    """Equal to `rtol` of the expected output's scale (elementwise relative error is
    meaningless for outputs near zero)."""
    scale = float(np.abs(expected).max()) if np.size(expected) else 0.0
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64), expected, rtol=rtol, atol=rtol * scale, err_msg=name
    )


def _float_io(shape: list, elem: int = TensorProto.FLOAT, name: str = "x") -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def skip_cases() -> list[SkipCase]:
    """One graph per reason a Gemm/MatMul is not prunable; most also hold a prunable layer."""
    return [
        _shared_weight(),
        _weight_from_identity(),
        _weight_is_graph_input(),
        _int32_weight(),
        _weight_first_operand(),
        _add_bias_not_broadcastable(),
        _gemm_c_not_broadcastable(),
        _weight_of_rank_3(),
    ]


def _skip_model(builder: GraphBuilder, inputs: list, outputs: list) -> onnx.ModelProto:
    return make_model(builder.nodes, inputs, outputs, builder.initializers)


def _shared_weight() -> SkipCase:
    builder = GraphBuilder(500)
    builder.initializer("W", builder.array((IN_FEATURES, IN_FEATURES)))
    builder.node("MatMul", ["x", "W"], "h", "first")
    builder.node("MatMul", ["h", "W"], "y", "second")
    model = _skip_model(
        builder, [_float_io(["rows", IN_FEATURES])], [_float_io(["rows", IN_FEATURES], name="y")]
    )
    return SkipCase("shared-weight", model, {"first": "shared", "second": "shared"}, [])


def _weight_from_identity() -> SkipCase:
    builder = GraphBuilder(501)
    builder.node(
        "Identity", [builder.initializer("W0", builder.array((IN_FEATURES, HIDDEN)))], "W", "copy"
    )
    builder.node("MatMul", ["x", "W"], "h", "computed")
    builder.matmul("ok", "h", (HIDDEN, OUT_FEATURES))
    model = _skip_model(
        builder,
        [_float_io(["rows", IN_FEATURES])],
        [_float_io(["rows", OUT_FEATURES], name="ok_z")],
    )
    return SkipCase("weight-from-identity", model, {"computed": "initializer"}, ["ok"])


def _weight_is_graph_input() -> SkipCase:
    builder = GraphBuilder(502)
    builder.node("Gemm", ["x", "W"], "y", "fed")
    inputs = [_float_io(["rows", IN_FEATURES]), _float_io([IN_FEATURES, HIDDEN], name="W")]
    model = _skip_model(builder, inputs, [_float_io(["rows", HIDDEN], name="y")])
    return SkipCase("weight-graph-input", model, {"fed": "graph input"}, [])


def _int32_weight() -> SkipCase:
    builder = GraphBuilder(503)
    builder.initializer(
        "W", np.arange(IN_FEATURES * HIDDEN, dtype=np.int32).reshape(IN_FEATURES, HIDDEN)
    )
    builder.node("MatMul", ["x", "W"], "y", "integer")
    inputs = [_float_io(["rows", IN_FEATURES], TensorProto.INT32)]
    model = _skip_model(builder, inputs, [_float_io(["rows", HIDDEN], TensorProto.INT32, "y")])
    return SkipCase("int32-weight", model, {"integer": "INT32"}, [])


def _weight_first_operand() -> SkipCase:
    builder = GraphBuilder(504)
    builder.initializer("W", builder.array((HIDDEN, ROWS)))
    builder.node("MatMul", ["W", "x"], "y", "left")
    inputs = [_float_io([ROWS, IN_FEATURES])]
    model = _skip_model(builder, inputs, [_float_io([HIDDEN, IN_FEATURES], name="y")])
    return SkipCase("weight-first-operand", model, {"left": "first operand"}, [])


def _add_bias_not_broadcastable() -> SkipCase:
    builder = GraphBuilder(505)
    builder.initializer("W", builder.array((IN_FEATURES, HIDDEN)))
    builder.node("MatMul", ["x", "W"], "xw", "rowwise")
    builder.node("Add", ["xw", builder.initializer("b", builder.array((ROWS, HIDDEN)))], "h", "add")
    builder.matmul_add("ok", "h", (HIDDEN, OUT_FEATURES))
    inputs = [_float_io([ROWS, IN_FEATURES])]
    model = _skip_model(builder, inputs, [_float_io([ROWS, OUT_FEATURES], name="ok_z")])
    return SkipCase("add-bias-per-row", model, {"rowwise": "broadcast"}, ["ok"])


def _gemm_c_not_broadcastable() -> SkipCase:
    builder = GraphBuilder(506)
    builder.initializer("B", builder.array((IN_FEATURES, HIDDEN)))
    builder.initializer("C", builder.array((ROWS, HIDDEN)))
    builder.node("Gemm", ["x", "B", "C"], "y", "gemm_rows")
    inputs = [_float_io([ROWS, IN_FEATURES])]
    model = _skip_model(builder, inputs, [_float_io([ROWS, HIDDEN], name="y")])
    return SkipCase("gemm-C-per-row", model, {"gemm_rows": "broadcast"}, [])


def _weight_of_rank_3() -> SkipCase:
    builder = GraphBuilder(507)
    builder.initializer("W", builder.array((2, IN_FEATURES, HIDDEN)))
    builder.node("MatMul", ["x", "W"], "y", "batched")
    inputs = [_float_io([2, ROWS, IN_FEATURES])]
    model = _skip_model(builder, inputs, [_float_io([2, ROWS, HIDDEN], name="y")])
    return SkipCase("weight-rank-3", model, {"batched": "rank"}, [])
