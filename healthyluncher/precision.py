"""What the frozen part hands the head: float16 made float32, and features scaled.

float16 models: the frozen part may stay float16, the trainable head becomes float32.
A model converted to float16 weights with float32 input and output (onnxconverter-common's
`keep_io_types=True`) cuts into a float16 frozen part and a float16 head. Training runs in
float32 (ONNX Runtime's training kernels and the numpy trainer), so the head's weights and
casts become float32, and in the full model one Cast turns the cut tensor into float32
right where the frozen part ends: predict, the memory and the training all see float32.
A model whose image input is float16 too (`model.half()`, `keep_io_types=False`) first
gets a float32 input and a Cast to float16 as its first node (`float32_input`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from healthyluncher.errors import LuncherError
from healthyluncher.graph import Split

FLOAT16_SUFFIX = "/float16"


def has_float16(model: onnx.ModelProto) -> bool:
    graph = model.graph
    return any(t.data_type == TensorProto.FLOAT16 for t in graph.initializer) or any(
        v.type.tensor_type.elem_type == TensorProto.FLOAT16 for v in graph.input
    )


def float32_input(model: onnx.ModelProto) -> None:
    """Give a float16 image input (4 dimensions) a float32 input and a Cast to float16 as
    the model's first node, in place: photos are preprocessed in float32 as for any model
    and round to float16 where the model starts, exactly what feeding float16 would do."""
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    for value in graph.input:
        kind = value.type.tensor_type
        if value.name in weights or kind.elem_type != TensorProto.FLOAT16:
            continue
        if len(kind.shape.dim) != 4:  # not an image: graph.analyze says so
            continue
        name, half = value.name, value.name + FLOAT16_SUFFIX
        for node in graph.node:
            node.input[:] = [half if n == name else n for n in node.input]
        kind.elem_type = TensorProto.FLOAT
        cast = helper.make_node("Cast", [name], [half], to=TensorProto.FLOAT16, name=half)
        nodes = [cast, *graph.node]
        del graph.node[:]
        graph.node.extend(nodes)
        kept = [v for v in graph.value_info if v.name != name]
        del graph.value_info[:]
        graph.value_info.extend(kept)


def float32_head(model: onnx.ModelProto, cut: Split) -> None:
    """Make the head float32 in `cut.head` and in the full `model`, in place."""
    if not has_float16(cut.head):
        return
    names = {t.name for t in cut.head.graph.initializer}
    outputs = {o for node in cut.head.graph.node for o in node.output}
    _to_float32(cut.head.graph.initializer, cut.head.graph.node, names, outputs)
    for value in [*cut.head.graph.input, *cut.head.graph.output]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    del cut.head.graph.value_info[:]

    graph = model.graph
    _keep_float16_for_frozen(graph, names, outputs)
    _to_float32(graph.initializer, graph.node, names, outputs)
    for value in graph.output:  # float16 scores (`model.half()`): the head makes float32
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    split = cut.split_tensor
    put_after_producer(
        model,
        split,
        FLOAT16_SUFFIX,
        lambda source: helper.make_node(
            "Cast", [source], [split], to=TensorProto.FLOAT, name=f"{split}/to_float32"
        ),
    )


def _keep_float16_for_frozen(graph: Any, names: set[str], outputs: set[str]) -> None:
    """The frozen part's nodes that read a float16 initializer of the head read a float16
    copy of it instead (torch's dynamo exporter shares one pair of Clip bounds among every
    ReLU6 of MobileNetV2), so that making the head float32 leaves the frozen part whole."""
    half = {t.name: t for t in graph.initializer if t.name in names}
    half = {n: t for n, t in half.items() if t.data_type == TensorProto.FLOAT16}
    copies: set[str] = set()
    for node in graph.node:
        if set(node.output) & outputs:
            continue  # a node of the head
        for position, name in enumerate(node.input):
            if name in half:
                copy = name + FLOAT16_SUFFIX
                if copy not in copies:
                    value = numpy_helper.to_array(half[name])
                    graph.initializer.append(numpy_helper.from_array(value, copy))
                    copies.add(copy)
                node.input[position] = copy


def _to_float32(
    initializers: Iterable[Any], nodes: Iterable[Any], names: set[str], outputs: set[str]
) -> None:
    """float16 initializers named in `names`, and the casts and constants of the nodes that
    make `outputs`, to float32."""
    for tensor in initializers:
        if tensor.name in names and tensor.data_type == TensorProto.FLOAT16:
            value = numpy_helper.to_array(tensor).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    for node in nodes:
        if not set(node.output) & outputs:
            continue
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to":
                if attribute.i == TensorProto.FLOAT16:
                    attribute.i = TensorProto.FLOAT
            elif attribute.type == onnx.AttributeProto.TENSOR:
                if attribute.t.data_type == TensorProto.FLOAT16:
                    value = numpy_helper.to_array(attribute.t).astype(np.float32)
                    attribute.t.CopyFrom(numpy_helper.from_array(value, attribute.t.name))


def put_after_producer(model: onnx.ModelProto, tensor: str, suffix: str, make: Any) -> None:
    """Put one node between `tensor` and the node that makes it, in place: that node makes
    `tensor + suffix` instead, and `make(tensor + suffix)` (a NodeProto that makes `tensor`)
    runs right after it, so every reader of `tensor` reads the new node's output."""
    graph = model.graph
    producer = next((i for i, n in enumerate(graph.node) if tensor in n.output), None)
    if producer is None:
        raise LuncherError(f"cannot find where the frozen part makes {tensor!r}")
    node = graph.node[producer]
    node.output[list(node.output).index(tensor)] = tensor + suffix
    nodes = list(graph.node)
    nodes.insert(producer + 1, make(tensor + suffix))
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]


def scale_tensor(model: onnx.ModelProto, tensor: str, factor: float) -> None:
    """Multiply `tensor` by `factor` where it is made, in place, in its own float type (a
    float16 frozen part hands over float16; the full model casts it to float32 first).
    `factor` is a power of two, so either way nothing rounds."""
    name = f"{tensor}/scale"
    dtype = np.float16 if _elem_type(model, tensor) == TensorProto.FLOAT16 else np.float32
    model.graph.initializer.append(numpy_helper.from_array(np.array(factor, dtype), name))
    put_after_producer(
        model,
        tensor,
        "/unscaled",
        lambda source: helper.make_node("Mul", [source, name], [tensor], name=name),
    )


def _elem_type(model: onnx.ModelProto, tensor: str) -> int:
    """The element type of `tensor` in `model` (float32 when nothing says otherwise)."""
    graph = model.graph
    for value in [*graph.output, *graph.value_info]:
        if value.name == tensor and value.type.tensor_type.elem_type:
            return int(value.type.tensor_type.elem_type)
    producer = next((n for n in graph.node if tensor in n.output), None)
    if producer is not None and producer.op_type == "Cast":
        return int(next(a.i for a in producer.attribute if a.name == "to"))
    inferred = onnx.shape_inference.infer_shapes(model).graph
    for value in [*inferred.output, *inferred.value_info]:
        if value.name == tensor and value.type.tensor_type.elem_type:
            return int(value.type.tensor_type.elem_type)
    return int(TensorProto.FLOAT)
