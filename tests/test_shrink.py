"""shrink.py: the shrunk ONNX model computes what a numpy network without those units does."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from ecprune_onnx.groups import find_neuron_groups
from ecprune_onnx.shrink import shrink

IN, HIDDEN, OUT = 6, (7, 5), 3  # a chain of three dense layers: 6 → 7 → 5 → 3
ROWS, SEQ = 4, 2


@dataclass
class Chain:
    """A 3-layer chain as ONNX, and its parameters in docs/method.md's effective form."""

    model: onnx.ModelProto
    x: np.ndarray
    weights: list[np.ndarray]  # effective [out, in]
    biases: list[np.ndarray]  # effective [out]
    activations: list[str]
    slopes: list[np.ndarray | None]  # PRelu's per-unit slopes

    def reference(self, keeps: list[np.ndarray]) -> np.ndarray:
        """The network in float64 with the units keeps[l] marks False taken out of layer l."""
        h = self.x.astype(np.float64)
        for index, (w, b) in enumerate(zip(self.weights, self.biases)):
            if index > 0:
                w = w[:, keeps[index - 1]]
            if index < 2:
                w, b = w[keeps[index]], b[keeps[index]]
            h = h @ w.T + b
            if index < 2:
                slope = self.slopes[index]
                h = _activate(
                    h, self.activations[index], None if slope is None else slope[keeps[index]]
                )
        return h


def _activate(h, name, slope):
    if name == "Relu":
        return np.maximum(h, 0)
    if name == "Tanh":
        return np.tanh(h)
    if name == "PRelu":
        return np.where(h >= 0, h, slope * h)
    if name == "Gelu":
        from scipy.special import erf

        return 0.5 * h * (1 + erf(h / np.sqrt(2)))
    raise ValueError(name)


def _f32(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _dense(kind, index, source, target, fan_in, fan_out, rank, rng):
    """Nodes, initializers, effective weight and bias of one dense layer of `kind`."""
    w = rng.normal(size=(fan_out, fan_in)).astype(np.float32)
    b = rng.normal(size=fan_out).astype(np.float32)
    name, node = f"fc{index}", helper.make_node
    if kind == "gemm_t":  # Gemm, B stored [out, in], alpha and beta in play
        gemm = node(
            "Gemm",
            [source, f"{name}.w", f"{name}.b"],
            [target],
            name=name,
            transB=1,
            alpha=0.5,
            beta=2.0,
        )
        return [gemm], [_f32(f"{name}.w", w), _f32(f"{name}.b", b)], 0.5 * w, 2.0 * b
    if kind == "gemm":  # Gemm, B stored [in, out], C of shape [1, out]
        gemm = node("Gemm", [source, f"{name}.w", f"{name}.b"], [target], name=name)
        return [gemm], [_f32(f"{name}.w", w.T), _f32(f"{name}.b", b[None])], w, b
    bias_shape = (1, fan_out) if rank == 2 else (fan_out,)  # both ranks a bias may have
    if kind == "matmul_add":  # the bias first, as some exporters write it
        nodes = [
            node("MatMul", [source, f"{name}.w"], [f"{name}.p"], name=name),
            node("Add", [f"{name}.b", f"{name}.p"], [target], name=f"{name}.add"),
        ]
        return nodes, [_f32(f"{name}.w", w.T), _f32(f"{name}.b", b.reshape(bias_shape))], w, b
    assert kind == "matmul"
    matmul = node("MatMul", [source, f"{name}.w"], [target], name=name)
    return [matmul], [_f32(f"{name}.w", w.T)], w, np.zeros(fan_out)


def _activation(name, index, source, target, units, rng):
    """Nodes and initializers of one activation; the per-unit slope for PRelu."""
    node = helper.make_node
    if name == "PRelu":
        slope = rng.uniform(0.05, 0.5, size=units).astype(np.float32)
        prelu = node("PRelu", [source, f"slope{index}"], [target], name=f"prelu{index}")
        return [prelu], [_f32(f"slope{index}", slope)], slope
    if name == "Gelu":  # the exact GELU as torch exports it: Div, Erf, Add, Mul, Mul
        t = f"gelu{index}"
        nodes = [
            node("Div", [source, "sqrt2"], [f"{t}.1"], name=f"{t}.div"),
            node("Erf", [f"{t}.1"], [f"{t}.2"], name=f"{t}.erf"),
            node("Add", [f"{t}.2", "one"], [f"{t}.3"], name=f"{t}.add"),
            node("Mul", [source, f"{t}.3"], [f"{t}.4"], name=f"{t}.mul"),
            node("Mul", [f"{t}.4", "half"], [target], name=f"{t}.half"),
        ]
        return nodes, [], None
    return [node(name, [source], [target], name=f"act{index}")], [], None


def build_chain(kinds, activations, rank=2, seed=0) -> Chain:
    """x → dense → act → dense → act → dense → y, with static shapes and a value_info for
    every intermediate tensor (so that shrink must update them)."""
    rng = np.random.default_rng(seed)
    lead = [ROWS] if rank == 2 else [ROWS, SEQ]
    widths = [IN, *HIDDEN, OUT]
    nodes, inits, weights, biases, slopes = [], [], [], [], []
    source = "x"
    for index, kind in enumerate(kinds):
        target = "y" if index == 2 else f"h{index}"
        part = _dense(kind, index, source, target, widths[index], widths[index + 1], rank, rng)
        nodes += part[0]
        inits += part[1]
        weights.append(part[2].astype(np.float64))
        biases.append(part[3].astype(np.float64))
        if index < 2:
            act_nodes, act_inits, slope = _activation(
                activations[index], index, target, f"a{index}", widths[index + 1], rng
            )
            nodes += act_nodes
            inits += act_inits
            slopes.append(slope)
            source = f"a{index}"
    if "Gelu" in activations:
        inits += [_f32("sqrt2", np.sqrt(2.0)), _f32("one", 1.0), _f32("half", 0.5)]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*lead, IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*lead, OUT])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    assert len(model.graph.value_info) >= 4
    onnx.checker.check_model(model, full_check=True)
    x = rng.normal(size=(*lead, IN)).astype(np.float32)
    return Chain(model, x, weights, biases, list(activations), slopes)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"x": x})[0]


CASES = [
    (("gemm_t", "gemm_t", "gemm_t"), ("Relu", "Tanh"), 2),
    (("gemm", "gemm_t", "gemm"), ("PRelu", "Relu"), 2),
    (("matmul_add", "matmul_add", "matmul_add"), ("Gelu", "PRelu"), 2),
    (("matmul_add", "matmul", "matmul_add"), ("Tanh", "Gelu"), 3),
    (("matmul", "matmul_add", "matmul"), ("PRelu", "PRelu"), 3),
]


@pytest.mark.parametrize(("kinds", "activations", "rank"), CASES)
def test_shrunk_model_matches_the_numpy_network_without_those_units(kinds, activations, rank):
    chain = build_chain(kinds, activations, rank)
    scan = find_neuron_groups(chain.model)
    assert [g.name for g in scan.groups] == ["fc0", "fc1"]
    rng = np.random.default_rng(1)
    keeps = [rng.random(size) < 0.5 for size in HIDDEN]
    for keep in keeps:
        keep[0] = True  # at least one unit stays
    shrunk = shrink(chain.model, scan.groups, {"fc0": keeps[0], "fc1": keeps[1]})

    onnx.checker.check_model(shrunk, full_check=True)
    onnx.shape_inference.infer_shapes(shrunk, check_type=True, strict_mode=True, data_prop=True)
    np.testing.assert_allclose(_run(shrunk, chain.x), chain.reference(keeps), rtol=1e-4, atol=1e-5)
    assert [i.name for i in shrunk.graph.input] == ["x"]
    assert [o.name for o in shrunk.graph.output] == ["y"]
    assert shrunk.opset_import == chain.model.opset_import
    # the groups of the shrunk model are the kept units
    units = [g.units for g in find_neuron_groups(shrunk).groups]
    assert units == [int(keep.sum()) for keep in keeps]
    assert {t.data_type for t in shrunk.graph.initializer} == {TensorProto.FLOAT}


def test_shrinking_one_group_after_the_other_equals_both_at_once():
    chain = build_chain(("gemm_t", "matmul_add", "gemm"), ("PRelu", "Relu"))
    groups = find_neuron_groups(chain.model).groups
    keep = {"fc0": np.arange(7) % 2 == 0, "fc1": np.arange(5) != 2}
    both = shrink(chain.model, groups, keep)
    stepwise = chain.model
    for group in groups:
        stepwise = shrink(stepwise, [group], {group.name: keep[group.name]})
    assert stepwise.SerializeToString() == both.SerializeToString()


def test_keeping_every_unit_is_the_identity():
    chain = build_chain(("gemm_t", "gemm", "gemm_t"), ("PRelu", "Tanh"))
    groups = find_neuron_groups(chain.model).groups
    keep = {g.name: np.ones(g.units, dtype=bool) for g in groups}
    assert shrink(chain.model, groups, keep).SerializeToString() == chain.model.SerializeToString()


def test_a_bias_shared_with_another_node_is_cloned_before_it_is_cut():
    chain = build_chain(("gemm_t", "gemm_t", "gemm_t"), ("Relu", "Relu"))
    model = chain.model
    # a second reader of fc0's bias, outside the network's path
    model.graph.node.append(helper.make_node("Identity", ["fc0.b"], ["bias_copy"], name="copy"))
    model.graph.output.append(helper.make_tensor_value_info("bias_copy", TensorProto.FLOAT, [7]))
    groups = find_neuron_groups(model).groups
    keep = {"fc0": np.arange(7) < 4}
    shrunk = shrink(model, groups, keep)
    onnx.checker.check_model(shrunk, full_check=True)
    session = onnxruntime.InferenceSession(
        shrunk.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    y, bias_copy = session.run(None, {"x": chain.x})
    np.testing.assert_allclose(bias_copy, chain.biases[0] / 2.0, rtol=1e-6)  # untouched, [7]
    np.testing.assert_allclose(
        y, chain.reference([keep["fc0"], np.ones(5, bool)]), rtol=1e-4, atol=1e-5
    )


def test_removing_every_unit_of_a_group_is_refused():
    chain = build_chain(("gemm_t", "gemm_t", "gemm_t"), ("Relu", "Relu"))
    groups = find_neuron_groups(chain.model).groups
    with pytest.raises(ValueError, match="all 7 units"):
        shrink(chain.model, groups, {"fc0": np.zeros(7, dtype=bool)})
