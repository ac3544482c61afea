"""Tiny transformer exports for the head and FFN tests: a hand-built attention block with a
numpy reference, and transformers' BERT exported by torch (TorchScript and dynamo)."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

EMBED, HEADS, HEAD_DIM = 12, 3, 4


def attention_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """q, k, v, o weights [out, in] and biases of one attention block."""
    rng = np.random.default_rng(seed)
    params = {}
    for name in "qkvo":
        params[f"w{name}"] = rng.standard_normal((EMBED, EMBED)) / np.sqrt(EMBED)
        params[f"b{name}"] = 0.1 * rng.standard_normal(EMBED)
    return params


def numpy_attention(x: np.ndarray, params: dict, heads: list[int]) -> np.ndarray:
    """Multi-head attention [batch, seq, embed] over the heads `heads` only: the output
    projection sums the kept heads' contributions, plus its bias."""
    out = np.broadcast_to(params["bo"], x.shape[:2] + (EMBED,)).copy()
    for h in heads:
        rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
        q, k, v = (x @ params[f"w{n}"][rows].T + params[f"b{n}"][rows] for n in "qkv")
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(HEAD_DIM)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out += (probs @ v) @ params["wo"][:, rows].T
    return out


def attention_model(params: dict, computed_shapes: bool) -> onnx.ModelProto:
    """One attention block as exporters spell it: the head split and merge shapes are
    constants (`computed_shapes=False`), or Concats of Shape/Gather/Unsqueeze pieces with the
    merged width read from the input's shape (torch TorchScript of `x.shape`)."""
    nodes, inits = [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    for n in "qkvo":
        const(f"W{n}", params[f"w{n}"].T.astype(np.float32))
        const(f"B{n}", params[f"b{n}"].astype(np.float32))
    if computed_shapes:
        nodes.append(helper.make_node("Shape", ["x"], ["shape"]))
        for axis in range(3):
            const(f"axis{axis}", np.array(axis, dtype=np.int64))
            nodes.append(helper.make_node("Gather", ["shape", f"axis{axis}"], [f"dim{axis}"]))
            nodes.append(helper.make_node("Unsqueeze", [f"dim{axis}", "zero"], [f"d{axis}"]))
        const("zero", np.array([0], dtype=np.int64))
        const("heads", np.array([HEADS], dtype=np.int64))
        const("head_dim", np.array([HEAD_DIM], dtype=np.int64))
        nodes.append(
            helper.make_node("Concat", ["d0", "d1", "heads", "head_dim"], ["split"], axis=0)
        )
        nodes.append(helper.make_node("Concat", ["d0", "d1", "d2"], ["merge"], axis=0))
    else:
        const("split", np.array([0, 0, HEADS, HEAD_DIM], dtype=np.int64))
        const("merge", np.array([0, 0, HEADS * HEAD_DIM], dtype=np.int64))
    for n in "qkv":
        nodes.append(helper.make_node("MatMul", ["x", f"W{n}"], [f"{n}p"], name=f"{n}_proj"))
        nodes.append(helper.make_node("Add", [f"{n}p", f"B{n}"], [f"{n}b"]))
        nodes.append(helper.make_node("Reshape", [f"{n}b", "split"], [f"{n}s"]))
        perm = [0, 2, 3, 1] if n == "k" else [0, 2, 1, 3]
        nodes.append(helper.make_node("Transpose", [f"{n}s"], [f"{n}t"], perm=perm))
    const("scale", np.array(np.sqrt(HEAD_DIM), dtype=np.float32))
    nodes += [
        helper.make_node("MatMul", ["qt", "kt"], ["scores"]),
        helper.make_node("Div", ["scores", "scale"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "vt"], ["context"]),
        helper.make_node("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["context_t", "merge"], ["merged"]),
        helper.make_node("MatMul", ["merged", "Wo"], ["op"], name="o_proj"),
        helper.make_node("Add", ["op", "Bo"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", EMBED])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", EMBED])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def export_bert(path: Path, exporter: str, seed: int = 0, **config) -> Path:
    """transformers' BertModel (eager attention, random weights) exported with dynamic batch
    and sequence length; its output is the last hidden state."""
    import torch
    import transformers

    settings = dict(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=160, attn_implementation="eager",
    )  # fmt: skip
    settings.update(config)
    torch.manual_seed(seed)
    bert = transformers.BertModel(transformers.BertConfig(**settings)).eval()

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]

    ids = torch.randint(1, settings["vocab_size"], (2, 8))
    example = (ids, torch.ones_like(ids))
    names = dict(input_names=["input_ids", "attention_mask"], output_names=["hidden"])
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", min=2, max=150)
            shapes = ({0: batch, 1: seq}, {0: batch, 1: seq})
            torch.onnx.export(
                Hidden(), example, str(path), dynamo=True, opset_version=18,
                dynamic_shapes=shapes, external_data=False, **names,
            )  # fmt: skip
        else:
            axes = {name: {0: "batch", 1: "seq"} for name in [*names["input_names"], "hidden"]}
            torch.onnx.export(
                Hidden(), example, str(path), dynamo=False, opset_version=17,
                dynamic_axes=axes, **names,
            )  # fmt: skip
    return path


def bert_feeds(batch: int, seq: int, seed: int = 0, vocab: int = 60) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, seq // 2 :] = 0  # one padded row: the mask broadcasts over the heads
    return {"input_ids": ids, "attention_mask": mask}
