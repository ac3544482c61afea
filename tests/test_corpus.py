"""The corpus of real exports (benchmarks/corpus.py), built small: the files are what the
exporters write, and the data and manifest describe them truthfully.

Builds, in a temporary directory with --quick's 32 rows: BERT through torch's dynamo
exporter (token ids and a padded attention mask), GPT-2 through the TorchScript exporter,
and the committed tf2onnx fixture; then compresses each one as a user would, unmodified.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest

import ecprune_onnx

pytest.importorskip("transformers")  # in the dev extra: CI runs these

from benchmarks import corpus  # noqa: E402

MODELS = ("bert_dynamo", "gpt2_torchscript", "tf2onnx_byte_classifier")
TOKEN_MODELS = MODELS  # each takes input_ids
FIXTURE = corpus.FIXTURES / corpus.TF_FIXTURE


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict[str, corpus.Entry]]:
    out = tmp_path_factory.mktemp("corpus")
    entries = corpus.build(out, list(MODELS), quick=True, tf_python=None)
    return out, {entry.name: entry for entry in entries}


def graph_inputs(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    initialized = {tensor.name for tensor in model.graph.initializer}
    return {v.name: v for v in model.graph.input if v.name not in initialized}


def load(out: Path, entry: corpus.Entry) -> onnx.ModelProto:
    return onnx.load(str(out / entry.file), load_external_data=False)


def arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return {key: npz[key] for key in npz}


def test_manifest_lists_every_model_complete(built):
    out, entries = built
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(item["name"] for item in manifest) == sorted(MODELS)
    for entry in entries.values():
        assert entry.error is None, entry.error
        for name in (entry.file, entry.calib, entry.test, *entry.data_files):
            assert (out / name).is_file(), name
        assert entry.y in entry.outputs
        assert entry.outputs == [value.name for value in load(out, entry).graph.output]
        assert [spec["name"] for spec in entry.inputs] == list(graph_inputs(load(out, entry)))
        on_disk = sum((out / name).stat().st_size for name in (entry.file, *entry.data_files))
        assert entry.size_bytes == on_disk
        assert entry.exporter and entry.task
        assert (entry.labels is not None) == entry.trained


def test_torch_exports_match_torch(built):
    _, entries = built
    for name in ("bert_dynamo", "gpt2_torchscript"):
        assert entries[name].export_max_rel_dev < 1e-4, name


def test_files_run_in_onnxruntime_on_their_test_data(built):
    out, entries = built
    for entry in entries.values():
        session = onnxruntime.InferenceSession(
            str(out / entry.file), providers=["CPUExecutionProvider"]
        )
        test = arrays(out / entry.test)
        feeds = {spec.name: test[spec.name] for spec in session.get_inputs()}
        y = session.run([entry.y], feeds)[0]
        assert y.shape[0] == corpus.QUICK_ROWS
        assert np.isfinite(y).all()


def test_token_inputs_are_int64_ids_within_the_embedding(built):
    out, entries = built
    for name in TOKEN_MODELS:
        model = load(out, entries[name])
        spec = graph_inputs(model)["input_ids"]
        assert spec.type.tensor_type.elem_type == onnx.TensorProto.INT64
        rows = embedding_rows(model)
        for part in (entries[name].calib, entries[name].test):
            ids = arrays(out / part)["input_ids"]
            assert ids.dtype == np.int64
            assert ids.min() >= 0 and ids.max() < rows, (name, part)


def embedding_rows(model: onnx.ModelProto) -> int:
    """Rows of the table a Gather reads input_ids from (the token embedding); the TorchScript
    exporter reshapes the ids first (GPT-2's view(-1, seq))."""
    tables = {tensor.name: tensor.dims for tensor in model.graph.initializer}
    ids = {"input_ids"}
    for node in model.graph.node:
        if node.op_type in ("Reshape", "Cast", "Flatten", "Identity") and node.input[0] in ids:
            ids.update(node.output)
        if node.op_type == "Gather" and node.input[1] in ids and node.input[0] in tables:
            return tables[node.input[0]][0]
    raise AssertionError("no Gather reads input_ids")


def test_calibration_arrays_match_the_graph_inputs(built):
    out, entries = built
    for entry in entries.values():
        specs = graph_inputs(load(out, entry))
        calib, test = arrays(out / entry.calib), arrays(out / entry.test)
        assert set(calib) == set(specs), entry.name
        assert set(test) == set(specs) | ({entry.labels} if entry.labels else set())
        for name, spec in specs.items():
            dtype = onnx.helper.tensor_dtype_to_np_dtype(spec.type.tensor_type.elem_type)
            dims = [d.dim_value or None for d in spec.type.tensor_type.shape.dim]
            for data in (calib[name], test[name]):
                assert data.dtype == dtype, (entry.name, name)
                assert len(data.shape) == len(dims)
                assert all(want in (None, got) for want, got in zip(dims, data.shape))


def test_attention_mask_pads_on_the_right_with_pad_ids(built):
    out, entries = built
    calib = arrays(out / entries["bert_dynamo"].calib)
    mask, ids = calib["attention_mask"], calib["input_ids"]
    assert set(np.unique(mask)) == {0, 1}  # some rows are padded, none is all padding
    assert (np.diff(mask, axis=1) <= 0).all() and (mask[:, 0] == 1).all()
    assert (ids[mask == 0] == 0).all() and (ids[mask == 1] > 0).all()


def test_tf2onnx_fixture_keeps_its_broadcast_biases_and_accuracy(built):
    out, entries = built
    entry = entries["tf2onnx_byte_classifier"]
    assert (FIXTURE / f"{corpus.TF_FIXTURE}.onnx").stat().st_size < 1_000_000
    model = load(out, entry)
    shapes = {tensor.name: list(tensor.dims) for tensor in model.graph.initializer}
    bias_shapes = [
        shapes[name]
        for node in model.graph.node
        if node.op_type == "Add"
        for name in node.input
        if name in shapes
    ]
    assert [1, 1, 64] in bias_shapes and [64] in bias_shapes  # the jax2tf and Keras forms
    test = arrays(out / entry.test)
    session = onnxruntime.InferenceSession(str(out / entry.file))
    logits = session.run(None, {"input_ids": test["input_ids"]})[0]
    assert np.mean(logits.argmax(1) == test[entry.labels]) > 0.7


def test_a_second_build_reuses_the_files(built):
    out, _ = built
    before = {path.name: path.stat().st_mtime_ns for path in out.glob("*.onnx")}
    corpus.build(out, list(MODELS), quick=True, tf_python=None)
    assert {path.name: path.stat().st_mtime_ns for path in out.glob("*.onnx")} == before


@pytest.fixture(scope="module")
def compressed(built, tmp_path_factory):
    """Every model compressed to 0.5 by ecr (the default), ec and magnitude."""
    out, entries = built
    results = {}
    target = tmp_path_factory.mktemp("compressed")
    for name, entry in entries.items():
        for method in ("ecr", "ec", "magnitude"):
            results[name, method] = ecprune_onnx.compress(
                out / entry.file,
                out / entry.calib,
                0.5,
                method=method,
                output=target / f"{name}.{method}.onnx",
                outputs=[entry.y],
            )
    return results


def test_every_model_compresses_and_passes_the_parity_check(built, compressed):
    out, entries = built
    for (name, method), result in compressed.items():
        entry = entries[name]
        assert result.layers, (name, method)
        assert result.parity_deviation <= result.parity_tolerance, (name, method)
        removed = sum(layer.removed for layer in result.layers)
        weights = sum(layer.weights for layer in result.layers)
        assert removed / weights == pytest.approx(0.5, abs=0.01), (name, method)
        session = onnxruntime.InferenceSession(result.output, providers=["CPUExecutionProvider"])
        test = arrays(out / entry.test)
        feeds = {spec.name: test[spec.name] for spec in session.get_inputs()}
        y = session.run([entry.y], feeds)[0]
        assert y.shape[0] == corpus.QUICK_ROWS and np.isfinite(y).all(), (name, method)


def test_ecr_and_ec_deviate_less_than_magnitude(compressed):
    """The output deviation each compress measures on its calibration rows: the criteria that
    read the data beat the one that does not, on every model (before the measured layer
    budgets, ec lost to magnitude on the tf2onnx byte classifier, 89.9 against 41.0)."""
    for name in MODELS:
        magnitude = compressed[name, "magnitude"].measured_deviation
        for method in ("ecr", "ec"):
            assert compressed[name, method].measured_deviation < magnitude, (name, method)
