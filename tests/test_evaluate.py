"""Tests for ecprune_onnx.evaluate: deviations, task metrics, sparsity, gates, report."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ecprune_onnx.errors import UsageError
from ecprune_onnx.evaluate import (
    EvaluateResult,
    LatencyComparison,
    ModelFootprint,
    _comparison,
    dense_flops_per_sample,
    output_deviation,
    predicted_classes,
    top1_agreement,
)
from ecprune_onnx.evaluate import evaluate as evaluate_models

FEATURES, HIDDEN, CLASSES, ROWS = 8, 16, 4, 50
PRUNED_ZEROS = 40  # weights of fc1 zeroed in the pruned copy


def _mlp(weights: dict[str, np.ndarray], logits_name: str = "logits") -> onnx.ModelProto:
    """x [rows, 8] → fc1 (Gemm) → Relu → fc2 (Gemm) → logits [rows, 4]; hidden is exposed too."""
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["z1"], name="fc1", transB=1),
        helper.make_node("Relu", ["z1"], ["hidden"], name="relu"),
        helper.make_node("Gemm", ["hidden", "w2", "b2"], [logits_name], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", FEATURES])],
        [
            helper.make_tensor_value_info(logits_name, TensorProto.FLOAT, ["rows", CLASSES]),
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["rows", HIDDEN]),
        ],
        initializer=[numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    # IR 8 / opset 13 load in every onnxruntime the package supports.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _reference_outputs(weights: dict[str, np.ndarray], x: np.ndarray) -> dict[str, np.ndarray]:
    """The MLP computed in numpy (float64), independent of onnxruntime."""
    w = {name: array.astype(np.float64) for name, array in weights.items()}
    hidden = np.maximum(x.astype(np.float64) @ w["w1"].T + w["b1"], 0.0)
    return {"logits": hidden @ w["w2"].T + w["b2"], "hidden": hidden}


@pytest.fixture
def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w1": rng.normal(size=(HIDDEN, FEATURES)).astype(np.float32),
        "b1": rng.normal(size=HIDDEN).astype(np.float32),
        "w2": rng.normal(size=(CLASSES, HIDDEN)).astype(np.float32),
        "b2": rng.normal(size=CLASSES).astype(np.float32),
    }


@pytest.fixture
def pruned_weights(weights) -> dict[str, np.ndarray]:
    """fc1 with its PRUNED_ZEROS smallest weights zeroed, as a pruner would."""
    w1 = weights["w1"].copy()
    smallest = np.argsort(np.abs(w1), axis=None)[:PRUNED_ZEROS]
    w1.flat[smallest] = 0.0
    return {**weights, "w1": w1}


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(ROWS, FEATURES)).astype(np.float32)


@pytest.fixture
def files(tmp_path, weights, pruned_weights, x):
    """original.onnx, pruned.onnx, identical.onnx and held-out data with both kinds of labels."""
    paths = {name: tmp_path / f"{name}.onnx" for name in ("original", "pruned", "identical")}
    onnx.save(_mlp(weights), paths["original"])
    onnx.save(_mlp(pruned_weights), paths["pruned"])
    onnx.save(_mlp(weights), paths["identical"])
    rng = np.random.default_rng(2)
    paths["data"] = tmp_path / "test.npz"
    np.savez(
        paths["data"],
        x=x,
        y=rng.integers(0, CLASSES, size=ROWS),
        target=rng.normal(size=(ROWS, CLASSES)).astype(np.float32),
    )
    return paths


def _evaluate(files, pruned: str = "pruned", **options) -> EvaluateResult:
    options = {"latency_budget": 0.02, "device": "cpu", **options}
    return evaluate_models(files["original"], files[pruned], files["data"], **options)


def test_deviation_of_every_output_matches_numpy(files, weights, pruned_weights, x):
    result = _evaluate(files, batch_size=16)
    original = _reference_outputs(weights, x)
    pruned = _reference_outputs(pruned_weights, x)
    assert [deviation.name for deviation in result.outputs] == ["logits", "hidden"]
    for deviation in result.outputs:
        difference = pruned[deviation.name] - original[deviation.name]
        assert deviation.mse == pytest.approx(np.mean(difference**2), rel=1e-4)
        assert deviation.max_abs == pytest.approx(np.max(np.abs(difference)), rel=1e-4)
        expected_relative = np.linalg.norm(difference) / np.linalg.norm(original[deviation.name])
        assert deviation.relative == pytest.approx(expected_relative, rel=1e-4)
        assert deviation.mse > 0


def test_top1_agreement_and_accuracy_match_numpy(files, weights, pruned_weights, x):
    result = _evaluate(files, labels="y")
    labels = np.load(files["data"])["y"]
    original_classes = _reference_outputs(weights, x)["logits"].argmax(axis=1)
    pruned_classes = _reference_outputs(pruned_weights, x)["logits"].argmax(axis=1)
    assert result.task_output == "logits"
    assert result.top1_agreement == pytest.approx(np.mean(original_classes == pruned_classes))
    assert result.metric == "accuracy"
    assert result.metric_original == pytest.approx(np.mean(original_classes == labels))
    assert result.metric_pruned == pytest.approx(np.mean(pruned_classes == labels))


def test_float_labels_give_mse_against_targets(files, weights, pruned_weights, x):
    result = _evaluate(files, labels="target")
    targets = np.load(files["data"])["target"].astype(np.float64)
    assert result.metric == "mse"
    original_logits = _reference_outputs(weights, x)["logits"]
    pruned_logits = _reference_outputs(pruned_weights, x)["logits"]
    assert result.metric_original == pytest.approx(np.mean((original_logits - targets) ** 2))
    assert result.metric_pruned == pytest.approx(np.mean((pruned_logits - targets) ** 2))


def test_float_labels_of_another_shape_are_a_usage_error(files):
    with pytest.raises(UsageError, match=r"labels 'target' have shape \(50, 4\).*'hidden'"):
        _evaluate(files, labels="target", output="hidden")


def test_identical_models_have_zero_deviation_and_pass_every_gate(files):
    result = _evaluate(
        files,
        pruned="identical",
        labels="y",
        max_mse=0.0,
        min_accuracy=0.0,
        max_accuracy_drop=0.0,
    )
    for deviation in result.outputs:
        assert (deviation.mse, deviation.max_abs, deviation.relative) == (0.0, 0.0, 0.0)
    assert result.top1_agreement == 1.0
    assert result.metric_original == result.metric_pruned
    assert [gate.name for gate in result.gates] == [
        "max_mse[logits]",
        "max_mse[hidden]",
        "min_accuracy",
        "max_accuracy_drop",
    ]
    assert all(gate.passed for gate in result.gates)
    assert result.passed


def test_max_mse_below_the_real_mse_fails(files):
    measured = {deviation.name: deviation.mse for deviation in _evaluate(files).outputs}
    assert measured["hidden"] < measured["logits"]
    # Between the two: the logits gate fails, the hidden one passes, the result fails.
    threshold = (measured["hidden"] + measured["logits"]) / 2
    gated = _evaluate(files, max_mse=threshold)
    gates = {gate.name: gate for gate in gated.gates}
    assert gates["max_mse[logits]"].value == pytest.approx(measured["logits"])
    assert gates["max_mse[logits]"].threshold == threshold
    assert not gates["max_mse[logits]"].passed
    assert gates["max_mse[hidden]"].passed
    assert not gated.passed


def test_accuracy_gates_compare_pruned_accuracy_and_drop(files):
    measured = _evaluate(files, labels="y")
    drop = measured.metric_original - measured.metric_pruned
    assert drop > 0
    just_missed = _evaluate(
        files,
        labels="y",
        min_accuracy=measured.metric_pruned + 0.01,
        max_accuracy_drop=drop - 0.01,
    )
    gates = {gate.name: gate for gate in just_missed.gates}
    assert gates["min_accuracy"].value == measured.metric_pruned
    assert gates["max_accuracy_drop"].value == pytest.approx(drop)
    assert not gates["min_accuracy"].passed and not gates["max_accuracy_drop"].passed
    just_met = _evaluate(
        files, labels="y", min_accuracy=measured.metric_pruned, max_accuracy_drop=drop + 0.01
    )
    assert just_met.passed


def test_no_gates_pass(files):
    result = _evaluate(files)
    assert result.gates == []
    assert result.passed


@pytest.mark.parametrize("labels", [None, "target"])
@pytest.mark.parametrize("gate", ["min_accuracy", "max_accuracy_drop"])
def test_accuracy_gates_need_integer_labels(files, labels, gate):
    flag = "--" + gate.replace("_", "-")
    with pytest.raises(UsageError, match=f"{flag} needs --labels with integer class labels"):
        _evaluate(files, labels=labels, **{gate: 0.5})


def test_different_output_names_are_a_usage_error(tmp_path, files, weights):
    renamed = tmp_path / "renamed.onnx"
    onnx.save(_mlp(weights, logits_name="scores"), renamed)
    files = {**files, "renamed": renamed}
    with pytest.raises(UsageError, match=r"renamed.onnx: its outputs differ.*'logits'.*'scores'"):
        _evaluate(files, pruned="renamed")


def test_output_option_picks_the_task_output(files):
    result = _evaluate(files, output="hidden")
    assert result.task_output == "hidden"
    with pytest.raises(UsageError, match=r"--output 'probs'.*\['logits', 'hidden'\]"):
        _evaluate(files, output="probs")


def test_sparsity_per_layer_counts_the_zeroed_weights(files):
    layers = {layer.name: layer for layer in _evaluate(files).layers}
    assert set(layers) == {"fc1", "fc2"}
    assert layers["fc1"].shape == (HIDDEN, FEATURES)
    assert layers["fc1"].zeros == PRUNED_ZEROS
    assert layers["fc1"].sparsity == pytest.approx(PRUNED_ZEROS / (HIDDEN * FEATURES))
    assert (layers["fc2"].zeros, layers["fc2"].sparsity) == (0, 0.0)


def test_sizes_latency_and_provider(files):
    result = _evaluate(files, batch_size=16)
    assert result.size_original == files["original"].stat().st_size
    assert result.size_pruned == files["pruned"].stat().st_size
    assert result.latency_batch == 16
    assert [timing.batch for timing in result.latency] == [1, 16]
    for timing in result.latency:
        for latency in (timing.original, timing.pruned):
            assert 0 < latency.q1_ms <= latency.median_ms <= latency.q3_ms
        assert timing.ratio_q1 <= timing.ratio <= timing.ratio_q3
    assert result.provider == "CPUExecutionProvider"
    assert _evaluate(files, batch_size=256).latency_batch == ROWS


def test_progress_reports_rows_of_both_models(files):
    calls = []
    _evaluate(files, batch_size=16, progress=lambda *call: calls.append(call))
    for task in ("evaluate original", "evaluate pruned"):
        rows_done = [done for name, done, total in calls if name == task and total == ROWS]
        assert rows_done == [0, 16, 32, 48, 50]
    # the latency bars count milliseconds of the budget, 0.01 s per batch size here
    assert ("latency, batch 1", 10, 10) in calls
    assert calls[-1] == ("measure latency", 10, 10)


def test_to_dict_is_plain_json(files):
    result = _evaluate(files, labels="y", max_mse=1.0)
    report = result.to_dict()
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    assert report["passed"] == result.passed
    assert report["outputs"][0]["name"] == "logits"
    assert report["layers"][0]["shape"] == [HIDDEN, FEATURES]


def test_output_deviation_of_a_zero_reference():
    zeros = np.zeros((2, 3), dtype=np.float32)
    assert output_deviation("y", zeros, zeros).relative == 0.0
    assert math.isinf(output_deviation("y", zeros, zeros + 1).relative)


def test_output_deviation_of_different_shapes_is_a_usage_error():
    with pytest.raises(UsageError, match="output 'y'"):
        output_deviation("y", np.zeros((2, 3)), np.zeros((2, 4)))


def test_predicted_classes_from_scores_or_class_indices():
    scores = np.array([[0.1, 0.9], [0.8, 0.2]], dtype=np.float32)
    np.testing.assert_array_equal(predicted_classes(scores), [1, 0])
    np.testing.assert_array_equal(predicted_classes(np.array([[1], [0]])), [1, 0])
    assert predicted_classes(np.zeros((2, 1), dtype=np.float32)) is None
    assert top1_agreement(scores, scores[::-1]) == 0.0
    assert top1_agreement(np.zeros(2, dtype=np.float32), np.zeros(2, dtype=np.float32)) is None


def _logits_only_mlp(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The MLP without the `hidden` output, so its hidden width may change."""
    model = _mlp(weights)
    del model.graph.output[1]
    return model


def test_footprint_counts_parameters_and_dense_flops_by_hand(tmp_path, files, weights):
    """Original: 16 hidden units; shrunk: the first 10 of them (fc1's rows, fc2's columns)."""
    kept = 10
    shrunk_weights = {
        "w1": weights["w1"][:kept],
        "b1": weights["b1"][:kept],
        "w2": weights["w2"][:, :kept],
        "b2": weights["b2"],
    }
    paths = {"original": tmp_path / "wide.onnx", "pruned": tmp_path / "narrow.onnx"}
    onnx.save(_logits_only_mlp(weights), paths["original"])
    onnx.save(_logits_only_mlp(shrunk_weights), paths["pruned"])
    result = _evaluate({**paths, "data": files["data"]})
    # w1 16·8 + b1 16 + w2 4·16 + b2 4 = 212; 2 · (8·16 + 16·4) = 384 FLOPs
    assert result.footprint_original.parameters == 212
    assert result.footprint_original.flops_per_sample == 384
    # w1 10·8 + b1 10 + w2 4·10 + b2 4 = 134; 2 · (8·10 + 10·4) = 240 FLOPs
    assert result.footprint_pruned.parameters == 134
    assert result.footprint_pruned.flops_per_sample == 240
    assert result.footprint_original.file_bytes == paths["original"].stat().st_size
    assert result.footprint_pruned.file_bytes == paths["pruned"].stat().st_size
    assert result.footprint_pruned.file_bytes < result.footprint_original.file_bytes


def test_zeroed_weights_keep_parameters_and_flops(files):
    result = _evaluate(files)
    pruned = result.footprint_pruned
    assert pruned == ModelFootprint(
        parameters=result.footprint_original.parameters,
        flops_per_sample=result.footprint_original.flops_per_sample,
        file_bytes=files["pruned"].stat().st_size,
        gzip_bytes=pruned.gzip_bytes,
    )
    # the zeros compress: the pruned file is smaller after gzip than the original
    assert pruned.gzip_bytes < result.footprint_original.gzip_bytes < pruned.file_bytes


def test_latency_at_batch_one_is_in_the_report(files):
    result = _evaluate(files, batch_size=256)
    assert result.latency[0].batch == 1 and result.latency[0].pairs >= 5
    assert result.latency_batch == ROWS
    report = result.to_dict()
    assert report["footprint_original"]["flops_per_sample"] == 2 * (
        FEATURES * HIDDEN + HIDDEN * CLASSES
    )
    assert report["latency"][0]["pruned"]["median_ms"] == result.latency[0].pruned.median_ms
    assert report["latency"][0]["within_noise"] == result.latency[0].within_noise


def test_a_zero_latency_budget_measures_no_latency(files):
    calls = []
    result = _evaluate(files, latency_budget=0, progress=lambda *call: calls.append(call))
    assert result.latency == []
    assert not any(task.startswith(("latency", "measure latency")) for task, *_ in calls)


@pytest.mark.parametrize("budget", [-1.0, float("nan")])
def test_a_negative_latency_budget_is_refused(files, budget):
    with pytest.raises(UsageError, match="--latency-budget"):
        _evaluate(files, latency_budget=budget)


def _comparison_of(original_ms: list[float], pruned_ms: list[float]) -> LatencyComparison:
    return _comparison(1, {"original": original_ms, "pruned": pruned_ms})


def test_the_ratio_is_the_median_of_paired_ratios_and_overlap_is_noise():
    timing = _comparison_of([1.0, 1.0, 2.0, 2.0, 1.0], [2.0, 3.0, 2.0, 4.0, 2.0])
    # pairs: 2, 3, 1, 2, 2 -> median 2, quartiles 2 and 2; medians 1 ms and 2 ms
    assert (timing.ratio, timing.ratio_q1, timing.ratio_q3) == (2.0, 2.0, 2.0)
    assert (timing.original.median_ms, timing.pruned.median_ms) == (1.0, 2.0)
    # original [1, 2] and pruned [2, 3] share 2 ms: within noise
    assert timing.within_noise
    apart = _comparison_of([1.0, 1.1, 1.0, 1.2, 1.0], [2.0, 2.1, 2.0, 2.2, 2.0])
    assert not apart.within_noise


def _sequence_mlp(seq: int | str) -> onnx.ModelProto:
    """x [batch, seq, 8] -> MatMul 8x16 + Add -> Relu -> MatMul 16x4: dense layers that
    run once per position."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(8, 16)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(np.zeros(16, dtype=np.float32), "b1")
    w2 = numpy_helper.from_array(rng.normal(size=(16, 4)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"]),
        helper.make_node("Add", ["m1", "b1"], ["z1"]),
        helper.make_node("Relu", ["z1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", seq, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", seq, 4])],
        [w1, b1, w2],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("seq", [5, "seq"])
def test_flops_count_every_position_of_a_sequence(seq):
    # 2 · (8·16 + 16·4) = 384 per position, 5 positions; a symbolic length is taken from
    # the data's shape
    flops = dense_flops_per_sample(_sequence_mlp(seq), {"x": (5, 8)})
    assert flops == 5 * 384
