"""Attention heads: found in hand-built and exported graphs, removed exactly."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from benchmarks.transformer_structured import bert_feeds, export_bert
from ecprune_onnx.heads import find_head_groups, shrink_heads
from ecprune_onnx.layers import find_dense_layers
from ecprune_onnx.modelio import load_model
from ecprune_onnx.normalize import normalize
from tests import transformers_onnx as tx


def run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("computed_shapes", [False, True])
def test_removing_heads_matches_numpy_attention_without_them(computed_shapes):
    params = tx.attention_weights()
    model = tx.attention_model(params, computed_shapes)
    scan = find_head_groups(model)
    assert [(g.heads, g.head_dim, g.output.node) for g in scan.groups] == [(3, 4, "o_proj")]
    keep = np.array([True, False, True])
    shrunk = shrink_heads(model, scan.groups[0], keep)
    onnx.checker.check_model(shrunk, full_check=True)
    sizes = {layer.node: layer.shape for layer in find_dense_layers(shrunk).layers}
    assert sizes == {"q_proj": (8, 12), "k_proj": (8, 12), "v_proj": (8, 12), "o_proj": (12, 8)}
    rng = np.random.default_rng(1)
    for batch, seq in [(1, 5), (3, 2), (2, 9)]:
        x = rng.standard_normal((batch, seq, tx.EMBED))
        expected = tx.numpy_attention(x, params, heads=[0, 2])
        got = run(shrunk, {"x": x.astype(np.float32)})
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        # and the reference is not the full model's output
        assert np.abs(tx.numpy_attention(x, params, heads=[0, 1, 2]) - expected).max() > 1e-2


@pytest.fixture(scope="module", params=["torchscript", "dynamo"])
def bert(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / f"bert_{request.param}.onnx"
    model = load_model(export_bert(path, request.param))
    normalize(model)  # as compress does: folds the Identity of the biases torch shares
    return model


def _zero_head_columns(model, group, keep) -> onnx.ModelProto:
    """The unshrunk model with the removed heads' output-projection columns zeroed: what
    the attention computes with those heads dropped."""
    from ecprune_onnx.rewrite import rewrite

    mask = np.ones(group.output.shape, dtype=bool)
    mask[:, ~group.columns(keep)] = False
    return rewrite(model, [group.output], {group.output.name: mask}, {})


def test_exported_bert_heads_shrink_and_run_at_every_shape(bert, tmp_path):
    scan = find_head_groups(bert)
    assert len(scan.groups) == 2 and all(g.heads == 4 and g.head_dim == 8 for g in scan.groups)
    shrunk, reference = bert, bert
    keeps = [np.array([True, False, True, False]), np.array([False, True, True, True])]
    for group, keep in zip(scan.groups, keeps):
        shrunk = shrink_heads(shrunk, group, keep)
        reference = _zero_head_columns(reference, group, keep)
    path = tmp_path / "shrunk.onnx"
    onnx.save(shrunk, path)
    onnx.checker.check_model(str(path), full_check=True)
    for batch, seq in [(1, 3), (2, 8), (3, 17)]:
        feeds = bert_feeds(batch, seq)
        np.testing.assert_allclose(run(shrunk, feeds), run(reference, feeds), atol=2e-5)
        assert np.abs(run(bert, feeds) - run(reference, feeds)).max() > 1e-3


def test_inspect_lists_the_heads_and_compress_shrinks_heads_and_ffn_units(bert, tmp_path):
    """One CLI-level pass on the exported BERT: inspect names every head group with its
    projections and every FFN group; compress --structure neuron at 0.5 removes half the
    heads and half the FFN units of each layer (magnitude, uniform) and the file runs."""
    import json

    from typer.testing import CliRunner

    from ecprune_onnx import compress
    from ecprune_onnx.cli import app

    path = tmp_path / "bert.onnx"
    onnx.save(bert, path)
    shown = CliRunner().invoke(app, ["inspect", str(path), "--json"])
    assert shown.exit_code == 0, shown.output
    listing = json.loads(shown.output)
    assert [(g["heads"], g["head_dim"], len(g["projections"])) for g in listing["head_groups"]] == [
        (4, 8, 3)
    ] * 2
    assert [g["units"] for g in listing["neuron_groups"]][:2] == [64, 64]
    result = compress(path, None, 0.5, output=tmp_path / "half.onnx", method="magnitude",
                      scope="layer", structure="neuron", force=True)  # fmt: skip
    removed = {layer.name: layer.units_removed for layer in result.layers if layer.units_removed}
    groups = find_head_groups(bert).groups
    for group in groups:
        for producer in group.producers:
            assert removed[producer.name] == 2 * group.head_dim  # half of 4 heads, 8 units each
    shrunk = onnx.load(tmp_path / "half.onnx")
    onnx.checker.check_model(shrunk, full_check=True)
    assert run(shrunk, bert_feeds(2, 11)).shape == (2, 11, 32)


@pytest.mark.slow  # ~20 s: two compress runs with statistics and measured curves
def test_measured_budget_is_never_worse_on_calibration_than_the_uniform_one(tmp_path):
    """ec with the measured budget tries the uniform allocation too and keeps the shrunk
    model closest to the original on the calibration set, at no fewer parameters removed."""
    path, calib = tmp_path / "bert.onnx", tmp_path / "calib.npz"
    bert = load_model(export_bert(path, "torchscript", hidden_size=16, intermediate_size=32))
    feeds = bert_feeds(16, 8, seed=3)
    np.savez(calib, **feeds)
    from ecprune_onnx import compress

    deviation, parameters = {}, {}
    for scope in ("global", "layer"):
        output = tmp_path / f"{scope}.onnx"
        compress(path, calib, 0.5, output=output, method="ec", scope=scope,
                 structure="neuron", force=True)  # fmt: skip
        shrunk = onnx.load(output)
        deviation[scope] = float(np.square(run(shrunk, feeds) - run(bert, feeds)).sum())
        parameters[scope] = sum(int(np.prod(t.dims)) for t in shrunk.graph.initializer)
    assert deviation["global"] <= deviation["layer"] * (1 + 1e-6)
    assert parameters["global"] <= parameters["layer"] + 8  # a bias entry or two of rounding


def test_a_per_head_operand_inside_attention_is_refused_with_the_reason():
    """An ALiBi-like bias with one value per head ([1, H, 1, 1]) ties the heads to their
    positions: the block is reported, not shrunk."""
    from onnx import helper, numpy_helper

    model = tx.attention_model(tx.attention_weights(), computed_shapes=False)
    bias = np.arange(tx.HEADS, dtype=np.float32).reshape(1, tx.HEADS, 1, 1)
    model.graph.initializer.append(numpy_helper.from_array(bias, "per_head"))
    softmax = next(node for node in model.graph.node if node.op_type == "Softmax")
    softmax.input[0] = "biased"
    position = list(model.graph.node).index(softmax)
    model.graph.node.insert(position, helper.make_node("Add", ["scaled", "per_head"], ["biased"]))
    onnx.checker.check_model(model, full_check=True)
    scan = find_head_groups(model)
    assert scan.groups == []
    assert any("one value per head" in skipped.reason for skipped in scan.skipped)


def test_llama_swiglu_units_and_rotary_heads_shrink_exactly(tmp_path):
    """transformers' Llama (dynamo export): SwiGLU units take their gate and up rows, and
    heads pass through rotary embeddings' Slice/Concat along head_dim."""
    import torch
    import transformers

    from ecprune_onnx.heads import HeadGroup, find_unit_groups
    from ecprune_onnx.shrink import shrink

    config = transformers.LlamaConfig(
        vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    llama = transformers.LlamaModel(config).eval()

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.llama = llama

        def forward(self, input_ids):
            return self.llama(input_ids=input_ids, use_cache=False)[0]

    path = tmp_path / "llama.onnx"
    seq = torch.export.Dim("seq", min=2, max=60)
    torch.onnx.export(
        Hidden(), (torch.randint(1, 60, (2, 8)),), str(path), dynamo=True, opset_version=18,
        dynamic_shapes=({0: torch.export.Dim("batch"), 1: seq},), external_data=False,
        input_names=["input_ids"], output_names=["hidden"],
    )  # fmt: skip
    model = load_model(path)
    normalize(model)
    groups = find_unit_groups(model).groups
    heads = [g for g in groups if isinstance(g, HeadGroup)]
    ffn = [g for g in groups if not isinstance(g, HeadGroup)]
    assert [(g.heads, g.head_dim) for g in heads] == [(4, 8)]
    assert [(g.units, len(g.partners)) for g in ffn] == [(48, 1)]
    keep_heads, keep_units = np.array([False, True, True, False]), np.arange(48) % 3 != 0
    shrunk = shrink(shrink_heads(model, heads[0], keep_heads), ffn, {ffn[0].name: keep_units})
    reference = _zero_head_columns(model, heads[0], keep_heads)
    from ecprune_onnx.rewrite import rewrite

    down = ffn[0].consumers[0]
    mask = np.ones(down.shape, dtype=bool)
    mask[:, ~keep_units] = False
    reference = rewrite(reference, [down], {down.name: mask}, {})
    onnx.checker.check_model(shrunk, full_check=True)
    for batch, length in [(1, 5), (3, 13)]:
        ids = {"input_ids": np.random.default_rng(batch).integers(1, 60, (batch, length))}
        np.testing.assert_allclose(run(shrunk, ids), run(reference, ids), atol=2e-5)
