"""Exact rewrites of a classifier before it is cut: BatchNormalization folded into the Conv
it follows, and parallel linear heads merged into one, so that each trains as one layer.

Pure graph edits on onnx protos, in place (no ONNX Runtime); `graph.analyze` runs them.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def fold_batch_norms(model: onnx.ModelProto) -> int:
    """Fold each BatchNormalization (eval mode) that alone reads a Conv's output into that
    Conv's weights and bias, in place; returns how many were folded.

    Exact up to float rounding: y = scale * (W*x + b - mean) / sqrt(var + eps) + bias is a
    Conv with W * s and (b - mean) * s + bias, s = scale / sqrt(var + eps). The Conv then
    trains as one layer; left apart, the BatchNormalization would be a layer of its own.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    reads = Counter(name for node in graph.node for name in node.input)
    reads.update(o.name for o in graph.output)
    producers = {out: node for node in graph.node for out in node.output}
    taken = set(inits) | set(reads) | set(producers)
    dropped: list[onnx.NodeProto] = []
    for bn in graph.node:
        conv = producers.get(bn.input[0]) if bn.op_type == "BatchNormalization" else None
        if conv is None or not _foldable(conv, bn, inits, reads):
            continue
        scale, bias, mean, var = (_array(inits[name]) for name in bn.input[1:5])
        epsilon = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        s = scale / np.sqrt(var + epsilon)
        weight = _array(inits[conv.input[1]])
        has_bias = len(conv.input) > 2 and bool(conv.input[2])
        old_bias = _array(inits[conv.input[2]]) if has_bias else np.zeros_like(s)
        new_weight = weight * s.reshape(-1, *[1] * (weight.ndim - 1))
        new_bias = (old_bias - mean) * s + bias
        # A weight only this Conv reads changes in place; a shared one is copied. The
        # bias takes the BatchNormalization's bias name when nothing else reads that.
        bias_name = conv.input[2] if has_bias and reads[conv.input[2]] == 1 else bn.input[2]
        for position, (name, value) in enumerate(
            ((conv.input[1], new_weight), (bias_name, new_bias)), start=1
        ):
            if reads[name] > 1:
                name = _fresh(f"{name}_folded", taken)
            _set(model, inits, name, value.astype(np.float32))
            if position < len(conv.input):
                conv.input[position] = name
            else:
                conv.input.append(name)
        conv.output[0] = bn.output[0]
        dropped.append(bn)
    for bn in dropped:
        graph.node.remove(bn)
    if dropped:
        _drop_unread(model, {name for bn in dropped for name in bn.input[1:5]})
    return len(dropped)


def _foldable(
    conv: onnx.NodeProto,
    bn: onnx.NodeProto,
    inits: dict[str, TensorProto],
    reads: Counter[str],
) -> bool:
    if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx"):
        return False
    if bn.domain not in ("", "ai.onnx") or len(bn.input) < 5 or reads[conv.output[0]] != 1:
        return False
    if any(a.name == "training_mode" and a.i for a in bn.attribute):
        return False
    if any(name and reads[name] for name in bn.output[1:]):
        return False
    floats = [*bn.input[1:5], conv.input[1]]
    if len(conv.input) > 2 and conv.input[2]:
        floats.append(conv.input[2])
    if not all(name in inits and inits[name].data_type == TensorProto.FLOAT for name in floats):
        return False
    channels = inits[conv.input[1]].dims[0] if inits[conv.input[1]].dims else -1
    return all(tuple(inits[n].dims) == (channels,) for n in bn.input[1:5])


def _array(tensor: TensorProto) -> np.ndarray:
    return np.asarray(numpy_helper.to_array(tensor), np.float64)


def _fresh(base: str, taken: set[str]) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def _set(
    model: onnx.ModelProto, inits: dict[str, TensorProto], name: str, value: np.ndarray
) -> None:
    tensor = numpy_helper.from_array(value, name)
    if name in inits:
        inits[name].CopyFrom(tensor)
        return
    model.graph.initializer.append(tensor)
    inits[name] = model.graph.initializer[-1]
    if model.ir_version < 4:  # initializers were graph inputs too then
        model.graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, value.shape))


def _drop_unread(model: onnx.ModelProto, candidates: set[str]) -> None:
    graph = model.graph
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    gone = candidates - read
    kept = [t for t in graph.initializer if t.name not in gone]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    inputs = [i for i in graph.input if i.name not in gone]
    del graph.input[:]
    graph.input.extend(inputs)
    del graph.value_info[:]  # shapes of renamed tensors would be stale; they are re-inferred


def merge_parallel_heads(model: onnx.ModelProto, logits: str) -> bool:
    """Make logits that are the (scaled) sum of several linear layers one linear layer, in
    place; returns whether it did.

    A distilled DeiT ends in (head(cls) + head_dist(dist)) / 2: two Gemms read two tensors
    and no single tensor crosses a cut before the last layer. Exactly the same logits come
    from one Gemm over the concatenated inputs, with the weights stacked and the biases
    summed (each times the final scale): W = s [W1 W2], b = s (b1 + b2). That Gemm is then
    the last layer, which `--trainable-layers 1` trains and `--examples` replaces. Gemms
    that read the same tensor add their weights instead.
    """
    graph = model.graph
    old = [onnx.NodeProto.FromString(node.SerializeToString()) for node in graph.node]
    inits = {t.name: t for t in graph.initializer}
    reads = Counter(name for node in old for name in node.input)
    reads.update(o.name for o in graph.output)
    producers = {out: i for i, node in enumerate(old) for out in node.output if out}
    scale, total, gone = 1.0, logits, set()
    root = old[producers[logits]] if logits in producers else None
    if root is not None and root.op_type in ("Mul", "Div") and len(root.input) == 2:
        at = 1 if _scalar(old, producers, inits, root.input[1]) is not None else 0
        factor = _scalar(old, producers, inits, root.input[at])
        if factor and np.isfinite(factor) and (at == 1 or root.op_type == "Mul"):
            scale = 1.0 / factor if root.op_type == "Div" else factor
            total = root.input[1 - at]
            gone.add(producers[logits])
            constant = producers.get(root.input[at])
            if constant is not None and reads[root.input[at]] == 1:
                gone.add(constant)  # the Constant node that held the factor
    sums, leaves = _linear_sum(old, producers, inits, reads, total)
    if len(leaves) < 2 or (total != logits and reads[total] != 1):
        return False
    classes = {_gemm_weight(old[i], inits).shape[1] for i in leaves}
    if len(classes) != 1:
        return False
    weights: dict[str, np.ndarray] = {}
    bias = np.zeros(classes.pop())
    for leaf in (old[i] for i in leaves):
        weight = _gemm_weight(leaf, inits)
        weights[leaf.input[0]] = (
            weights[leaf.input[0]] + weight if leaf.input[0] in weights else weight
        )
        if len(leaf.input) > 2 and leaf.input[2]:
            beta = next((a.f for a in leaf.attribute if a.name == "beta"), 1.0)
            bias = bias + beta * _array(inits[leaf.input[2]]).reshape(-1)
    taken = set(inits) | set(reads) | set(producers)
    name = "+".join(old[i].name or old[i].output[0] for i in leaves)
    weight_name = _fresh("merged_head.weight", taken)
    bias_name = _fresh("merged_head.bias", taken)
    sources = list(weights)
    features = sources[0]
    merged = []
    if len(sources) > 1:
        features = _fresh("merged_head.input", taken)
        merged.append(
            helper.make_node("Concat", sources, [features], name=f"{name}.concat", axis=1)
        )
    stacked = np.concatenate([weights[s] for s in sources], axis=0) * scale  # (D, C)
    merged.append(
        helper.make_node("Gemm", [features, weight_name, bias_name], [logits], name=name, transB=1)
    )
    gone.update(sums, leaves)
    constants = {n for i in gone for n in old[i].input if n in inits}
    _set(model, inits, weight_name, np.ascontiguousarray(stacked.T).astype(np.float32))
    _set(model, inits, bias_name, (bias * scale).astype(np.float32))
    rebuilt: list[onnx.NodeProto] = []
    for i, node in enumerate(old):
        if i not in gone:
            rebuilt.append(node)
        if i == max(gone):
            rebuilt.extend(merged)
    del graph.node[:]
    graph.node.extend(rebuilt)
    _drop_unread(model, constants)
    return True


def _scalar(
    nodes: list[onnx.NodeProto], producers: dict[str, int], inits: dict[str, TensorProto], name: str
) -> float | None:
    """The value of a one-element float initializer or Constant node, else None."""
    tensor = inits.get(name)
    if tensor is None and name in producers:
        node = nodes[producers[name]]
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensor = node.attribute[0].t
        elif (
            node.op_type == "Constant"
            and node.attribute
            and node.attribute[0].name == "value_float"
        ):
            return float(node.attribute[0].f)
    if tensor is None or tensor.data_type not in (TensorProto.FLOAT, TensorProto.DOUBLE):
        return None
    value = _array(tensor)
    return float(value.reshape(-1)[0]) if value.size == 1 else None


def _linear_sum(
    nodes: list[onnx.NodeProto],
    producers: dict[str, int],
    inits: dict[str, TensorProto],
    reads: Counter[str],
    total: str,
) -> tuple[list[int], list[int]]:
    """(the Add nodes, the Gemm leaves) of `total` = a sum of float linear layers, each read
    once, as node indices; ([], []) when it is anything else."""
    sums: list[int] = []
    leaves: list[int] = []
    stack = [total]
    while stack:
        name = stack.pop()
        if name not in producers or (name != total and reads[name] != 1):
            return [], []
        node = nodes[producers[name]]
        if node.op_type == "Add" and len(node.input) == 2 and not set(node.input) & set(inits):
            sums.append(producers[name])
            stack.extend(node.input)
        elif node.op_type == "Gemm" and _plain_gemm(node, inits):
            leaves.append(producers[name])
        else:
            return [], []
    return sums, sorted(leaves)


def _plain_gemm(node: onnx.NodeProto, inits: dict[str, TensorProto]) -> bool:
    attrs = {a.name: a for a in node.attribute}
    if "transA" in attrs and attrs["transA"].i:
        return False
    floats = [node.input[1]] + ([node.input[2]] if len(node.input) > 2 and node.input[2] else [])
    if node.input[0] in inits or not all(
        n in inits and inits[n].data_type == TensorProto.FLOAT for n in floats
    ):
        return False
    weight = inits[node.input[1]]
    classes = weight.dims[0] if "transB" in attrs and attrs["transB"].i else weight.dims[-1]
    bias_ok = len(floats) == 1 or int(np.prod(inits[floats[1]].dims)) == classes
    return len(weight.dims) == 2 and bias_ok


def _gemm_weight(node: onnx.NodeProto, inits: dict[str, TensorProto]) -> np.ndarray:
    """alpha * B as (inputs, classes)."""
    attrs = {a.name: a for a in node.attribute}
    weight = _array(inits[node.input[1]])
    alpha = attrs["alpha"].f if "alpha" in attrs else 1.0
    return alpha * (weight.T if "transB" in attrs and attrs["transB"].i else weight)
