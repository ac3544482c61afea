"""groups.py: which hidden units can go, with what, and why the others cannot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ecprune_onnx.compress import compress
from ecprune_onnx.groups import find_neuron_groups
from ecprune_onnx.layers import find_dense_layers

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
WIDTH, OUT = 6, 3  # inputs and hidden units share a width so residual Adds fit


def _init(name, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _gemm(name, source, target, rows, cols, rng, **attributes):
    """A Gemm (transB=1) with weight [rows, cols] and bias [rows]."""
    node = helper.make_node(
        "Gemm", [source, f"{name}.w", f"{name}.b"], [target], name=name, transB=1, **attributes
    )
    weights = [
        _init(f"{name}.w", rng.normal(size=(rows, cols))),
        _init(f"{name}.b", rng.normal(size=rows)),
    ]
    return [node], weights


def _model(middle: str, extra_outputs=()) -> onnx.ModelProto:
    """x → fc1 → Relu → <middle> → fc2 → Relu → fc3 → y. `middle` is what stands between
    fc1's units and fc2; fc2's own group is always prunable."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    for part in (
        _gemm("fc1", "x", "h1", WIDTH, WIDTH, rng),
        ([helper.make_node("Relu", ["h1"], ["a1"], name="act1")], []),
    ):
        nodes += part[0]
        inits += part[1]
    mid_nodes, mid_inits, fc2_in, fc2_width = _middle(middle)
    nodes += mid_nodes
    inits += mid_inits
    for part in (
        _gemm("fc2", fc2_in, "h2", WIDTH, fc2_width, rng),
        ([helper.make_node("Relu", ["h2"], ["a2"], name="act2")], []),
        _gemm("fc3", "a2", "y", OUT, WIDTH, rng),
    ):
        nodes += part[0]
        inits += part[1]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", OUT])]
    outputs += [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", WIDTH]) for n in extra_outputs
    ]
    graph = helper.make_graph(
        nodes,
        "groups",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
        outputs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def _middle(case: str):
    """(nodes, initializers, fc2's input, fc2's input width) for each middle section."""
    node = helper.make_node
    if case == "plain":
        return [], [], "a1", WIDTH
    if case == "residual":
        return [node("Add", ["a1", "x"], ["m"], name="residual")], [], "m", WIDTH
    if case == "concat":
        return [node("Concat", ["a1", "x"], ["m"], name="cat", axis=-1)], [], "m", 2 * WIDTH
    if case == "softmax":
        return [node("Softmax", ["a1"], ["m"], name="softmax", axis=-1)], [], "m", WIDTH
    if case == "layernorm":
        params = [_init("ln.scale", np.ones(WIDTH)), _init("ln.bias", np.zeros(WIDTH))]
        ln = node("LayerNormalization", ["a1", "ln.scale", "ln.bias"], ["m"], name="ln", axis=-1)
        return [ln], params, "m", WIDTH
    if case == "reshape":
        shape = numpy_helper.from_array(np.array([-1, WIDTH], dtype=np.int64), "shape")
        return [node("Reshape", ["a1", "shape"], ["m"], name="reshape")], [shape], "m", WIDTH
    if case == "prelu":
        slope = _init("slope", np.linspace(0.1, 0.6, WIDTH))
        return [node("PRelu", ["a1", "slope"], ["m"], name="prelu")], [slope], "m", WIDTH
    if case == "prelu_scalar":
        return (
            [node("PRelu", ["a1", "slope"], ["m"], name="prelu")],
            [_init("slope", [0.2])],
            "m",
            WIDTH,
        )
    if case == "gelu":
        consts = [_init("sqrt2", np.sqrt(2.0)), _init("one", 1.0), _init("half", 0.5)]
        chain = [
            node("Div", ["a1", "sqrt2"], ["g1"], name="div"),
            node("Erf", ["g1"], ["g2"], name="erf"),
            node("Add", ["g2", "one"], ["g3"], name="add"),
            node("Mul", ["a1", "g3"], ["g4"], name="mul"),
            node("Mul", ["g4", "half"], ["m"], name="mul_half"),
        ]
        return chain, consts, "m", WIDTH
    if case == "dropout_mask":
        dropout = node("Dropout", ["a1"], ["m", "mask"], name="dropout")
        cast = node("Cast", ["mask"], ["mask_f"], name="cast", to=TensorProto.FLOAT)
        return [dropout, cast, node("Mul", ["m", "mask_f"], ["m2"], name="gate")], [], "m2", WIDTH
    raise ValueError(case)


def _groups(model):
    scan = find_neuron_groups(model)
    return {g.name: g for g in scan.groups}, {s.layer: s.reason for s in scan.skipped}


def test_sample_has_two_groups_and_the_output_layer_is_skipped():
    groups, skipped = _groups(onnx.load(SAMPLES / "digits_mlp.onnx"))
    assert list(groups) == ["/fc1/Gemm", "/fc2/Gemm"]
    assert groups["/fc1/Gemm"].path_nodes == ("/act1/Tanh",)
    assert [c.name for c in groups["/fc1/Gemm"].consumers] == ["/fc2/Gemm"]
    assert groups["/fc2/Gemm"].units == 128
    assert "graph output 'logits'" in skipped["/fc3/Gemm"]


@pytest.mark.parametrize(
    ("case", "outputs", "words"),
    [
        ("residual", (), "outside the group"),
        ("concat", (), "Concat"),
        ("softmax", (), "Softmax"),
        ("layernorm", (), "LayerNormalization"),
        ("reshape", (), "Reshape"),
        ("plain", ("a1",), "graph output 'a1'"),
        ("dropout_mask", (), "mask output"),
    ],
)
def test_a_path_that_mixes_units_is_not_prunable_and_says_why(case, outputs, words):
    groups, skipped = _groups(_model(case, outputs))
    assert "fc1" not in groups and words in skipped["fc1"]
    assert "fc2" in groups  # the blocker is local: the next group is still found


@pytest.mark.parametrize(
    ("case", "path", "params"),
    [
        ("plain", ("act1",), ()),
        ("prelu", ("act1", "prelu"), ("slope",)),
        ("prelu_scalar", ("act1", "prelu"), ()),
        ("gelu", ("act1", "div", "erf", "add", "mul", "mul_half"), ()),
    ],
)
def test_elementwise_paths_and_per_unit_parameters(case, path, params):
    groups, _ = _groups(_model(case))
    group = groups["fc1"]
    assert set(group.path_nodes) == set(path)
    assert group.per_unit_params == params
    assert [c.name for c in group.consumers] == ["fc2"]
    assert {"h1", "a1"} <= set(group.unit_tensors)


def test_a_per_unit_parameter_shared_outside_the_group_blocks_it():
    model = _model("prelu")
    # fc2's units go through a second PRelu that reads fc1's slope initializer too
    for node in model.graph.node:
        if node.name == "act2":
            node.op_type, node.input[:] = "PRelu", ["h2", "slope"]
    groups, skipped = _groups(model)
    assert "shared outside the group" in skipped["fc1"]
    assert "shared outside the group" in skipped["fc2"]


def test_an_excluded_or_unprunable_consumer_blocks_the_producer():
    model = _model("plain")
    layers = [layer for layer in find_dense_layers(model).layers if layer.name != "fc2"]
    scan = find_neuron_groups(model, layers)
    assert "fc2" in {s.layer: s.reason for s in scan.skipped}["fc1"]
    # a second Gemm reads fc2's weight: layers.py skips fc2, and its reason is passed on
    shared = helper.make_node("Gemm", ["a1", "fc2.w"], ["z"], name="twin", transB=1)
    model.graph.node.append(shared)
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    _, skipped = _groups(model)
    assert "not a prunable layer" in skipped["fc1"] and "shared by 2 nodes" in skipped["fc1"]


def test_matmul_chains_of_rank_three_are_groups():
    rng = np.random.default_rng(1)
    node = helper.make_node
    nodes = [
        node("MatMul", ["x", "w1"], ["p1"], name="mm1"),
        node("Add", ["p1", "b1"], ["h1"], name="add1"),
        node("Tanh", ["h1"], ["a1"], name="tanh"),
        node("MatMul", ["a1", "w2"], ["y"], name="mm2"),
    ]
    inits = [
        _init("w1", rng.normal(size=(WIDTH, 5))),
        _init("b1", rng.normal(size=(1, 1, 5))),
        _init("w2", rng.normal(size=(5, OUT))),
    ]
    graph = helper.make_graph(
        nodes,
        "rank3",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, OUT])],
        inits,
    )
    groups, skipped = _groups(helper.make_model(graph))
    assert set(groups["mm1"].unit_tensors) == {"p1", "h1", "a1"}
    assert [c.name for c in groups["mm1"].consumers] == ["mm2"]
    assert "graph output 'y'" in skipped["mm2"]


@pytest.mark.parametrize("case", ["residual", "concat", "softmax", "layernorm", "plain"])
def test_compress_never_removes_a_unit_that_feeds_a_blocked_path(tmp_path, case):
    model = _model(case, ("a1",) if case == "plain" else ())
    onnx.save(model, tmp_path / "m.onnx")
    out = tmp_path / "m.pruned.onnx"
    result = compress(
        tmp_path / "m.onnx", None, 0.5, output=out, structure="neuron", method="magnitude"
    )
    shapes = {t.name: tuple(t.dims) for t in onnx.load(out).graph.initializer}
    assert shapes["fc1.w"] == (WIDTH, WIDTH) and shapes["fc1.b"] == (WIDTH,)
    assert shapes["fc2.w"][0] < WIDTH  # the prunable group took the whole budget
    assert [g.layer for g in result.skipped_groups] == ["fc1", "fc3"]
    assert {layer.name: layer.units_removed for layer in result.layers}["fc1"] is None


def _swiglu_model(rng) -> tuple[onnx.ModelProto, dict]:
    """Llama's MLP: down(silu(gate(x)) * up(x)), SiLU spelled x * Sigmoid(x) as exporters do."""
    params = {
        "gate": rng.standard_normal((6, 8)), "up": rng.standard_normal((6, 8)),
        "down": rng.standard_normal((8, 4)), "bg": rng.standard_normal(8),
        "bu": rng.standard_normal(8), "bd": rng.standard_normal(4),
    }  # fmt: skip
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in params.items()]
    nodes = [
        helper.make_node("MatMul", ["x", "gate"], ["g0"], name="gate_proj"),
        helper.make_node("Add", ["g0", "bg"], ["g"]),
        helper.make_node("Sigmoid", ["g"], ["gs"]),
        helper.make_node("Mul", ["g", "gs"], ["silu"]),
        helper.make_node("MatMul", ["x", "up"], ["u0"], name="up_proj"),
        helper.make_node("Add", ["u0", "bu"], ["u"]),
        helper.make_node("Mul", ["silu", "u"], ["h"]),
        helper.make_node("MatMul", ["h", "down"], ["d0"], name="down_proj"),
        helper.make_node("Add", ["d0", "bd"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "swiglu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 4])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, params


def test_swiglu_units_go_with_their_gate_and_up_rows():
    import onnxruntime as ort

    from ecprune_onnx.shrink import shrink

    rng = np.random.default_rng(4)
    model, p = _swiglu_model(rng)
    scan = find_neuron_groups(model)
    assert [(g.producer.node, [q.node for q in g.partners]) for g in scan.groups] == [
        ("gate_proj", ["up_proj"])
    ]
    keep = np.array([1, 0, 1, 1, 0, 1, 1, 0], dtype=bool)
    shrunk = shrink(model, scan.groups, {scan.groups[0].name: keep})
    onnx.checker.check_model(shrunk, full_check=True)
    x = rng.standard_normal((5, 6))
    g, u = x @ p["gate"] + p["bg"], x @ p["up"] + p["bu"]
    h = g / (1 + np.exp(-g)) * u
    expected = h[:, keep] @ p["down"][keep] + p["bd"]
    session = ort.InferenceSession(shrunk.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.astype(np.float32)})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert np.abs(h @ p["down"] + p["bd"] - expected).max() > 1e-2
