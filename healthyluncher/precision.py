"""float16 models: the frozen part may stay float16, the trainable head becomes float32.

A model converted to float16 weights with float32 input and output (onnxconverter-common's
`keep_io_types=True`) cuts into a float16 frozen part and a float16 head. Training runs in
float32 (ONNX Runtime's training kernels and the numpy trainer), so the head's weights and
casts become float32, and in the full model one Cast turns the cut tensor into float32
right where the frozen part ends: predict, the memory and the training all see float32.
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
    _to_float32(graph.initializer, graph.node, names, outputs)
    split = cut.split_tensor
    producer = next((i for i, n in enumerate(graph.node) if split in n.output), None)
    if producer is None:
        raise LuncherError(f"cannot find where the frozen part makes {split!r}")
    node = graph.node[producer]
    node.output[list(node.output).index(split)] = split + FLOAT16_SUFFIX
    cast = helper.make_node(
        "Cast", [split + FLOAT16_SUFFIX], [split], to=TensorProto.FLOAT, name=f"{split}/to_float32"
    )
    nodes = list(graph.node)
    nodes.insert(producer + 1, cast)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]


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
