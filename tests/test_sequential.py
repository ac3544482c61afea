"""Layer-sequential reconstruction through compress(): ratios, exactness, and the ranking."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from ecprune_onnx import passes, sequential, taps
from ecprune_onnx.compress import compress
from ecprune_onnx.errors import UsageError
from ecprune_onnx.evaluate import evaluate
from ecprune_onnx.layers import find_dense_layers

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def _linear_model(rng, in_features=12, out_features=5):
    w = rng.normal(size=(out_features, in_features)).astype(np.float32)
    b = rng.normal(size=out_features).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", out_features])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    return model, w.astype(np.float64), b.astype(np.float64)


# Not sparsegpt: once it passes a column the kept weight is frozen, so it can end worse than
# masking alone (tests/test_reconstruct.py has a 3-input case); the exact solvers cannot.
@pytest.mark.parametrize("method", ["obc", "ecr"])
def test_reconstruction_never_does_worse_than_masking_alone(tmp_path, method):
    rng = np.random.default_rng(3)
    model, w, b = _linear_model(rng)
    onnx.save(model, tmp_path / "m.onnx")
    # correlated inputs with a nonzero mean: where refitting the kept weights matters
    mixing = rng.normal(size=(12, 12))
    x = (rng.normal(size=(200, 12)) @ mixing + 2.0).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    compress(
        tmp_path / "m.onnx", tmp_path / "calib.npz", 0.5, output=tmp_path / "p.onnx", method=method
    )
    (layer,) = find_dense_layers(onnx.load(tmp_path / "p.onnx")).layers
    keep = layer.weight != 0
    assert (~keep).sum() == 30
    a = x.astype(np.float64)
    target = a @ w.T + b
    refit_error = np.square(a @ layer.weight.T + layer.bias - target).sum()
    masked = a @ (w * keep).T
    best_bias = (target - masked).mean(axis=0)  # masking alone, with its best bias
    masking_error = np.square(masked + best_bias - target).sum()
    assert refit_error <= masking_error * (1 + 1e-6)
    if method == "ecr":  # refit weights and bias: within dampening of the least squares
        assert refit_error <= 1.05 * _least_squares_error(a, target, keep)


def _least_squares_error(a, target, keep):
    total = 0.0
    for row in range(target.shape[1]):
        design = np.column_stack([a[:, keep[row]], np.ones(len(a))])
        _, residual, *_ = np.linalg.lstsq(design, target[:, row], rcond=None)
        total += float(residual[0]) if len(residual) else 0.0
    return total


@pytest.mark.parametrize("method", ["sparsegpt", "obc", "ecr"])
def test_reconstruction_reaches_the_ratio_and_the_rivals_are_uniform(tmp_path, method):
    output = tmp_path / f"{method}.onnx"
    result = compress(
        SAMPLES / "digits_mlp.onnx", SAMPLES / "calib.npz", 0.7, output=output, method=method
    )
    total = sum(layer.weights for layer in result.layers)
    assert sum(layer.removed for layer in result.layers) == round(0.7 * total)
    zeros = sum(
        int((layer.weight == 0).sum()) for layer in find_dense_layers(onnx.load(output)).layers
    )
    assert zeros == sum(layer.removed for layer in result.layers)
    if method != "ecr":
        assert all(abs(layer.sparsity - 0.7) < 1e-3 for layer in result.layers)


def test_ecr_beats_the_rivals_on_the_sample(tmp_path):
    def test_mse(method):
        output = tmp_path / f"{method}.onnx"
        compress(
            SAMPLES / "digits_mlp.onnx", SAMPLES / "calib.npz", 0.8, output=output, method=method
        )
        return evaluate(SAMPLES / "digits_mlp.onnx", output, SAMPLES / "test.npz").outputs[0].mse

    ecr = test_mse("ecr")
    assert ecr < test_mse("obc")
    assert ecr < test_mse("sparsegpt")
    assert ecr < test_mse("magnitude")


def test_two_four_pattern_holds_for_reconstruction(tmp_path):
    output = tmp_path / "p.onnx"
    compress(
        SAMPLES / "digits_mlp.onnx",
        SAMPLES / "calib.npz",
        pattern="2:4",
        output=output,
        method="ecr",
    )
    for layer in find_dense_layers(onnx.load(output)).layers:
        groups = (layer.weight != 0).reshape(layer.out_features, -1, 4).sum(axis=2)
        assert np.all(groups == 2)


def test_reconstruction_output_runs_in_onnxruntime(tmp_path):
    output = tmp_path / "p.onnx"
    compress(SAMPLES / "digits_mlp.onnx", SAMPLES / "calib.npz", 0.5, output=output, method="ecr")
    onnx.checker.check_model(str(output), full_check=True)
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    x = np.load(SAMPLES / "test.npz")["x"]
    assert np.isfinite(session.run(None, {"x": x})[0]).all()


@pytest.mark.parametrize(
    "options,message",
    [
        ({"steps": 3}, "--steps 3"),
        ({"compensate": False}, "sets the biases itself"),
    ],
)
def test_reconstruction_refuses_options_that_do_not_apply(options, message):
    with pytest.raises(UsageError, match=message):
        compress(SAMPLES / "digits_mlp.onnx", SAMPLES / "calib.npz", 0.5, method="ecr", **options)


def test_runs_of_increments_are_taken_as_a_stable_sort_of_every_weight_would():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 5, size=12).astype(float)  # ties across runs
    lengths = rng.integers(0, 4, size=12)
    every = np.repeat(values, lengths)
    owner = np.repeat(np.arange(12), lengths)
    for total in range(len(every) + 1):
        chosen = np.argsort(every, kind="stable")[:total]
        expected = np.bincount(owner[chosen], minlength=12)
        np.testing.assert_array_equal(sequential._take_smallest(values, lengths, total), expected)


def test_cross_sums_keep_the_covariance_of_inputs_with_a_large_mean():
    """float32 products of uncentred inputs of mean 100 and spread 0.01 lose the covariance
    entirely (~1e2 relative error); centred per batch they keep float32's rounding."""
    rng = np.random.default_rng(1)
    batches = [(100 + 0.01 * rng.normal(size=(64, 6))).astype(np.float32) for _ in range(4)]
    total = passes._CrossSum(6, 6)
    for batch in batches:
        total.add(batch, batch)
    a = np.concatenate(batches).astype(np.float64)
    mean = a.mean(0)
    expected = (a - mean).T @ (a - mean)
    got = total.result() - len(a) * np.outer(mean, mean)
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_cross_sums_over_several_chunks_are_the_float64_sums():
    rng = np.random.default_rng(2)
    pairs = [
        (
            rng.normal(size=(rows, 5)).astype(np.float32),
            rng.normal(size=(rows, 7)).astype(np.float32),
        )
        for rows in (300, 700, 200, 900, 50)  # chunks of 1000, 1100 and 50 rows
    ]
    cross, own = passes._CrossSum(5, 5), passes._CrossSum(5, 5)
    cross.total = np.zeros((5, 7))
    for a, b in pairs:
        cross.add(a, b)
        own.add(a, a)
    a = np.concatenate([a for a, _ in pairs]).astype(np.float64)
    b = np.concatenate([b for _, b in pairs]).astype(np.float64)
    # float32 products of 1000-row chunks: within float32's rounding of |a|^T |b|
    assert np.all(np.abs(cross.result() - a.T @ b) <= 1e-6 * (np.abs(a).T @ np.abs(b)))
    assert np.all(np.abs(own.result() - a.T @ a) <= 1e-6 * (np.abs(a).T @ np.abs(a)))


def test_a_layer_fed_by_a_graph_input_reuses_the_allocations_sums_and_factor(tmp_path, monkeypatch):
    monkeypatch.setattr(sequential, "EXACT_SOLVE_LIMIT", 0)  # SparseGPT: a factor to reuse
    passes = []
    real_inputs, real_allocate = sequential.layer_inputs, sequential.allocate_sparsity

    def counted_inputs(original, current, layer, *args, **kwargs):
        passes.append(layer.name)
        return real_inputs(original, current, layer, *args, **kwargs)

    def written(name):
        output = tmp_path / f"{name}.onnx"
        compress(SAMPLES / "digits_mlp.onnx", SAMPLES / "calib.npz", 0.6, output=output)
        return {t.name: numpy_helper.to_array(t) for t in onnx.load(output).graph.initializer}

    monkeypatch.setattr(sequential, "layer_inputs", counted_inputs)
    reused = written("reused")
    first, *later = [
        layer.name for layer in find_dense_layers(onnx.load(SAMPLES / "digits_mlp.onnx")).layers
    ]
    assert passes.count(first) == 1 and all(passes.count(name) == 2 for name in later)
    # without the reuse: another pass and factorisation, and the very same file
    monkeypatch.setattr(sequential, "allocate_sparsity", lambda *args: real_allocate(*args[:7]))
    fresh = written("fresh")
    assert reused.keys() == fresh.keys()
    for name in reused:
        np.testing.assert_array_equal(reused[name], fresh[name])


def _two_layer_model(rng, first: np.ndarray) -> onnx.ModelProto:
    w2 = rng.normal(size=(6, 8)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1", transB=1),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc2", transB=1),
        ],
        "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 6])],
        [numpy_helper.from_array(first, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_weighted_cross_sums_are_w_c_op_and_a_record_gives_the_same_bits(tmp_path):
    from ecprune_onnx.calib import input_specs, load_calib

    rng = np.random.default_rng(7)
    w1 = rng.normal(size=(8, 5)).astype(np.float32)
    original = _two_layer_model(np.random.default_rng(1), w1)
    pruned = _two_layer_model(np.random.default_rng(1), w1 * (rng.random(w1.shape) > 0.4))
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(300, 5)).astype(np.float32) + 1.0)
    data = load_calib(tmp_path / "c.npz", input_specs(original))
    layer = find_dense_layers(original).layers[1]

    def sums(current, cross, **kwargs):
        return passes.layer_inputs(original, current, layer, data, 64, cross, **kwargs)

    full, weighted = sums(pruned, "full"), sums(pruned, "weighted")
    expected = layer.weight @ full.centred_op
    assert np.allclose(
        weighted.weighted_op, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max()
    )
    assert not weighted.unchanged and weighted.centred_op is None
    np.testing.assert_array_equal(weighted.mean_original, full.mean_original)
    # a record of the original pass serves for the tap: the same sums, bit for bit
    for current, unchanged in (
        (pruned, False),
        (_two_layer_model(np.random.default_rng(1), w1), True),
    ):
        record = taps.OutputRecord(layer)
        passes.layer_inputs(original, original, layer, data, 64, None, record=record)
        tapped, read = sums(current, "weighted"), sums(current, "weighted", recorded=record)
        np.testing.assert_array_equal(read.weighted_op, tapped.weighted_op)
        np.testing.assert_array_equal(read.mean_original, tapped.mean_original)
        assert read.unchanged == tapped.unchanged == unchanged


def test_cross_mode_takes_the_smaller_product():
    rng = np.random.default_rng(0)
    square = find_dense_layers(_linear_model(rng, 64, 64)[0]).layers[0]
    up = find_dense_layers(_linear_model(rng, 16, 64)[0]).layers[0]
    assert passes.cross_mode(square, rows=100) == "weighted"  # W C_op: 2 · 64³ more
    assert passes.cross_mode(square, rows=10_000) == "full"  # rows dominate: in² < 2 in out
    assert passes.cross_mode(up, rows=10_000) == "full"
