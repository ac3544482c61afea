"""A hand-built attention block with a numpy reference, for the head tests (transformers'
BERT exported by torch: benchmarks/transformer_structured.export_bert)."""

from __future__ import annotations

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
