"""Rewrite the spellings real exporters give dense layers into the forms `layers` reads.

Each rewrite computes what the graph computed (up to float rounding of a different kernel,
for Einsum) and is made in place on the loaded model, before layers are found, so the
pruned file carries it too:

- Identity of an initializer (torch's TorchScript exporter routes shared zero biases
  through them): consumers read the initializer itself. A bias read by several nodes is
  cloned by `rewrite` before it changes.
- Constant nodes that feed a Gemm, MatMul, Einsum or a bias Add: initializers.
- If whose condition is a constant of the graph: the branch taken, inlined.
- MatMul + Add whose bias is [1, ..., 1, out] (jax2tf/tf2onnx write [1, 1, out] on rank-3
  activations): the bias reshaped to [out] where the product's rank keeps the sum's shape.
  onnx2pytorch folds MatMul + Add into an nn.Linear with that bias, and F.linear refuses a
  bias that is not 1-D.
- Einsum that is a matrix product with a constant 2-D weight ("bsi,io->bso",
  "...i,oi->...o"): a MatMul (with the weight transposed where stored [out, in]).
- skl2onnx's ai.onnx.ml Scaler on a float32 input (StandardScaler in a pipeline), which
  onnx2pytorch lacks: Sub and Mul of its offset and scale, as the operator defines it.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import numpy_helper

from ecprune_onnx import modelio

DENSE_OPS = ("Gemm", "MatMul", "Einsum")


def normalize(model: onnx.ModelProto) -> list[str]:
    """Apply every rewrite to `model` in place; one note per kind of change made."""
    graph = model.graph
    notes = []
    counts = {
        "Identity nodes of initializers bypassed": _bypass_initializer_identities(graph),
        "Constant nodes feeding dense layers made initializers": _fold_constants(graph),
        "If nodes with a constant condition inlined": _inline_constant_ifs(model),
        "MatMul biases of shape [1, ..., out] reshaped to [out]": _flatten_matmul_biases(model),
        "Einsum matrix products rewritten as MatMul": _einsums_to_matmuls(graph),
        "ai.onnx.ml Scaler nodes rewritten as Sub and Mul": _scalers_to_arithmetic(model),
    }
    for what, count in counts.items():
        if count:
            notes.append(f"{what}: {count}")
    return notes


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(node)
    return consumers


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every read of tensor `old` in `graph` and in the subgraphs of its nodes reads `new`."""
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new
        for _, subgraph in modelio.subgraphs(node):
            _rename_uses(subgraph, old, new)
    for output in graph.output:
        if output.name == old:
            output.name = new


def _bypass_initializer_identities(graph: onnx.GraphProto) -> int:
    initializers = {tensor.name for tensor in graph.initializer}
    outputs = {value.name for value in graph.output}
    bypassed = [
        node
        for node in graph.node
        if node.op_type == "Identity"
        and node.domain in ("", "ai.onnx")
        and node.input[0] in initializers
        and node.output[0] not in outputs
    ]
    for node in bypassed:
        graph.node.remove(node)
        _rename_uses(graph, node.output[0], node.input[0])
    return len(bypassed)


def _fold_constants(graph: onnx.GraphProto) -> int:
    """Constant(value=tensor) nodes read by a dense op or a bias Add become initializers."""
    consumers = _consumers(graph)
    producers = {name: node for node in graph.node for name in node.output}
    outputs = {value.name for value in graph.output}
    folded = 0
    for node in list(graph.node):
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        tensor = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
        name = node.output[0]
        if tensor is None or name in outputs:
            continue
        if not any(_reads_as_dense_operand(user, producers) for user in consumers.get(name, [])):
            continue
        initializer = onnx.TensorProto()
        initializer.CopyFrom(tensor)
        initializer.name = name
        graph.initializer.append(initializer)
        graph.node.remove(node)
        folded += 1
    return folded


def _reads_as_dense_operand(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto]) -> bool:
    if node.op_type in DENSE_OPS:
        return True
    return node.op_type == "Add" and any(
        producers.get(name) is not None and producers[name].op_type in DENSE_OPS
        for name in node.input
    )


def constant_condition(graph: onnx.GraphProto, name: str) -> bool | None:
    """The value of boolean tensor `name` where it depends on initializers and Constant nodes
    only (evaluated with onnx's reference runtime); None where it depends on a graph input."""
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    if name in initializers:
        return bool(numpy_helper.to_array(initializers[name]).reshape(-1)[0])
    needed, pending, seen = [], [name], set()
    while pending:
        tensor = pending.pop()
        if tensor in seen or tensor in initializers:
            continue
        seen.add(tensor)
        node = producers.get(tensor)
        if node is None or any(a.type == onnx.AttributeProto.GRAPH for a in node.attribute):
            return None  # a graph input, or a value computed by a subgraph
        needed.append(node)
        pending.extend(input_name for input_name in node.input if input_name)
    from onnx.reference import ReferenceEvaluator  # only for graphs with an If

    order = {id(node): index for index, node in enumerate(graph.node)}
    nodes = sorted(needed, key=lambda node: order[id(node)])
    used = {input_name for node in nodes for input_name in node.input}
    sub = onnx.helper.make_graph(
        nodes,
        "condition",
        [],
        [onnx.helper.make_empty_tensor_value_info(name)],
        [tensor for tensor in graph.initializer if tensor.name in used],
    )
    try:
        value = ReferenceEvaluator(onnx.helper.make_model(sub)).run(None, {})[0]
    except Exception:  # an op the reference runtime lacks: treat it as not constant
        return None
    return bool(np.asarray(value).reshape(-1)[0])


def _inline_constant_ifs(model: onnx.ModelProto) -> int:
    graph = model.graph
    inlined = 0
    for node in list(graph.node):
        if node.op_type != "If" or node.domain not in ("", "ai.onnx"):
            continue
        condition = constant_condition(graph, node.input[0])
        if condition is None:
            continue
        branch = next(
            a.g for a in node.attribute if a.name == ("then_branch" if condition else "else_branch")
        )
        _inline(graph, node, branch)
        inlined += 1
    return inlined


def _inline(graph: onnx.GraphProto, if_node: onnx.NodeProto, branch: onnx.GraphProto) -> None:
    """Replace `if_node` by the nodes of `branch`, its outputs written under the If's names.
    Names the branch defines are made unique in the outer graph first."""
    taken = _all_names(graph)
    renames = {}
    for name in [t.name for t in branch.initializer] + [o for n in branch.node for o in n.output]:
        if name and name in taken:
            renames[name] = _fresh(name, taken)
    for old, new in renames.items():
        _rename_defined(branch, old, new)
    for tensor in branch.initializer:
        graph.initializer.append(tensor)
    position = list(graph.node).index(if_node)
    produced = {out for n in branch.node for out in n.output}
    new_nodes = list(branch.node)
    for branch_output, if_output in zip(branch.output, if_node.output):
        if branch_output.name in produced:
            for n in new_nodes:
                for index, out in enumerate(n.output):
                    if out == branch_output.name:
                        n.output[index] = if_output
                for index, name in enumerate(n.input):
                    if name == branch_output.name:
                        n.input[index] = if_output
        else:  # the branch passes an outer tensor or one of its initializers through
            new_nodes.append(onnx.helper.make_node("Identity", [branch_output.name], [if_output]))
    graph.node.remove(if_node)
    for offset, new_node in enumerate(new_nodes):
        graph.node.insert(position + offset, new_node)


def _rename_defined(branch: onnx.GraphProto, old: str, new: str) -> None:
    for tensor in branch.initializer:
        if tensor.name == old:
            tensor.name = new
    for node in branch.node:
        for index, name in enumerate(node.output):
            if name == old:
                node.output[index] = new
    _rename_uses(branch, old, new)


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        for _, subgraph in modelio.subgraphs(node):
            names |= _all_names(subgraph)
    return names


def _fresh(base: str, taken: set[str]) -> str:
    index = 1
    while f"{base}_{index}" in taken:
        index += 1
    taken.add(f"{base}_{index}")
    return f"{base}_{index}"


def _flatten_matmul_biases(model: onnx.ModelProto) -> int:
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    consumers = _consumers(graph)
    ranks = None
    flattened = 0
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in initializers:
            continue
        users = consumers.get(node.output[0], [])
        if len(users) != 1 or users[0].op_type != "Add":
            continue
        add = users[0]
        bias_name = next((n for n in add.input if n != node.output[0]), None)
        bias = initializers.get(bias_name)
        if bias is None or len(bias.dims) < 2 or any(size != 1 for size in bias.dims[:-1]):
            continue
        if ranks is None:
            ranks = _ranks(model)
        product_rank = ranks.get(node.output[0])
        # the sum keeps its shape only where the product has at least the bias's rank
        if product_rank is None or product_rank < len(bias.dims):
            continue
        if len(consumers.get(bias_name, [])) > 1:
            bias = _clone_for(graph, add, bias)
        del bias.dims[:-1]
        flattened += 1
    return flattened


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    ranks = {}
    for name, info in modelio.value_infos(model).items():
        tensor_type = info.type.tensor_type
        if info.type.HasField("tensor_type") and tensor_type.HasField("shape"):
            ranks[name] = len(tensor_type.shape.dim)
    return ranks


def _clone_for(graph: onnx.GraphProto, node: onnx.NodeProto, tensor: onnx.TensorProto):
    """A copy of initializer `tensor` that `node` alone reads."""
    clone = onnx.TensorProto()
    clone.CopyFrom(tensor)
    clone.name = _fresh(tensor.name, _all_names(graph))
    graph.initializer.append(clone)
    for index, name in enumerate(node.input):
        if name == tensor.name:
            node.input[index] = clone.name
    return graph.initializer[-1]


# "x-operand,weight-operand->output" with single-letter subscripts and an optional ellipsis
_EINSUM = re.compile(r"^([a-zA-Z.]+),([a-zA-Z]{2})->([a-zA-Z.]+)$")


def einsum_weight_layout(equation: str, weight_first: bool = False) -> str | None:
    """ "in_out" or "out_in" where `equation` is activation × 2-D weight over the activation's
    last axis, the output keeping the other axes in order; None for any other contraction."""
    terms = equation.replace(" ", "")
    if weight_first:
        left, _, output = terms.partition("->")
        first, _, second = left.partition(",")
        terms = f"{second},{first}->{output}"
    found = _EINSUM.match(terms)
    if found is None:
        return None
    activation, weight, output = found.groups()
    if activation.count("...") > 1 or "." in activation.replace("...", ""):
        return None
    contracted, kept = activation[-1], activation[:-1]
    if weight == contracted + output[-1:] and output == kept + weight[1]:
        layout = "in_out"
    elif weight == output[-1:] + contracted and output == kept + weight[0]:
        layout = "out_in"
    else:
        return None
    letters = kept.replace("...", "")
    if len(set(letters + weight)) != len(letters) + 2:  # a repeated subscript: not a product
        return None
    return layout


def _einsums_to_matmuls(graph: onnx.GraphProto) -> int:
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    consumers = _consumers(graph)
    rewritten = 0
    for node in graph.node:
        if node.op_type != "Einsum" or len(node.input) != 2:
            continue
        equation = next(
            (a.s.decode() for a in node.attribute if a.name == "equation"), ""
        )  # fmt: skip
        weight_first = node.input[0] in initializers and node.input[1] not in initializers
        weight_name = node.input[0] if weight_first else node.input[1]
        tensor = initializers.get(weight_name)
        layout = einsum_weight_layout(equation, weight_first)
        if tensor is None or len(tensor.dims) != 2 or layout is None:
            continue
        if layout == "out_in":
            if len(consumers.get(weight_name, [])) > 1:
                continue  # transposing a weight another node reads would change that node
            transposed = numpy_helper.from_array(
                np.ascontiguousarray(numpy_helper.to_array(tensor).T), weight_name
            )
            tensor.CopyFrom(transposed)
        activation = node.input[1] if weight_first else node.input[0]
        node.op_type = "MatMul"
        del node.attribute[:]
        del node.input[:]
        node.input.extend([activation, weight_name])
        rewritten += 1
    return rewritten


def _scalers_to_arithmetic(model: onnx.ModelProto) -> int:
    """Scaler(X) = (X - offset) * scale, elementwise along the last axis (ai.onnx.ml)."""
    graph = model.graph
    float_inputs = _float32_tensors(model)
    taken = _all_names(graph)
    rewritten = 0
    for node in list(graph.node):
        if node.op_type != "Scaler" or node.domain != "ai.onnx.ml":
            continue
        if node.input[0] not in float_inputs:
            continue  # the operator casts other types to float first: left as it is
        attributes = {a.name: list(a.floats) for a in node.attribute}
        offset = _fresh(node.output[0] + "_offset", taken)
        scale = _fresh(node.output[0] + "_scale", taken)
        centred = _fresh(node.output[0] + "_centred", taken)
        for name, values in ((offset, attributes.get("offset", [0.0])),
                             (scale, attributes.get("scale", [1.0]))):  # fmt: skip
            graph.initializer.append(numpy_helper.from_array(np.array(values, np.float32), name))
        position = list(graph.node).index(node)
        graph.node.remove(node)
        multiply = onnx.helper.make_node("Mul", [centred, scale], [node.output[0]])
        subtract = onnx.helper.make_node("Sub", [node.input[0], offset], [centred])
        graph.node.insert(position, multiply)
        graph.node.insert(position, subtract)
        rewritten += 1
    return rewritten


def _float32_tensors(model: onnx.ModelProto) -> set[str]:
    float32 = onnx.TensorProto.FLOAT
    return {
        name
        for name, info in modelio.value_infos(model).items()
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type == float32
    }
