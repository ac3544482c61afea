"""Write quantized dense layers into the ONNX file, in forms onnxruntime runs.

- `qdq`: the standard weight-only form. The float weight initializer becomes integer codes,
  a scale and a zero point read by a `DequantizeLinear` whose output keeps the weight's
  name, so the Gemm or MatMul is untouched. Per output channel (int8, opset 13) or blocked
  along the input (int4, the `block_size` attribute and int4 types of opset 21).
- `nbits`: onnxruntime's `com.microsoft.MatMulNBits` (A times a block-quantized B^T, with B
  stored [N, blocks, block_size · bits / 8], codes packed low bits first, scales and zero
  points per (N, block)); the layer's bias goes in an Add after it.

Either way the file computes scale · (q - zero) in float32, the values `Quantized.dequantize`
gives, so the deviation measured on the file is the quantization's own.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ecprune_onnx.errors import UsageError
from ecprune_onnx.layers import DenseLayer
from ecprune_onnx.modelio import copy_with_empty_initializers
from ecprune_onnx.quantize import Quantized, QuantSpec
from ecprune_onnx.rewrite import fresh_name

FORMATS = ("qdq", "nbits")
MS_DOMAIN = "com.microsoft"
# MatMulNBits' largest block (onnxruntime 1.31's CPU kernel takes 16, 32, ..., 256).
NBITS_MAX_BLOCK = 256
# MatMulNBits for both. At int8 the QDQ form does not compute what it says on onnxruntime's
# CPU EP: onnxruntime 1.31 rewrites DequantizeLinear + MatMul into MatMulNBits with
# accuracy_level 4 (activations rounded to int8; session option
# `session.qdq_matmulnbits_accuracy_level`), 70x the output MSE of the int8 weights alone on
# the digits ViT. MatMulNBits without accuracy_level computes in float. At int4 it also
# runs below opset 21, unlike the blocked DequantizeLinear.
DEFAULT_FORMAT = {8: "nbits", 4: "nbits"}
# Measured on the corpus: see BENCHMARKS.md, "Quantization".
DEFAULT_SYMMETRIC = {8: False, 4: False}


def dequantize_opset(bits: int) -> int:
    """The first opset whose DequantizeLinear holds the weight form of `bits`: per axis
    (int8, 13), blocked int4 (21)."""
    return 21 if bits == 4 else 13


def check_format(fmt: str, bits: int, group_size: int | None, opset: int) -> None:
    """Refuse a format the model's opset or onnxruntime's kernel cannot hold."""
    if fmt not in FORMATS:
        raise UsageError(f"--quant-format {fmt}: expected one of {', '.join(FORMATS)}")
    if fmt == "qdq" and bits == 4 and opset < dequantize_opset(4):
        raise UsageError(
            f"--quant-format qdq at int4 needs opset 21 (int4 DequantizeLinear); the model "
            f"imports opset {opset}: use --quant-format nbits"
        )
    if fmt == "qdq" and bits == 8 and opset < dequantize_opset(8):
        raise UsageError(
            f"--quant-format {fmt} needs opset 13 (per-axis DequantizeLinear): {opset}"
        )
    if fmt == "nbits" and group_size is not None and not _nbits_block(group_size):
        raise UsageError(
            f"--block-size {group_size}: MatMulNBits takes a power of two from 16 to "
            f"{NBITS_MAX_BLOCK}, e.g. 32"
        )


def _nbits_block(size: int) -> bool:
    return 16 <= size <= NBITS_MAX_BLOCK and not size & (size - 1)


def model_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def write_quantized(
    model: onnx.ModelProto, layers: list[DenseLayer], quantized: dict[str, Quantized], fmt: str
) -> onnx.ModelProto:
    """A copy of `model` with the weight of every layer in `quantized` stored quantized.

    `layers` are those of `model` itself (weights as the quantization pass wrote them, whose
    biases it holds); the weights are replaced by the codes, never read.
    """
    names = {layer.weight_name for layer in layers if layer.name in quantized}
    copied = copy_with_empty_initializers(model, names)
    kept = [t for t in copied.graph.initializer if t.name not in names]
    del copied.graph.initializer[:]
    copied.graph.initializer.extend(kept)
    # IR < 4 lists initializers as graph inputs too: the replaced weights go from there
    inputs = [value for value in copied.graph.input if value.name not in names]
    del copied.graph.input[:]
    copied.graph.input.extend(inputs)
    taken = {t.name for t in kept} | {o for n in copied.graph.node for o in n.output}
    taken |= {v.name for v in copied.graph.input} | names
    for layer in layers:
        if layer.name in quantized:
            write = _write_nbits if fmt == "nbits" else _write_qdq
            write(copied.graph, layer, quantized[layer.name], taken)
    if fmt == "nbits":
        import_ms_domain(copied)
    return copied


def import_ms_domain(model: onnx.ModelProto) -> None:
    """Import onnxruntime's com.microsoft operators (MatMulNBits, GatherBlockQuantized)."""
    if all(o.domain != MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def layer_spec(spec: QuantSpec, fmt: str, in_features: int) -> QuantSpec:
    """The grid a layer gets: per channel where the format holds a whole row in one block;
    MatMulNBits rows wider than its largest block get blocks of that size (256 inputs share
    a scale: 5 bytes more per 256 weights)."""
    if fmt == "nbits" and spec.group_size is None and in_features > NBITS_MAX_BLOCK:
        return replace(spec, group_size=NBITS_MAX_BLOCK)
    return spec


def _node_of(graph: onnx.GraphProto, output: str) -> onnx.NodeProto:
    return next(node for node in graph.node if output in node.output)


def _add(graph: onnx.GraphProto, name: str, array: np.ndarray) -> None:
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))


def _set_gemm_alpha_one(node: onnx.NodeProto) -> None:
    """The codes hold the effective weight alpha · B: alpha goes, the product stays."""
    for attr in node.attribute:
        if attr.name == "alpha":
            attr.f = 1.0


def _write_qdq(graph: onnx.GraphProto, layer: DenseLayer, q: Quantized, taken: set[str]) -> None:
    """codes, scale, zero point → DequantizeLinear → the weight's own name."""
    # stored [out, in] (Gemm transB=1) or [in, out]: the output channel's axis follows it
    write_dequantize(graph, layer.weight_name, q, taken, 0 if layer.stored_as_out_in else 1)
    if layer.kind == "gemm":
        _set_gemm_alpha_one(_node_of(graph, layer.node_output))


def write_dequantize(
    graph: onnx.GraphProto, name: str, q: Quantized, taken: set[str], out_axis: int
) -> None:
    """Initializers of the codes, scale and zero point of `q` ([out, in], groups along in),
    and a DequantizeLinear that writes the float tensor `name`, stored with its output
    channels along `out_axis` (0: [out, in], 1: [in, out])."""
    spec = q.spec
    codes = q.codes.astype(np.int8 if spec.signed else np.uint8)
    scale, zero = q.scale, q.zero_point
    in_axis = 1 - out_axis
    if out_axis == 1:
        codes, scale, zero = codes.T, scale.T, zero.T
    code_name, scale_name, zero_name = (
        fresh_name(f"{name}_{suffix}", taken) for suffix in ("quantized", "scale", "zero_point")
    )
    attributes = {}
    if spec.group_size is None:  # per output channel: 1-D scale along the output axis
        scale, zero = scale.reshape(-1), zero.reshape(-1)
        attributes["axis"] = out_axis
    else:
        attributes.update(axis=in_axis, block_size=spec.group_size)
    tensor_type = _code_type(spec)
    graph.initializer.append(_int_tensor(code_name, codes, tensor_type))
    _add(graph, scale_name, scale.astype(np.float32))
    graph.initializer.append(_int_tensor(zero_name, zero, tensor_type))
    dq = helper.make_node(
        "DequantizeLinear",
        [code_name, scale_name, zero_name],
        [name],
        name=fresh_name(f"{name}_DequantizeLinear", taken),
        **attributes,
    )
    graph.node.insert(0, dq)  # reads initializers only: first is topologically sound


def _code_type(spec) -> int:
    if spec.bits == 8:
        return onnx.TensorProto.INT8 if spec.signed else onnx.TensorProto.UINT8
    return onnx.TensorProto.UINT4


def _int_tensor(name: str, values: np.ndarray, tensor_type: int) -> onnx.TensorProto:
    """An integer initializer; 4-bit types packed two to a byte, low nibble first (onnx's
    helper packs them when given the unpacked values)."""
    if tensor_type == onnx.TensorProto.UINT4:
        return helper.make_tensor(name, tensor_type, values.shape, values.reshape(-1).tolist())
    dtype = np.int8 if tensor_type == onnx.TensorProto.INT8 else np.uint8
    return numpy_helper.from_array(np.ascontiguousarray(values.astype(dtype)), name)


def _write_nbits(graph: onnx.GraphProto, layer: DenseLayer, q: Quantized, taken: set[str]):
    """The Gemm or MatMul becomes MatMulNBits(a, B, scales, zero_points) (+ Add of the bias)."""
    node = _node_of(graph, layer.node_output)
    spec = q.spec
    out_features, in_features = q.codes.shape
    block = spec.group_size or _per_channel_block(in_features)
    packed, scales, zeros = pack_nbits(q, block)
    base = layer.weight_name
    names = [fresh_name(f"{base}_{s}", taken) for s in ("nbits", "scales", "zero_points")]
    _add(graph, names[0], packed)
    _add(graph, names[1], scales)
    _add(graph, names[2], zeros)
    activation = node.input[0]
    position = list(graph.node).index(node)
    new_nodes = []
    if layer.transpose_input:  # Gemm transA=1: the activation arrives [in, rows]
        transposed = fresh_name(f"{activation}_transposed", taken)
        new_nodes.append(helper.make_node("Transpose", [activation], [transposed], perm=[1, 0]))
        activation = transposed
    product = layer.node_output if layer.kind != "gemm" else fresh_name(f"{base}_product", taken)
    new_nodes.append(
        helper.make_node(
            "MatMulNBits",
            [activation, *names],
            [product],
            name=fresh_name(f"{node.name or base}_MatMulNBits", taken),
            domain=MS_DOMAIN,
            K=in_features,
            N=out_features,
            bits=spec.bits,
            block_size=block,
        )
    )
    if layer.kind == "gemm":  # Y = A B' + C with C the effective bias (beta folded in)
        bias_name = fresh_name(f"{base}_bias", taken)
        _add(graph, bias_name, layer.bias.astype(np.float32))
        new_nodes.append(helper.make_node("Add", [product, bias_name], [layer.node_output]))
    graph.node.remove(node)
    for offset, new in enumerate(new_nodes):
        graph.node.insert(position + offset, new)


def _per_channel_block(in_features: int) -> int:
    """MatMulNBits has no per-channel mode: one block of the next power of two ≥ in holds a
    whole row (the padding codes are zero points, dequantized to 0)."""
    if in_features > NBITS_MAX_BLOCK:  # `layer_spec` gives such layers blocks
        raise ValueError(f"{in_features} inputs: more than one MatMulNBits block holds")
    return max(16, 1 << (in_features - 1).bit_length())


def pack_nbits(q: Quantized, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MatMulNBits' B [N, blocks, block · bits / 8] uint8, scales [N, blocks] float32 and
    zero points [N, ceil(blocks · bits / 8)] uint8, from codes [out, in] in groups of `block`
    (or one group per row). Signed codes (int8 symmetric) move up by 128 with their zero."""
    spec = q.spec
    out_features, in_features = q.codes.shape
    blocks = -(-in_features // block)
    shift = 128 if spec.signed else 0
    zero = q.zero_point + shift
    codes = np.repeat(zero, spec.group_size or in_features, axis=1)[:, : blocks * block]
    codes = np.pad(codes, ((0, 0), (0, blocks * block - codes.shape[1])), mode="edge")
    codes[:, :in_features] = q.codes + shift  # padding columns keep the zero point
    codes = codes.reshape(out_features, blocks, block).astype(np.uint8)
    zero_per_block = zero if spec.group_size else zero.reshape(out_features, 1)
    if spec.bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
        zero_per_block = _pack_pairs(zero_per_block.astype(np.uint8))
    scales = q.scale.astype(np.float32).reshape(out_features, blocks)
    return codes, scales, zero_per_block.astype(np.uint8)


def _pack_pairs(values: np.ndarray) -> np.ndarray:
    """Two 4-bit values per byte along the last axis, low nibble first, padded with 0."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros_like(values[..., :1])], axis=-1)
    return values[..., 0::2] | (values[..., 1::2] << 4)
