"""Tests for ecprune_onnx.finetune (and rewrite.replace_parameters, which writes its result).

The sample is pruned once per module (magnitude, ratio 0.7: test accuracy 96.4% against
97.6% unpruned) and finetuned once; the tests read that run. Small graphs from graphs.py
check that every dense pattern binds to the converted torch module and writes back.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from ecprune_onnx import UsageError, compress, finetune, modelio
from ecprune_onnx.cli import app
from ecprune_onnx.layers import find_dense_layers
from ecprune_onnx.rewrite import replace_parameters
from tests import graphs

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
CASES = {case.name: case for case in graphs.prunable_cases()}

# Epochs of the sample run: enough to lower the held-out loss clearly, well under a second
# of training on 2 CPU cores.
SAMPLE_EPOCHS = 10


def cross_entropy(model: str | Path, x: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of the model's logits, from onnxruntime, in float64 numpy."""
    logits = graphs.run_onnxruntime(onnx.load(str(model)), {"x": x})["logits"]
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def dense_weights(model: str | Path | onnx.ModelProto) -> dict[str, np.ndarray]:
    model = onnx.load(str(model)) if not isinstance(model, onnx.ModelProto) else model
    return {layer.name: layer.weight for layer in find_dense_layers(model).layers}


def structure(model: str | Path) -> dict:
    """Everything finetune must leave as it was: nodes, inputs, outputs, initializers' types."""
    graph = onnx.load(str(model)).graph
    return {
        "nodes": [(n.op_type, n.name, list(n.input), list(n.output)) for n in graph.node],
        "inputs": [value.SerializeToString() for value in graph.input],
        "outputs": [value.SerializeToString() for value in graph.output],
        "initializers": [(t.name, t.data_type, list(t.dims)) for t in graph.initializer],
    }


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict:
    """The sample pruned by magnitude at ratio 0.7, and one finetuning run of it."""
    folder = tmp_path_factory.mktemp("finetune")
    for name in ("digits_mlp.onnx", "calib.npz", "test.npz"):
        shutil.copy(SAMPLES / name, folder / name)
    pruned = folder / "pruned.onnx"
    compress(folder / "digits_mlp.onnx", None, 0.7, output=pruned, method="magnitude")
    result = finetune(pruned, folder / "calib.npz", epochs=SAMPLE_EPOCHS, device="cpu")
    return {"folder": folder, "pruned": pruned, "result": result}


# ------------------------------------------------------------------------- the sample


def test_finetune_keeps_every_zero_and_trains_the_other_weights(sample):
    before = dense_weights(sample["pruned"])
    after = dense_weights(sample["result"].output)
    assert list(after) == ["/fc1/Gemm", "/fc2/Gemm", "/fc3/Gemm"]
    for name, weight in before.items():
        assert np.array_equal(weight == 0, after[name] == 0), name
        changed = (after[name] != weight)[weight != 0]
        assert changed.mean() > 0.9, (name, changed.mean())
    zeros = sum(int((weight == 0).sum()) for weight in before.values())
    biases = 128 + 128 + 10
    assert sample["result"].frozen_zeros == zeros
    assert sample["result"].trainable == 25_856 - zeros + biases


def test_finetune_lowers_the_test_loss_of_the_pruned_sample(sample):
    test = np.load(SAMPLES / "test.npz")
    pruned_loss = cross_entropy(sample["pruned"], test["x"], test["y"])
    finetuned_loss = cross_entropy(sample["result"].output, test["x"], test["y"])
    # Measured: 0.132 pruned, 0.096 after 10 epochs (0.087 for the unpruned model).
    assert finetuned_loss < 0.85 * pruned_loss, (pruned_loss, finetuned_loss)


def test_finetune_writes_the_parameters_of_the_best_validation_epoch(sample):
    result = sample["result"]
    assert (result.loss, result.loss_output) == ("cross_entropy", "logits")
    assert (result.train_rows, result.validation_rows) == (461, 51)
    # both lists are indexed by epoch; epoch 0 is the model as given, which was not trained
    assert len(result.train_loss) == len(result.validation_loss) == SAMPLE_EPOCHS + 1
    assert result.train_loss[0] is None
    assert all(loss > 0 for loss in result.train_loss[1:])
    assert result.best_epoch == int(np.argmin(result.validation_loss))
    # The held-out rows: the last 51 of the seeded permutation finetune draws first.
    held_out = torch.randperm(512, generator=torch.Generator().manual_seed(0)).numpy()[-51:]
    calib = np.load(sample["folder"] / "calib.npz")
    x, y = calib["x"][held_out], calib["y"][held_out]
    before = cross_entropy(sample["pruned"], x, y)
    after = cross_entropy(result.output, x, y)
    np.testing.assert_allclose(result.validation_loss[0], before, rtol=1e-4)
    np.testing.assert_allclose(result.validation_loss[result.best_epoch], after, rtol=1e-4)
    assert after < before


def test_finetuned_file_has_the_structure_of_its_input(sample):
    output = Path(sample["result"].output)
    assert output.name == "pruned.finetuned.onnx"
    onnx.checker.check_model(onnx.load(str(output)), full_check=True)
    assert structure(output) == structure(sample["pruned"])


def test_same_seed_gives_a_byte_identical_file(sample, tmp_path):
    runs = []
    for name in ("first.onnx", "second.onnx"):
        result = finetune(
            sample["pruned"],
            sample["folder"] / "calib.npz",
            tmp_path / name,
            epochs=2,
            validation=0,
            seed=7,
            device="cpu",
        )
        runs.append(result)
    assert (tmp_path / "first.onnx").read_bytes() == (tmp_path / "second.onnx").read_bytes()
    assert runs[0].train_loss == runs[1].train_loss
    # Without validation the last epoch is written and no validation loss is reported.
    assert (runs[0].best_epoch, runs[0].validation_loss, runs[0].validation_rows) == (2, [], 0)


# ----------------------------------------------------------- float labels and patterns


def regression_model() -> onnx.ModelProto:
    """x → MatMul + Add → Tanh → + Relu(x) → MatMul alone → y [rows, 1].

    A Relu sits between the first MatMul and its bias Add, so onnx2pytorch folds them into
    one nn.Linear only after finetune moves the Add next to its MatMul.
    """
    rng = np.random.default_rng(3)
    w1 = rng.normal(size=(4, 4)).astype(np.float32)
    w1[w1 < 0.3] = 0  # about 60% zeros: the mask that must hold
    initializers = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(size=(4, 1)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["product"], name="fc1"),
        helper.make_node("Relu", ["x"], ["skip"], name="skip"),
        helper.make_node("Add", ["product", "b1"], ["z1"], name="fc1_bias"),
        helper.make_node("Tanh", ["z1"], ["hidden"], name="act"),
        helper.make_node("Add", ["hidden", "skip"], ["residual"], name="residual"),
        helper.make_node("MatMul", ["residual", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "regression",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 1])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_float_labels_train_with_mse_and_a_lone_matmul_stays_without_bias(tmp_path):
    model = tmp_path / "regression.onnx"
    onnx.save(regression_model(), str(model))
    rng = np.random.default_rng(4)
    x = rng.normal(size=(256, 4)).astype(np.float32)
    targets = np.sin(x.sum(axis=1)).astype(np.float32)  # [rows]: fits y [rows, 1]
    np.savez(tmp_path / "data.npz", x=x, y=targets)

    result = finetune(model, tmp_path / "data.npz", epochs=5, learning_rate=1e-2, device="cpu")

    assert result.loss == "mse"
    assert result.layers == ["fc1", "fc2"]
    assert result.validation_loss[result.best_epoch] < 0.7 * result.validation_loss[0]
    assert structure(result.output) == structure(model)  # fc2 got no bias Add
    before, after = dense_weights(model), dense_weights(result.output)
    assert np.array_equal(before["fc1"] == 0, after["fc1"] == 0)
    assert result.frozen_zeros == int((before["fc1"] == 0).sum())
    assert result.trainable == int((before["fc1"] != 0).sum()) + 4 + 4  # fc1 biases, fc2 weights


def test_a_diverging_run_is_refused_and_writes_nothing(tmp_path):
    model = tmp_path / "regression.onnx"
    onnx.save(regression_model(), str(model))
    x = np.random.default_rng(4).normal(size=(64, 4)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x, y=x[:, :1])
    # Adam moves each weight by about the learning rate per step: 1e30 overflows float32.
    with pytest.raises(UsageError, match="diverged"):
        finetune(model, tmp_path / "data.npz", learning_rate=1e30, validation=0, device="cpu")
    assert not (tmp_path / "regression.finetuned.onnx").exists()


BOUND_CASES = [
    "gemm-tA1-tB0-alpha0.5-beta2-C[1]",
    "gemm-tA0-tB1-alpha1-beta1-C[1,out]",
    "gemm-tA1-tB1-alpha1-beta1-Cnone",
    "gemm-C-empty-name",
    "gemm-beta0",
    "gemm-float64",
    "matmul_add-rank3-bias[1,1,out]-first",
    "matmul_add-rank2-bias[]-second",
    "matmul-rank3-named",
]


@pytest.mark.parametrize("name", BOUND_CASES)
def test_every_dense_pattern_trains_and_keeps_its_zeros(name, tmp_path):
    case = CASES[name]
    model = _with_zeros(case.model)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    reference = graphs.run_onnxruntime(model, case.feeds)
    (output_name,) = reference
    rng = np.random.default_rng(5)
    rows = 32
    x = rng.normal(size=(rows, *case.feeds["x"].shape[1:])).astype(case.dtype)
    targets = rng.normal(size=(rows, *reference[output_name].shape[1:])).astype(case.dtype)
    np.savez(tmp_path / "data.npz", x=x, y=targets)

    result = finetune(path, tmp_path / "data.npz", epochs=1, validation=0, device="cpu")

    assert result.layers == [layer.name for layer in case.layers]
    before, after = dense_weights(model), dense_weights(result.output)
    for layer_name, weight in before.items():
        assert np.array_equal(weight == 0, after[layer_name] == 0), layer_name
        assert np.any(after[layer_name] != weight), layer_name
    finetuned = onnx.load(result.output)
    assert [n.op_type for n in finetuned.graph.node] == [n.op_type for n in model.graph.node]
    names = [(t.name, t.data_type) for t in finetuned.graph.initializer]
    assert names == [(t.name, t.data_type) for t in model.graph.initializer]


def _with_zeros(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every other element of each dense weight set to zero."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    weight_names = {layer.weight_name for layer in find_dense_layers(model).layers}
    for tensor in model.graph.initializer:
        if tensor.name in weight_names:
            array = numpy_helper.to_array(tensor).copy()
            array.reshape(-1)[::2] = 0
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    return model


def test_float16_weights_are_refused(tmp_path):
    case = CASES["float16-gemm"]
    onnx.save(case.model, str(tmp_path / "model.onnx"))
    x = np.zeros((8, graphs.IN_FEATURES), np.float16)
    np.savez(tmp_path / "data.npz", x=x, y=np.zeros((8, graphs.OUT_FEATURES), np.float16))
    with pytest.raises(UsageError, match="float16.*float32 or float64"):
        finetune(tmp_path / "model.onnx", tmp_path / "data.npz", device="cpu")
    assert not (tmp_path / "model.finetuned.onnx").exists()


@pytest.mark.parametrize("case", graphs.prunable_cases(), ids=lambda case: case.name)
def test_replace_parameters_writes_effective_weights_and_biases(case):
    """New effective parameters go back in every stored layout: onnxruntime agrees with numpy."""
    rng = np.random.default_rng(6)
    layers = find_dense_layers(case.model).layers
    weights = {layer.name: rng.normal(size=layer.shape) for layer in layers}
    biases = {layer.name: rng.normal(size=layer.out_features) for layer in layers}
    replaced = replace_parameters(case.model, layers, weights, biases)
    onnx.checker.check_model(replaced)
    # What the file holds is rounded to its dtype: the reference takes the rounded values.
    stored = {
        name: weight.astype(case.dtype).astype(np.float64) for name, weight in weights.items()
    }
    bias = {name: value.astype(case.dtype).astype(np.float64) for name, value in biases.items()}
    expected = case.reference(
        [stored[layer.name] for layer in layers], [bias[layer.name] for layer in layers]
    )
    actual = graphs.run_onnxruntime(replaced, case.feeds)
    for name, values in expected.items():
        graphs.assert_close(actual[name], values, case.rtol, name)


# ----------------------------------------------------------------------------- the CLI


def run_cli(*args: object):
    return CliRunner().invoke(app, [str(arg) for arg in args])


@pytest.fixture
def work(sample, tmp_path) -> Path:
    """A folder with the pruned sample and its calibration data."""
    shutil.copy(sample["pruned"], tmp_path / "pruned.onnx")
    shutil.copy(sample["folder"] / "calib.npz", tmp_path / "calib.npz")
    calib = np.load(tmp_path / "calib.npz")
    np.savez(tmp_path / "wide.npz", x=calib["x"], y=np.zeros((512, 3), np.float32))
    np.savez(tmp_path / "classes.npz", x=calib["x"], y=calib["y"] + 1)  # 1..10 for 10 logits
    (tmp_path / "taken.onnx").write_bytes(b"")
    return tmp_path


BAD_INPUTS = {
    "missing labels key": (["--labels", "target"], "no labels array 'target'"),
    "float labels of the wrong shape": (["--data", "wide.npz"], "expected the shape of output"),
    "labels beyond the classes": (["--data", "classes.npz"], "range from 1 to 10"),
    "no epochs": (["--epochs", "0"], "--epochs 0"),
    "negative learning rate": (["--lr", "-1"], "--lr -1"),
    "everything held out": (["--validation", "1.0"], "--validation 1.0"),
    "output exists": (["-o", "taken.onnx"], "pass --force"),
    "unknown loss output": (["--output", "nosuch"], "--output nosuch"),
}


@pytest.mark.parametrize("options, culprit", BAD_INPUTS.values(), ids=BAD_INPUTS)
def test_cli_rejects_bad_input_in_one_line_and_writes_nothing(work, options, culprit):
    before = sorted(path.name for path in work.iterdir())
    args = ["finetune", work / "pruned.onnx", "--data", work / "calib.npz", "--device", "cpu"]
    options = [
        str(work / value) if value.endswith((".npz", ".onnx")) else value for value in options
    ]
    result = run_cli(*args, *options)
    lines = result.stderr.splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert culprit in lines[0]
    assert sorted(path.name for path in work.iterdir()) == before
    assert (work / "taken.onnx").read_bytes() == b""


def test_cli_prints_the_epochs_and_writes_a_report(work):
    report = work / "report.json"
    result = run_cli(
        "finetune",
        work / "pruned.onnx",
        "--data",
        work / "calib.npz",
        "--epochs",
        2,
        "--device",
        "cpu",
        "--report",
        report,
    )
    assert result.exit_code == 0, result.output
    output = work / "pruned.finetuned.onnx"
    assert result.stdout.strip() == f"wrote {output}"
    for text in ("finetune epoch 2/2", "validation loss", "cross_entropy on logits", "kept epoch"):
        assert text in result.stderr
    assert '"best_epoch"' in report.read_text()
    assert output.is_file()


def test_a_result_past_the_protobuf_limit_is_written_with_external_data(
    tmp_path, monkeypatch, checker_refuses_protos
):
    # The 2 GB case scaled down: the finetuned model is checked and written as a file with
    # its data beside it, never serialised whole.
    model = tmp_path / "digits.onnx"
    shutil.copy(SAMPLES / "digits_mlp.onnx", model)
    assert not modelio.file_uses_external_data(model)
    monkeypatch.setattr(modelio, "PROTOBUF_LIMIT_BYTES", 1000)
    result = finetune(model, SAMPLES / "calib.npz", epochs=1, validation=0, device="cpu")
    assert modelio.file_uses_external_data(result.output)
    assert Path(f"{result.output}.data").is_file()
    checker_refuses_protos(str(result.output))
    assert structure(result.output) == structure(model)
