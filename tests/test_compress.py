"""compress() on the shipped sample: compensation helps where the linearisation holds."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import numpy_helper

from ecprune_onnx import runtime, stats
from ecprune_onnx.calib import CalibData
from ecprune_onnx.compress import compress, ratio_schedule
from ecprune_onnx.errors import UsageError
from ecprune_onnx.evaluate import evaluate
from ecprune_onnx.layers import find_dense_layers
from ecprune_onnx.modelio import file_uses_external_data

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def _test_mse(tmp_path, method, ratio):
    output = tmp_path / f"{method}-{ratio}.onnx"
    compress(
        SAMPLES / "digits_mlp.onnx", SAMPLES / "calib.npz", ratio, output=output, method=method
    )
    result = evaluate(SAMPLES / "digits_mlp.onnx", output, SAMPLES / "test.npz", labels="y")
    return result.outputs[0].mse


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_ec_beats_magnitude_and_sensitivity_on_the_sample(tmp_path, ratio):
    ec = _test_mse(tmp_path, "ec", ratio)
    assert ec < _test_mse(tmp_path, "magnitude", ratio)
    assert ec < _test_mse(tmp_path, "sensitivity", ratio)


def test_ratio_zero_is_the_identity(tmp_path):
    output = tmp_path / "zero.onnx"
    result = compress(
        SAMPLES / "digits_mlp.onnx", SAMPLES / "calib.npz", 0.0, output=output, method="ec"
    )
    assert result.measured_deviation == 0.0
    assert output.read_bytes() == (SAMPLES / "digits_mlp.onnx").read_bytes()


def test_ratio_zero_with_the_default_reconstruction_changes_no_output(tmp_path):
    # ecr writes its refit weights back even when it removes none: same values, new bytes
    output = tmp_path / "zero.onnx"
    result = compress(SAMPLES / "digits_mlp.onnx", SAMPLES / "calib.npz", 0.0, output=output)
    assert result.method == "ecr"
    assert result.measured_deviation == 0.0


def test_external_data_is_kept(tmp_path):
    model = onnx.load(SAMPLES / "digits_mlp.onnx")
    onnx.save_model(
        model, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.onnx.data"
    )
    output = tmp_path / "ext.pruned.onnx"
    result = compress(tmp_path / "ext.onnx", SAMPLES / "calib.npz", 0.5, output=output)
    assert (tmp_path / "ext.pruned.onnx.data").is_file()
    assert file_uses_external_data(output)
    onnx.checker.check_model(str(output))
    x = np.load(SAMPLES / "test.npz")["x"]
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    reloaded = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(output)).graph.initializer}
    assert (reloaded["fc1.weight"] == 0).mean() == pytest.approx(result.layers[0].sparsity)
    assert session.run(None, {"x": x})[0].shape == (len(x), 10)


def test_float16_model_is_scored_and_written_in_float16(tmp_path):
    model = onnx.load(SAMPLES / "digits_mlp.onnx")
    for tensor in model.graph.initializer:
        half = numpy_helper.to_array(tensor).astype(np.float16)
        tensor.CopyFrom(numpy_helper.from_array(half, tensor.name))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    onnx.save(model, tmp_path / "half.onnx")
    x = np.load(SAMPLES / "calib.npz")["x"].astype(np.float16)
    np.savez(tmp_path / "calib.npz", x=x)
    output = tmp_path / "half.pruned.onnx"
    result = compress(tmp_path / "half.onnx", tmp_path / "calib.npz", 0.5, output=output)
    assert result.sparsity == 0.5
    assert result.measured_deviation > 0
    pruned = onnx.load(output)
    assert {t.data_type for t in pruned.graph.initializer} == {onnx.TensorProto.FLOAT16}


def test_gradient_method_needs_labels_and_uses_them(tmp_path):
    with pytest.raises(UsageError, match="--method gradient needs labels"):
        compress(SAMPLES / "digits_mlp.onnx", SAMPLES / "calib.npz", 0.5, method="gradient")
    assert not (SAMPLES / "digits_mlp.pruned.onnx").exists()
    output = tmp_path / "g.onnx"
    result = compress(
        SAMPLES / "digits_mlp.onnx",
        SAMPLES / "calib.npz",
        0.5,
        labels="y",
        output=output,
        method="gradient",
    )
    assert result.sparsity == 0.5
    assert all(layer.bias_shift_norm == 0 for layer in result.layers)


def test_precomputed_scores_choose_the_mask(tmp_path):
    layers = find_dense_layers(onnx.load(SAMPLES / "digits_mlp.onnx")).layers
    # importances that rank by position: the first half of every layer goes
    scores = {layer.name: np.arange(np.prod(layer.shape)).reshape(layer.shape) for layer in layers}
    output = tmp_path / "s.onnx"
    compress(
        SAMPLES / "digits_mlp.onnx",
        SAMPLES / "calib.npz",
        0.5,
        output=output,
        method="ec",
        scope="layer",
        scores=scores,
        compensate=False,
    )
    pruned = find_dense_layers(onnx.load(output)).layers
    for layer in pruned:
        flat = layer.weight.ravel()
        half = flat.size // 2
        assert np.all(flat[:half] == 0) and np.all(flat[half:] != 0)
    with pytest.raises(UsageError, match="expected \\[128, 64\\]"):
        bad = dict(scores, **{layers[0].name: np.zeros((2, 2))})
        compress(
            SAMPLES / "digits_mlp.onnx",
            SAMPLES / "calib.npz",
            0.5,
            output=tmp_path / "t.onnx",
            method="ec",
            scores=bad,
        )
    with pytest.raises(UsageError, match="scores: .* score method"):
        compress(SAMPLES / "digits_mlp.onnx", SAMPLES / "calib.npz", 0.5, scores=scores)


@pytest.mark.parametrize("ratio,steps", [(0.8, 5), (0.5, 3), (0.3, 1)])
def test_ratio_schedule_reaches_the_exact_ratio(ratio, steps):
    schedule = ratio_schedule(ratio, steps)
    assert len(schedule) == steps
    assert schedule[-1] == ratio
    assert all(a < b for a, b in zip(schedule, schedule[1:]))
    # every round removes the same share of the weights still there
    kept = [1.0] + [1 - r for r in schedule]
    shares = [after / before for before, after in zip(kept, kept[1:])]
    assert shares == pytest.approx([shares[0]] * steps)


def test_steps_reach_the_ratio_and_beat_one_shot_at_high_sparsity(tmp_path):
    def test_mse(steps):
        output = tmp_path / f"steps{steps}.onnx"
        result = compress(
            SAMPLES / "digits_mlp.onnx",
            SAMPLES / "calib.npz",
            0.8,
            output=output,
            method="ec",
            steps=steps,
        )
        removed = sum(layer.removed for layer in result.layers)
        assert removed == round(0.8 * sum(layer.weights for layer in result.layers))
        zeros = sum(
            int((layer.weight == 0).sum()) for layer in find_dense_layers(onnx.load(output)).layers
        )
        assert zeros == removed
        return evaluate(SAMPLES / "digits_mlp.onnx", output, SAMPLES / "test.npz").outputs[0].mse

    # 8.2 against 12.5 (with the layer budgets of predicted damage: 10.2 against 25.6)
    assert test_mse(5) < 0.8 * test_mse(1)


def test_steps_with_a_pattern_are_refused():
    with pytest.raises(UsageError, match="--steps 3"):
        compress(SAMPLES / "digits_mlp.onnx", SAMPLES / "calib.npz", pattern="2:4", steps=3)


def test_batches_shrink_to_the_memory_free(tmp_path, monkeypatch):
    # The sample's layers hold 64+128, 128+128 and 128+10 units, and --probes (16) bounds
    # the probes: a row takes 4 * (2 + 16) * 586 bytes. Half the "free" memory fits 100 rows.
    per_row = 4 * (2 + 16) * (192 + 256 + 138)
    monkeypatch.setattr(stats, "_available_bytes", lambda device: 2 * 100 * per_row)
    sizes = []
    batches = CalibData.batches

    def recording(self, batch_size):
        sizes.append(batch_size)
        return batches(self, batch_size)

    monkeypatch.setattr(CalibData, "batches", recording)
    result = compress(
        SAMPLES / "digits_mlp.onnx", SAMPLES / "calib.npz", 0.5, output=tmp_path / "small.onnx"
    )
    # the device compress chose: cpu here, cuda on a GPU machine
    device = result.device.split(":")[0]
    assert result.notes == [
        f"batches of 100 rows: --batch-size 256 would not fit in the memory free on {device}"
    ]
    assert set(sizes) == {100}
    assert abs(result.sparsity - 0.5) < 1e-3


def test_batches_stay_as_asked_when_memory_is_plentiful_or_unknown(tmp_path, monkeypatch):
    for free in (10**12, None):
        monkeypatch.setattr(stats, "_available_bytes", lambda device, free=free: free)
        output = tmp_path / f"{free}.onnx"
        result = compress(SAMPLES / "digits_mlp.onnx", SAMPLES / "calib.npz", 0.5, output=output)
        assert result.notes == []


@pytest.mark.parametrize("steps", [1, 3])
def test_the_sampled_threshold_writes_the_same_model_as_the_full_copy(
    tmp_path, sampled_threshold, steps
):
    # The sample's 25,856 scores are too few for the sampled bracket by default; a small
    # sample sends compress through it (and, with --steps, through the -inf of earlier rounds)
    def run(name: str) -> dict[str, np.ndarray]:
        out = tmp_path / f"{name}.onnx"
        compress(
            SAMPLES / "digits_mlp.onnx",
            SAMPLES / "calib.npz",
            0.5,
            output=out,
            method="ec",
            steps=steps,
        )
        return {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}

    copied = run("copied")
    sampled_threshold()
    sampled = run("sampled")
    assert copied.keys() == sampled.keys()
    assert all(np.array_equal(copied[name], sampled[name]) for name in copied)


def test_sessions_with_every_initializer_handed_over_as_arrays_write_the_same_model(
    tmp_path, monkeypatch
):
    # the parity check's session gets its initializers beside the bytes (runtime's
    # SHARED_INITIALIZER_BYTES); with every one of them so, compress must not change
    def run(name: str) -> tuple[dict[str, np.ndarray], float]:
        out = tmp_path / f"{name}.onnx"
        result = compress(SAMPLES / "digits_mlp.onnx", SAMPLES / "calib.npz", 0.5, output=out)
        arrays = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
        return arrays, result.parity_deviation

    inline, inline_parity = run("inline")
    monkeypatch.setattr(runtime, "SHARED_INITIALIZER_BYTES", 1)
    shared, shared_parity = run("shared")
    assert inline.keys() == shared.keys()
    assert all(np.array_equal(inline[name], shared[name]) for name in inline)
    assert shared_parity == inline_parity


def test_an_existing_output_is_kept_and_the_api_names_force_true(tmp_path):
    output = tmp_path / "taken.onnx"
    output.write_bytes(b"keep me")
    with pytest.raises(UsageError, match=r"already exists; pass force=True") as refused:
        compress(SAMPLES / "digits_mlp.onnx", SAMPLES / "calib.npz", 0.5, output=output)
    assert "--force" not in str(refused.value)
    assert output.read_bytes() == b"keep me"


def test_measured_layer_budgets_beat_one_threshold_on_the_sample(tmp_path):
    """ec at 80 % on the shipped MLP: the shares chosen on measured damage curves leave a
    lower measured deviation than one threshold on the predicted damage; the report says
    which was used."""
    results = {
        budget: compress(
            SAMPLES / "digits_mlp.onnx",
            SAMPLES / "calib.npz",
            0.8,
            output=tmp_path / f"{budget}.onnx",
            method="ec",
            budget=budget,
        )
        for budget in ("measured", "predicted")
    }
    assert results["measured"].measured_deviation < results["predicted"].measured_deviation
    assert results["measured"].budget == "measured"
    assert results["predicted"].budget == "predicted"
    for result in results.values():
        assert result.sparsity == pytest.approx(0.8, abs=1e-3)


def test_auto_budget_measures_small_models_only(tmp_path, monkeypatch):
    """--budget auto measures the sample (34k weights); above MEASURED_MAX it uses one
    threshold, and the report says which; methods it does not apply to report none."""
    compress_module = importlib.import_module("ecprune_onnx.compress")

    def run(method="ec"):
        output = tmp_path / f"{method}.onnx"
        return compress(
            SAMPLES / "digits_mlp.onnx", SAMPLES / "calib.npz", 0.5, output=output,
            method=method, force=True,
        )  # fmt: skip

    assert run().budget == "measured"
    assert run("magnitude").budget is None
    monkeypatch.setattr(compress_module, "MEASURED_MAX", 1000)
    assert run().budget == "predicted"


def test_a_score_method_never_imports_scipy(tmp_path):
    # scipy's LAPACK serves the reconstructions alone; imported, it is 16 MiB of the peak
    # of every compress, `ec`'s at 100M weights included (BENCHMARKS.md, issue #18).
    code = (
        "import sys; from ecprune_onnx import compress; "
        f"compress({str(SAMPLES / 'digits_mlp.onnx')!r}, {str(SAMPLES / 'calib.npz')!r}, "
        f"output={str(tmp_path / 'out.onnx')!r}, method='ec', ratio=0.5, device='cpu'); "
        "print('scipy' in sys.modules)"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split()[-1] == "False"
