"""Attention heads: find them in an ONNX graph, and take removed ones out.

A head h of a multi-head attention block is D = head_dim consecutive output units of each of
its query, key and value projections (rows h·D … h·D+D−1 of their weights and biases, after
an offset when one fused QKV projection is Split in three) and the same D input columns of
its output projection. Exporters spell the block as

    proj → [Split] → Reshape [B, S, H, D] → Transpose → … MatMul, Softmax, MatMul …
         → Transpose → Reshape [B, S, H·D] → output projection

(torch's TorchScript and dynamo exporters, transformers' eager and SDPA attention; rotary
embeddings' Slice/Concat along head_dim inside). The
heads are found from the Reshapes that split a projection's units into [H, D]; the ops
between those and the Reshape that merges the heads back must act on every head alike
(matmuls over the heads' own axes, softmax, elementwise ops with operands shared by all
heads). Removing heads shrinks the four projections and rewrites the head count wherever
the graph holds it: an entry of a Reshape's target shape (a constant, or a Concat of
Shape/Gather/Unsqueeze pieces; a computed H·D becomes the constant it always was), and the
sizes of a Split. Entries written −1 follow by themselves, and so do shapes the graph
computes from the tensors, so the shrunk model runs for every batch and sequence length.

Grouped-query attention (fewer K/V heads than Q heads) is reported as not prunable.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ecprune_onnx.groups import GroupScan, SkippedGroup, find_neuron_groups, group_summary
from ecprune_onnx.layers import DenseLayer, find_dense_layers, node_attribute
from ecprune_onnx.rewrite import fresh_name

# Ops that may sit between the head split and the head merge: they act on every head alike
# as long as no operand holds one value per head (checked separately).
CORE_OPS = frozenset(
    {
        "Transpose", "MatMul", "Softmax", "Reshape", "Where", "IsNaN", "Cast", "Dropout",
        "Identity", "Add", "Sub", "Mul", "Div", "Neg", "Sqrt", "Exp", "Max", "Min",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Projection:
    """The units of `layer` that hold one of q, k, v: `offset` … `offset + H·D − 1`."""

    layer: DenseLayer
    offset: int


@dataclass(frozen=True)
class ShapeEdit:
    """Entry `index` of the target shape of the Reshape writing `reshape_output` becomes
    kept_heads · `per_head` (1 for the head count, D for the merged width)."""

    reshape_output: str
    index: int
    per_head: int


@dataclass(frozen=True)
class HeadGroup:
    """The heads of one attention block. `split_edits`: (Split node output, output index)
    whose size becomes kept_heads · D. `tensors`: the block's tensors, whose value_info
    (static shapes with the old head count) is dropped."""

    projections: tuple[Projection, ...]
    output: DenseLayer
    heads: int
    head_dim: int
    shape_edits: tuple[ShapeEdit, ...]
    split_edits: tuple[tuple[str, int], ...]
    tensors: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.output.name

    @property
    def units(self) -> int:
        """Heads are the removable units of the group."""
        return self.heads

    @property
    def consumers(self) -> tuple[DenseLayer, ...]:
        return (self.output,)

    @property
    def producers(self) -> tuple[DenseLayer, ...]:
        return tuple({p.layer.name: p.layer for p in self.projections}.values())

    def rows(self, layer_name: str, keep: np.ndarray) -> np.ndarray:
        """The output units of producer `layer_name` that the kept heads keep (others: all)."""
        layer = next(p.layer for p in self.projections if p.layer.name == layer_name)
        mask = np.ones(layer.out_features, dtype=bool)
        for projection in self.projections:
            if projection.layer.name == layer_name:
                span = slice(projection.offset, projection.offset + self.heads * self.head_dim)
                mask[span] = self.columns(keep)
        return mask

    def columns(self, keep: np.ndarray) -> np.ndarray:
        """The per-head keep mask spread over the D units of each head."""
        return np.repeat(np.asarray(keep, dtype=bool), self.head_dim)


@dataclass(frozen=True)
class SkippedHeads:
    layer: str
    reason: str


@dataclass(frozen=True)
class HeadScan:
    groups: list[HeadGroup]
    skipped: list[SkippedHeads]

    @property
    def covered(self) -> set[str]:
        """Names of the layers that belong to a head group."""
        return {
            layer.name for g in self.groups for layer in (*g.producers, g.output)
        }  # fmt: skip


class _NotPrunable(Exception):
    """Internal: the block's heads cannot be removed; the message is the reason."""


@dataclass
class _Root:
    """One of q, k, v: its projection and the Reshape that splits it into heads."""

    projection: Projection
    reshape: onnx.NodeProto
    heads: int
    head_dim: int
    split: tuple[str, int] | None  # (Split output 0, index) for a fused projection
    head_entry: int | None  # the entry of the target shape holding H (None: written -1)


def find_head_groups(model: onnx.ModelProto, layers: list[DenseLayer] | None = None) -> HeadScan:
    """Every attention block whose heads can be removed, in graph order, and why others
    cannot (by the layer of the block that was looked at)."""
    layers = find_dense_layers(model).layers if layers is None else layers
    graph = _Graph(model.graph, layers)
    # by the tensor the merging Reshape writes: that Reshape, the roots reaching it (q, k, v)
    # and the tensors on their way
    blocks: dict[str, tuple[onnx.NodeProto, list[_Root], set[str]]] = {}
    skipped = []
    for layer in layers:
        try:
            for root in graph.roots(layer):
                merge, core = graph.trace(root)
                _, roots, tensors = blocks.setdefault(merge.output[0], (merge, [], set()))
                roots.append(root)
                tensors |= core
        except _NotPrunable as reason:
            skipped.append(SkippedHeads(layer.name, str(reason)))
    groups = []
    for merge, roots, tensors in blocks.values():
        try:
            groups.append(graph.group(roots, merge, tensors))
        except _NotPrunable as reason:
            skipped.append(SkippedHeads(roots[0].projection.layer.name, str(reason)))
    return HeadScan(groups, skipped)


class _Graph:
    """Look-ups over one graph: producers and readers of each tensor, constants, and the
    dense layers by the tensor they write and the tensor they read."""

    def __init__(self, graph: onnx.GraphProto, layers: list[DenseLayer]):
        self.initializers = {t.name: t for t in graph.initializer}
        self.outputs = {v.name for v in graph.output}
        self.producer = {out: node for node in graph.node for out in node.output if out}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in dict.fromkeys(node.input):
                if name:
                    self.readers.setdefault(name, []).append(node)
        self.by_output = {layer.output_name: layer for layer in layers}
        self.by_node = {layer.node_output: layer for layer in layers}

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant node output; None when computed."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is None or node.op_type != "Constant":
            return None
        value = node_attribute(node, "value", None)
        if value is not None:
            return numpy_helper.to_array(value)
        ints = node_attribute(node, "value_ints", None)
        return None if ints is None else np.array(ints, dtype=np.int64)

    def roots(self, layer: DenseLayer) -> list[_Root]:
        """The head splits of `layer`'s units: one Reshape, or a Split whose every output
        goes to one Reshape; [] when its units feed no Reshape at all."""
        readers = self.readers.get(layer.output_name, [])
        if len(readers) != 1 or readers[0].op_type not in ("Reshape", "Split"):
            return []
        node = readers[0]
        if node.op_type == "Reshape":
            return [self._root(Projection(layer, 0), node, layer.out_features, None)]
        sizes = self._split_sizes(node, layer.out_features)
        roots, offset = [], 0
        for index, (output, size) in enumerate(zip(node.output, sizes)):
            reshapes = self.readers.get(output, [])
            if len(reshapes) != 1 or reshapes[0].op_type != "Reshape":
                raise _NotPrunable(f"Split output '{output}' is not read by one Reshape")
            split = (node.output[0], index)
            roots.append(self._root(Projection(layer, offset), reshapes[0], size, split))
            offset += size
        return roots

    def _split_sizes(self, node: onnx.NodeProto, units: int) -> list[int]:
        """The sizes of a Split along the units (last axis)."""
        axis = node_attribute(node, "axis", 0)
        if axis not in (-1, 2):
            raise _NotPrunable(f"Split '{node.name}' is not along the units (axis {axis})")
        sizes = node_attribute(node, "split", None)
        if len(node.input) > 1 and node.input[1]:
            sizes = self.constant(node.input[1])
            if sizes is None:
                raise _NotPrunable(f"Split '{node.name}' has computed sizes")
        if sizes is None:
            count = len(node.output)
            if units % count:
                raise _NotPrunable(f"Split '{node.name}' does not split {units} units evenly")
            return [units // count] * count
        return [int(size) for size in sizes]

    def _root(self, projection, reshape, width, split) -> _Root:
        """The head count and size that `reshape` splits `width` units into."""
        entries = self.shape_entries(reshape.input[1])
        if entries is None or len(entries) != 4:
            raise _NotPrunable(f"Reshape '{reshape.name}' does not split the units into heads")
        heads, head_dim = entries[-2], entries[-1]
        if heads is None or head_dim is None or (heads == -1 and head_dim == -1):
            raise _NotPrunable(f"Reshape '{reshape.name}': head count or size is computed")
        heads = width // head_dim if heads == -1 else heads
        head_dim = width // heads if head_dim == -1 else head_dim
        if heads * head_dim != width or heads < 2:
            raise _NotPrunable(f"Reshape '{reshape.name}' does not split {width} units into heads")
        head_entry = None if entries[-2] == -1 else 2
        return _Root(projection, reshape, heads, head_dim, split, head_entry)

    def shape_entries(self, name: str) -> list[int | None] | None:
        """The entries of a shape tensor: ints where static, None where computed; None for
        the whole when even its length is unknown."""
        value = self.constant(name)
        if value is not None:
            return [int(v) for v in np.ravel(value)]
        node = self.producer.get(name)
        if node is None or node.op_type != "Concat":
            return None
        entries: list[int | None] = []
        for piece in node.input:
            value = self.constant(piece)
            if value is not None:
                entries.extend(int(v) for v in np.ravel(value))
                continue
            length = self._computed_length(piece)
            if length is None:
                return None
            entries.extend([None] * length)
        return entries

    def _computed_length(self, name: str) -> int | None:
        """The length of a computed 1-D shape piece: Unsqueeze of a scalar, or Shape with
        start and end (torch dynamo)."""
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Unsqueeze":
            return 1
        if node.op_type == "Shape":
            start, end = node_attribute(node, "start", None), node_attribute(node, "end", None)
            if start is not None and end is not None and 0 <= start < end:
                return end - start
        return None

    def trace(self, root: _Root) -> tuple[onnx.NodeProto, set[str]]:
        """Follow the heads from the split to the Reshape that merges them before a dense
        layer; returns that Reshape and the tensors on the way."""
        core, merges = set(), {}
        frontier = [root.reshape.output[0]]
        while frontier:
            tensor = frontier.pop()
            if tensor in self.outputs:
                raise _NotPrunable(f"the heads reach the graph output '{tensor}'")
            core.add(tensor)
            for node in self.readers.get(tensor, []):
                if node.op_type == "Shape" or node.output[0] in core:
                    continue  # a shape computed from the tensors follows by itself
                if self._merges(node, tensor):
                    merges[node.output[0]] = node
                    continue
                self._check_core(node, root.heads)
                frontier.extend(out for out in node.output if out)
        if len(merges) != 1:
            raise _NotPrunable(f"the heads of '{root.reshape.name}' merge {len(merges)} times")
        return next(iter(merges.values())), core

    def _merges(self, node: onnx.NodeProto, tensor: str) -> bool:
        """`node` is a Reshape of the heads whose only reader is a dense layer's input."""
        if node.op_type != "Reshape" or node.input[0] != tensor:
            return False
        readers = self.readers.get(node.output[0], [])
        return len(readers) == 1 and any(
            layer.input_name == node.output[0] and layer.node_output in readers[0].output
            for layer in self.by_node.values()
        )

    def _check_core(self, node: onnx.NodeProto, heads: int) -> None:
        where = f"{node.op_type} node '{node.name}'"
        if self._within_head(node):
            return
        if node.domain not in ("", "ai.onnx") or node.op_type not in CORE_OPS:
            raise _NotPrunable(f"the heads feed {where}, which is not attention's")
        if node.op_type in ("Gemm", "MatMul") and node.output[0] in self.by_node:
            raise _NotPrunable(f"the heads feed the dense layer {where} unmerged")
        if node.op_type == "Reshape" and self.constant(node.input[1]) is not None:
            raise _NotPrunable(f"{where} has a constant shape inside the attention block")
        for name in node.input[1:] if node.op_type == "Reshape" else node.input:
            value = self.constant(name) if name else None
            if value is not None and value.ndim >= 3 and value.shape[-3] == heads:
                raise _NotPrunable(f"{where}: operand '{name}' holds one value per head")

    def _within_head(self, node: onnx.NodeProto) -> bool:
        """A Slice or Concat along the last axis of [B, H, S, D] (head_dim): rotary
        embeddings' rotate_half (transformers' Llama, dynamo). Each head is cut and glued on
        its own."""
        if node.domain not in ("", "ai.onnx"):
            return False
        if node.op_type == "Concat":
            return node_attribute(node, "axis", None) in (-1, 3)
        if node.op_type == "Slice" and len(node.input) > 3 and node.input[3]:
            axes = self.constant(node.input[3])
            return axes is not None and set(np.ravel(axes).tolist()) <= {-1, 3}
        return False

    def group(self, roots: list[_Root], merge: onnx.NodeProto, core: set[str]) -> HeadGroup:
        """The head group of the three roots (q, k, v) that merge at `merge`."""
        if len(roots) != 3:
            raise _NotPrunable(f"{len(roots)} projections reach the head merge, not q, k, v")
        shapes = {(root.heads, root.head_dim) for root in roots}
        if len(shapes) != 1:
            raise _NotPrunable(f"q, k, v have different heads {sorted(shapes)} (grouped-query)")
        heads, head_dim = shapes.pop()
        output = self.by_node[self.readers[merge.output[0]][0].output[0]]
        if output.in_features != heads * head_dim or output.transpose_input:
            raise _NotPrunable(f"output projection '{output.name}' does not read the heads")
        edits = [ShapeEdit(r.reshape.output[0], r.head_entry, 1) for r in roots if r.head_entry]
        merged = self.shape_entries(merge.input[1])
        if merged is None:
            raise _NotPrunable(f"Reshape '{merge.name}' has a target shape of unknown length")
        if merged[-1] != -1:
            edits.append(ShapeEdit(merge.output[0], len(merged) - 1, head_dim))
        tensors = set(core) | {merge.output[0]}
        for root in roots:
            layer = root.projection.layer
            tensors |= {layer.node_output, layer.output_name, root.reshape.input[0]}
        return HeadGroup(
            projections=tuple(root.projection for root in roots),
            output=output,
            heads=heads,
            head_dim=head_dim,
            shape_edits=tuple(edits),
            split_edits=tuple(root.split for root in roots if root.split),
            tensors=tuple(sorted(tensors)),
        )


def head_summary(group: HeadGroup) -> dict:
    """What `inspect` shows of a head group."""
    return {
        "output": group.output.name,
        "heads": int(group.heads),
        "head_dim": int(group.head_dim),
        "projections": [p.layer.name for p in group.projections],
    }


def shrink_heads(model: onnx.ModelProto, group: HeadGroup, keep: np.ndarray) -> onnx.ModelProto:
    """A copy of `model` without the heads `keep` marks False (see the module docstring)."""
    from ecprune_onnx.shrink import cut_layer_columns, cut_layer_rows

    keep = np.asarray(keep, dtype=bool)
    if keep.all():
        return model
    if not keep.any():
        raise ValueError(f"head group '{group.name}': cannot remove all {group.heads} heads")
    model = copy.deepcopy(model)
    kept_heads = int(keep.sum())
    for producer in group.producers:
        cut_layer_rows(model, producer.name, np.flatnonzero(group.rows(producer.name, keep)))
    cut_layer_columns(model, group.output.name, np.flatnonzero(group.columns(keep)))
    editor = _ShapeEditor(model.graph)
    for edit in group.shape_edits:
        editor.set_entry(edit.reshape_output, edit.index, kept_heads * edit.per_head)
    for split_output in dict.fromkeys(output for output, _ in group.split_edits):
        indices = [index for output, index in group.split_edits if output == split_output]
        editor.set_split(split_output, indices, kept_heads * group.head_dim)
    editor.drop_unused(model.graph)
    dropped = set(group.tensors)
    kept_infos = [info for info in model.graph.value_info if info.name not in dropped]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept_infos)
    return model


class _ShapeEditor:
    """Edits target shapes and Split sizes of one (copied) graph; never changes a tensor
    another node reads too: edited shapes are new tensors."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.index = _Graph(graph, [])
        self.replaced: set[str] = set()
        self.names = {t.name for t in graph.initializer} | {
            out for node in graph.node for out in node.output
        }

    def set_entry(self, reshape_output: str, index: int, value: int) -> None:
        reshape = self.index.producer[reshape_output]
        self.replaced.add(reshape.input[1])
        reshape.input[1] = self._edited_shape(reshape.input[1], index, value, reshape)

    def _edited_shape(self, name: str, index: int, value: int, before: onnx.NodeProto) -> str:
        constant = self.index.constant(name)
        if constant is not None:
            edited = np.array(constant, dtype=np.int64).ravel()
            edited[index] = value
            return self._add_constant(f"{name}_heads", edited)
        concat = self.index.producer[name]
        pieces, start = list(concat.input), 0
        for position, piece in enumerate(pieces):
            value_here = self.index.constant(piece)
            length = len(np.ravel(value_here)) if value_here is not None else None
            length = length or self.index._computed_length(piece)
            if start <= index < start + length:
                pieces[position] = self._edited_shape_piece(piece, index - start, value)
                break
            start += length
        output = fresh_name(f"{name}_heads", self.names)
        clone = helper.make_node("Concat", pieces, [output], axis=0, name=output)
        nodes = list(self.graph.node)
        self.graph.node.insert(nodes.index(before), clone)
        return output

    def _edited_shape_piece(self, piece: str, index: int, value: int) -> str:
        """A constant for the piece with entry `index` set (a computed piece of length 1
        held the old head count or width, which is static)."""
        constant = self.index.constant(piece)
        self.replaced.add(piece)
        edited = np.array([0] if constant is None else constant, dtype=np.int64).ravel()
        edited[index] = value
        return self._add_constant(f"{piece}_heads", edited)

    def set_split(self, split_output: str, indices: list[int], size: int) -> None:
        split = self.index.producer[split_output]
        if len(split.input) > 1 and split.input[1]:
            sizes = np.array(self.index.constant(split.input[1]), dtype=np.int64).ravel()
            sizes[indices] = size
            self.replaced.add(split.input[1])
            split.input[1] = self._add_constant(f"{split.input[1]}_heads", sizes)
        elif node_attribute(split, "split", None) is not None:
            attribute = next(a for a in split.attribute if a.name == "split")
            for index in indices:
                attribute.ints[index] = size
        # num_outputs or no sizes: equal parts, which the kept heads keep equal

    def drop_unused(self, graph: onnx.GraphProto) -> None:
        """Remove the replaced shape constants that nothing reads any more."""
        read = {name for node in graph.node for name in node.input}
        read |= {value.name for value in graph.output}
        unused = self.replaced - read
        kept = [tensor for tensor in graph.initializer if tensor.name not in unused]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        nodes = [n for n in graph.node if n.op_type != "Constant" or n.output[0] not in unused]
        del graph.node[:]
        graph.node.extend(nodes)

    def _add_constant(self, base: str, value: np.ndarray) -> str:
        name = fresh_name(base, self.names)
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        self.index.initializers[name] = self.graph.initializer[-1]
        return name


def find_unit_groups(model: onnx.ModelProto, layers: list[DenseLayer] | None = None) -> GroupScan:
    """What `--structure neuron` removes: the neuron groups of groups.py and the attention
    heads, in graph order. A layer in neither says why: the head scan's reason where it
    looked at the layer (its units feed a head split), else the neuron scan's."""
    layers = find_dense_layers(model).layers if layers is None else layers
    neurons, heads = find_neuron_groups(model, layers), find_head_groups(model, layers)
    covered = heads.covered | {g.name for g in neurons.groups}
    head_reasons = {s.layer: s.reason for s in heads.skipped}
    skipped = [
        SkippedGroup(s.layer, head_reasons.get(s.layer, s.reason))
        for s in neurons.skipped
        if s.layer not in covered
    ]
    order = {layer.name: index for index, layer in enumerate(layers)}
    groups = sorted(
        [*neurons.groups, *heads.groups],
        key=lambda g: order.get(g.producers[0].name if isinstance(g, HeadGroup) else g.name, 0),
    )
    return GroupScan(groups, skipped)


def unit_group_summary(group) -> dict:
    """What `inspect` shows of a neuron group or a head group."""
    if isinstance(group, HeadGroup):
        return {"kind": "heads", **head_summary(group)}
    return {"kind": "neurons", **group_summary(group)}
