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
