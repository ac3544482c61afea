"""quantize.py (grids, RTN, GPTQ) and qformat.py (the files onnxruntime runs)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from graphs import Case, assert_close, one_matmul, prunable_cases

from ecprune_onnx import quantize, reconstruct
from ecprune_onnx.errors import UsageError
from ecprune_onnx.layers import find_dense_layers
from ecprune_onnx.qformat import check_format, layer_spec, write_quantized
from ecprune_onnx.quantize import QuantSpec

INT8 = QuantSpec(8, None, symmetric=True)
INT8_ASYM = QuantSpec(8, None, symmetric=False)
INT4 = QuantSpec(4, 16, symmetric=False)
INT4_SYM = QuantSpec(4, 16, symmetric=True)
SPECS = [INT8, INT8_ASYM, INT4, INT4_SYM]


def _correlated_layer(seed=0, rows=32, inputs=96, samples=1500):
    """A weight and the centred covariance of strongly correlated inputs (rank 24 + noise),
    where compensating a column's error through the others pays."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(samples, 24)) @ rng.normal(size=(24, inputs))
    a += 0.05 * rng.normal(size=a.shape) + 1.0
    h, _ = reconstruct.centred_gram(a)
    return rng.normal(size=(rows, inputs)), h


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_full_range_grid_rounds_to_within_half_a_step(spec):
    w, _ = _correlated_layer()
    scale, zero = quantize._grid_for_range(w, spec, 1.0)
    codes = quantize._codes(w, scale, zero, spec)
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax
    error = np.abs(w - (codes - zero[:, None]) * scale[:, None].astype(np.float64))
    assert np.all(error <= scale[:, None] / 2 * (1 + 1e-6))
    if spec.symmetric:  # the grid is the same on both sides of 0
        assert np.all(zero == (0 if spec.signed else 2 ** (spec.bits - 1)))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_zero_stays_exactly_zero_and_codes_stay_in_range(spec):
    w, h = _correlated_layer()
    w[:, ::3] = 0.0
    result = quantize.rtn(w, h, spec)
    assert result.codes.min() >= spec.qmin and result.codes.max() <= spec.qmax
    assert np.all(result.dequantize()[:, ::3] == 0.0)
    groups = spec.groups(w.shape[1])
    assert result.scale.shape == (w.shape[0], groups) == result.zero_point.shape


@pytest.mark.parametrize("spec", [INT8, INT4], ids=str)
def test_gptq_has_a_fraction_of_the_weighted_error_of_rounding(spec):
    w, h = _correlated_layer()
    gptq = quantize.gptq(w, h, spec).dequantize()
    rtn = quantize.rtn(w, h, spec).dequantize()
    gptq_loss = reconstruct.layer_loss(gptq, w, h)
    assert gptq_loss < 0.5 * reconstruct.layer_loss(rtn, w, h)
    # and it is a loss in H, not in the weights: plain weight error is higher than rounding's
    assert np.square(gptq - w).sum() > np.square(rtn - w).sum()


def test_act_order_helps_where_input_scales_differ_and_keeps_the_grids():
    """Inputs of very different variance: quantizing the large ones first leaves the error
    to columns that can absorb it (GPTQ's act-order)."""
    w, h = _correlated_layer(seed=4)
    spread = np.random.default_rng(5).gamma(0.5, size=len(h))
    h = h * np.outer(spread, spread)
    in_order = quantize.gptq(w, h, INT4)
    act_order = quantize.gptq(w, h, INT4, act_order=True)
    assert reconstruct.layer_loss(act_order.dequantize(), w, h) < 0.5 * reconstruct.layer_loss(
        in_order.dequantize(), w, h
    )
    assert act_order.scale.shape == in_order.scale.shape == (len(w), INT4.groups(w.shape[1]))


def test_gptq_holds_removed_weights_at_zero_and_compensates_them():
    w, h = _correlated_layer(seed=1)
    keep = np.random.default_rng(2).random(w.shape) > 0.5
    pruned = quantize.gptq(w, h, INT4, keep=keep).dequantize()
    assert np.all(pruned[~keep] == 0.0)
    # removing half costs more than quantizing alone, less than removing then rounding
    rounded = quantize.rtn(np.where(keep, w, 0.0), h, INT4).dequantize()
    assert reconstruct.layer_loss(pruned, w, h) < reconstruct.layer_loss(rounded, w, h)


def _float32_cases() -> list[Case]:
    return [case for case in prunable_cases() if case.dtype == np.float32]


def _run(model: onnx.ModelProto, feeds, level) -> dict[str, np.ndarray]:
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = level
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


@pytest.mark.parametrize(
    ("spec", "fmt", "opset"),
    [(INT8, "qdq", None), (INT8_ASYM, "qdq", None), (INT4, "qdq", 21), (INT4, "nbits", None)],
    ids=["qdq-int8-sym", "qdq-int8-asym", "qdq-int4-opset21", "nbits-int4"],
)
def test_onnxruntime_computes_the_dequantized_weights(spec, fmt, opset):
    """Every Gemm / MatMul(+Add) spelling: the written file's output is the network with
    scale · (q - zero) as weights. Basic optimizations only: at the extended level
    onnxruntime may fuse DequantizeLinear + MatMul into MatMulNBits computing with int8
    activations (docs/design.md, "Quantized files")."""
    for case in _float32_cases():
        model = case.model
        if opset is not None:
            model = onnx.ModelProto()
            model.CopyFrom(case.model)
            model.opset_import[0].version = opset  # Gemm, MatMul, Add, Relu: unchanged to 21
        layers = find_dense_layers(model).layers
        quantized = {layer.name: quantize.rtn(layer.weight, None, spec) for layer in layers}
        written = write_quantized(model, layers, quantized, fmt)
        onnx.checker.check_model(written)
        assert not {layer.weight_name for layer in layers} & {
            t.name for t in written.graph.initializer
        }
        got = _run(written, case.feeds, onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC)
        expected = case.reference(
            [quantized[layer.name].dequantize() for layer in layers],
            [layer.bias for layer in layers],
        )
        for name, value in expected.items():
            assert_close(got[name], value, 1e-5, f"{case.name} {fmt}")


def test_nbits_packs_codes_low_nibble_first():
    """One row, one block of 16: byte k holds codes 2k (low) and 2k+1 (high)."""
    codes = np.arange(16, dtype=np.int32)[None, :] % 16
    q = quantize.Quantized(codes, np.ones((1, 1), np.float32), np.full((1, 1), 3), INT4)
    from ecprune_onnx.qformat import pack_nbits

    packed, scales, zeros = pack_nbits(q, 16)
    assert packed.shape == (1, 1, 8)
    assert list(packed[0, 0]) == [
        c0 | (c1 << 4) for c0, c1 in zip(range(0, 16, 2), range(1, 16, 2))
    ]
    assert zeros.shape == (1, 1) and zeros[0, 0] == 3
    assert scales.shape == (1, 1)


def test_formats_the_model_cannot_hold_are_refused():
    with pytest.raises(UsageError, match="opset 21"):
        check_format("qdq", 4, 32, 17)
    with pytest.raises(UsageError, match="power of two"):
        check_format("nbits", 4, 24, 17)
    with pytest.raises(UsageError, match="expected one of"):
        check_format("gguf", 4, 32, 17)
    check_format("nbits", 4, 32, 17)


def test_rows_wider_than_a_matmulnbits_block_get_blocks_of_256():
    """A 300-input layer does not fit MatMulNBits' largest block: int8 in blocks of 256,
    and onnxruntime (all optimizations) computes exactly those weights."""
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(300, 8)).astype(np.float32)
    model = one_matmul(weight)
    (layer,) = find_dense_layers(model).layers
    spec = layer_spec(INT8_ASYM, "nbits", layer.in_features)
    assert spec.group_size == 256 and layer_spec(INT8_ASYM, "qdq", 300).group_size is None
    quantized = quantize.rtn(layer.weight, None, spec)
    assert quantized.scale.shape == (8, 2)
    written = write_quantized(model, [layer], {layer.name: quantized}, "nbits")
    x = rng.normal(size=(5, 300)).astype(np.float32)
    got = _run(written, {"x": x}, onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL)["y"]
    assert_close(got, x.astype(np.float64) @ quantized.dequantize().T, 1e-5)


def _refit_case(rows, seed=6, inputs=64):
    """Original inputs a_o and slightly perturbed ones a_p (an upstream layer quantized)."""
    rng = np.random.default_rng(seed)
    a_o = rng.normal(size=(rows, inputs))
    a_p = a_o + 0.01 * rng.normal(size=a_o.shape)
    return a_o - a_o.mean(0), a_p - a_p.mean(0)


def test_anchored_refit_is_the_weight_when_nothing_upstream_changed():
    w, h = _correlated_layer()
    assert np.array_equal(quantize.anchored_refit(w, h, h), w)


def test_anchored_refit_generalises_where_rows_are_fewer_than_inputs():
    """32 calibration rows for 64 inputs: the plain refit W C_op C_pp^-1 fits noise along
    directions the rows never span; pulled towards W it does not. Judged on fresh rows."""
    w = np.random.default_rng(7).normal(size=(16, 64))
    a_o, a_p = _refit_case(32)
    c_pp, c_op = a_p.T @ a_p, a_o.T @ a_p
    plain = np.linalg.solve(reconstruct.dampen(c_pp, 1e-4), (w @ c_op).T).T
    anchored = quantize.anchored_refit(w, c_pp, c_op)
    fresh_o, fresh_p = _refit_case(2000, seed=8)

    def held_out_error(w_new):
        return np.square(fresh_p @ w_new.T - fresh_o @ w.T).mean()

    assert held_out_error(anchored) < 0.01 * held_out_error(plain)
    # the perturbation here is fresh noise that no refit can undo: W itself is the best
    # answer on fresh rows, and the anchored refit stays near it (the plain one: 5000x)
    assert held_out_error(anchored) < 3 * held_out_error(w)
