"""The head's graph: weights written back, classes grown, the memory added, the template built."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from healthyluncher.errors import LuncherError
from healthyluncher.graph import default_opset, float_initializers, layers_of
from healthyluncher.memory import (
    EXACT_MATCH,
    MEMORY_PREFIX,
    MEMORY_TENSORS,
    PERSONAL_CENTRE,
    PERSONAL_FLOOR,
    PERSONAL_MASK,
    PERSONAL_ROWS,
    STRENGTH,
    Memory,
    build_memory,
    personal_memory,
)
from healthyluncher.records import Base
from healthyluncher.store import Files
from healthyluncher.template import Template

# Ops that make a layer with weights: a walk back from the logits stops at the last one.
LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum"})


def write_back(model: onnx.ModelProto, params: dict[str, np.ndarray]) -> None:
    """Replace initializers in place by name; shapes must match, dtypes are kept."""
    index = {t.name: i for i, t in enumerate(model.graph.initializer)}
    for name, value in params.items():
        if name not in index:
            raise LuncherError(f"the model has no weight named {name!r}")
        old = model.graph.initializer[index[name]]
        if tuple(old.dims) != value.shape:
            raise LuncherError(f"weight {name!r} has shape {tuple(old.dims)}, not {value.shape}")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(old.data_type)
        model.graph.initializer[index[name]].CopyFrom(
            numpy_helper.from_array(np.asarray(value, dtype=dtype), name)
        )


def class_axes(model: onnx.ModelProto, num_classes: int) -> dict[str, int]:
    """For each weight of the last layer, the axis that has one entry per class."""
    layers = layers_of(model)
    if not layers:
        raise LuncherError("the model has no layer with weights to grow")
    weights = float_initializers(model)
    axes: dict[str, int] = {}
    for node in list(model.graph.node)[layers[-1].first_node :]:
        for position, name in enumerate(node.input):
            if name not in weights or name in axes:
                continue
            dims = list(weights[name].dims)
            if node.op_type == "Gemm" and position == 1:
                trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
                axes[name] = 0 if trans_b else 1
            elif node.op_type == "MatMul" and position == 1:
                axes[name] = len(dims) - 1
            elif node.op_type in ("Conv", "ConvTranspose") and position == 1:
                axes[name] = 0 if node.op_type == "Conv" else 1
            else:
                matching = [axis for axis, size in enumerate(dims) if size == num_classes]
                if len(matching) != 1:
                    raise LuncherError(
                        f"cannot tell which axis of {name!r} {dims} holds the {num_classes} classes"
                    )
                axes[name] = matching[0]
    return axes


def grow_classes(model: onnx.ModelProto, axes: dict[str, int], extra: int) -> None:
    """Add `extra` classes in place: new rows start at zero, so old classes keep their
    weights exactly and a new class starts from a neutral score."""
    index = {t.name: i for i, t in enumerate(model.graph.initializer)}
    count = 0
    for name, axis in axes.items():
        old = numpy_helper.to_array(model.graph.initializer[index[name]])
        count = old.shape[axis]
        pad = [(0, 0)] * old.ndim
        pad[axis] = (0, extra)
        grown = np.pad(old, pad)
        model.graph.initializer[index[name]].CopyFrom(numpy_helper.from_array(grown, name))
    set_class_count(model, count, count + extra)


def set_class_count(model: onnx.ModelProto, old: int, classes: int) -> None:
    """After the last layer's weights changed from `old` to `classes` outputs: the output's
    shape, and a Reshape between that layer and the output whose target shape ends in
    `old` (torch's dynamo exporter writes Reshape to (1, 1000) where TorchScript's wrote
    Flatten) ends in `classes` instead."""
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        if len(dims) == 2:
            dims[1].ClearField("dim_param")
            dims[1].dim_value = classes
    producer = {out: node for node in model.graph.node for out in node.output}
    inits = {t.name: t for t in model.graph.initializer}
    stack, seen = [o.name for o in model.graph.output], set()
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in seen or node.op_type in LAYER_OPS:
            continue  # the last layer: the walk back from the output ends there
        seen.add(id(node))
        shape = inits.get(node.input[1]) if node.op_type == "Reshape" else None
        if shape is not None and shape.data_type == TensorProto.INT64 and len(shape.dims) == 1:
            value = numpy_helper.to_array(shape).copy()
            if value.size and value[-1] == old:
                value[-1] = classes
                name = f"{shape.name}/{classes}_classes"  # the old one may be read elsewhere
                if name not in inits:
                    inits[name] = numpy_helper.from_array(value, name)
                    model.graph.initializer.append(inits[name])
                node.input[1] = name
        stack.extend(name for name in node.input if name and name not in inits)
    del model.graph.value_info[:]


def add_memory(
    model: onnx.ModelProto,
    features: str,
    logits: str,
    memory: Memory,
    num_classes: int,
    strength: float,
) -> None:
    """Put a nearest-neighbour memory of the user's examples in front of the logits.

    For each class c: `above` is the most by which the cosine similarity between the
    photo's head input and one of the user's examples of c (both less the memory's centre,
    the mean of the base's replay set) exceeds that example's floor
    (memory.build_memory: the threshold, or the example's own similarity to its nearest
    replayed base example of another class). Where it is positive, c's logit rises by
    `strength` per unit of it. So each example claims the photos nearer to it than the
    base's nearest example of another label is: held-out photos of the user's dish flip,
    the base's own look-alikes (beignets next to pancakes) keep their label, and photos far
    from the user's dish stay out of reach. A photo the user taught (its head input, or one
    within EXACT_MATCH of it) gains `strength` more, whatever the floor, on top of what
    lifts its label to the head's top logit: a base example of another label that looks
    almost the same, or a head that puts the label far below, never outvotes the user's
    word about this very photo.
    """
    prefix = MEMORY_PREFIX
    make = onnx.helper.make_node
    opset = default_opset(model)
    tensors = personal_memory(memory, num_classes, strength)
    initializers = [numpy_helper.from_array(value, name) for name, value in tensors.items()]
    initializers += [
        numpy_helper.from_array(np.array([1], np.int64), f"{prefix}/axis1"),
        numpy_helper.from_array(np.array([2], np.int64), f"{prefix}/axis2"),
    ]
    nodes = [
        make("Flatten", [features], [f"{prefix}/flat"], axis=1),
        make("Sub", [f"{prefix}/flat", PERSONAL_CENTRE], [f"{prefix}/centred"]),
        make("LpNormalization", [f"{prefix}/centred"], [f"{prefix}/unit"], axis=1, p=2),
        make("MatMul", [f"{prefix}/unit", PERSONAL_ROWS], [f"{prefix}/similarity"]),
        make("Sub", [f"{prefix}/similarity", PERSONAL_FLOOR], [f"{prefix}/relative"]),
    ]

    def best_per_class(values: str) -> str:
        """(N, C): the highest of `values` (N, M) over the rows that count for class c."""
        p = f"{prefix}/{values}"
        nodes.extend(
            [
                # Unsqueeze takes its axes as an input from opset 13, an attribute before.
                make("Unsqueeze", [f"{prefix}/{values}", f"{prefix}/axis1"], [f"{p}_per_class"])
                if opset >= 13
                else make("Unsqueeze", [f"{prefix}/{values}"], [f"{p}_per_class"], axes=[1]),
                make("Add", [f"{p}_per_class", PERSONAL_MASK], [f"{p}_masked"]),
                make("ReduceMax", [f"{p}_masked"], [f"{p}_best"], axes=[2], keepdims=0)
                if opset < 18
                else make(
                    "ReduceMax", [f"{p}_masked", f"{prefix}/axis2"], [f"{p}_best"], keepdims=0
                ),
            ]
        )
        return f"{p}_best"

    excess = best_per_class("relative")
    best = best_per_class("similarity")
    head_logits = f"{prefix}/head_logits"
    for node in model.graph.node:
        for i, name in enumerate(node.output):
            if name == logits:
                node.output[i] = head_logits
    initializers.extend(
        [
            numpy_helper.from_array(np.array(EXACT_MATCH, np.float32), f"{prefix}/exact"),
            numpy_helper.from_array(
                np.array(1 / (1 - EXACT_MATCH), np.float32), f"{prefix}/exact_gain"
            ),
        ]
    )
    nodes.extend(
        [
            make("Relu", [excess], [f"{prefix}/above"]),
            # The photo itself (or a copy of it): `strength` more, whatever the floor.
            make("Sub", [best, f"{prefix}/exact"], [f"{prefix}/excess_exact"]),
            make("Relu", [f"{prefix}/excess_exact"], [f"{prefix}/above_exact_raw"]),
            make(
                "Mul",
                [f"{prefix}/above_exact_raw", f"{prefix}/exact_gain"],
                [f"{prefix}/above_exact"],
            ),
            make("Add", [f"{prefix}/above", f"{prefix}/above_exact"], [f"{prefix}/total"]),
            make("Mul", [f"{prefix}/total", STRENGTH], [f"{prefix}/bonus_memory"]),
            # ... and, however far the head puts its label below the top (a head of several
            # layers can, by a hundred logits), up to that top first.
            make("ReduceMax", [head_logits], [f"{prefix}/head_top"], axes=[1], keepdims=1)
            if opset < 18
            else make("ReduceMax", [head_logits, f"{prefix}/axis1"], [f"{prefix}/head_top"]),
            make("Sub", [f"{prefix}/head_top", head_logits], [f"{prefix}/gap"]),
            make("Mul", [f"{prefix}/above_exact", f"{prefix}/gap"], [f"{prefix}/exact_gap"]),
            make("Add", [f"{prefix}/bonus_memory", f"{prefix}/exact_gap"], [f"{prefix}/bonus"]),
            make("Add", [head_logits, f"{prefix}/bonus"], [logits]),
        ]
    )
    model.graph.initializer.extend(initializers)
    # Right after the node that makes the logits: the features are ready by then, and
    # whatever read the logits (a Softmax) comes after.
    existing = [copy.deepcopy(node) for node in model.graph.node]
    at = next(i for i, node in enumerate(existing) if head_logits in node.output)
    del model.graph.node[:]
    model.graph.node.extend(existing[: at + 1] + nodes + existing[at + 1 :])
    del model.graph.value_info[:]


def external_locations(model: onnx.ModelProto) -> set[str]:
    """The external data files the model's initializers name (relative to the model)."""
    found = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    found.add(entry.value)
    return found


def fit_problem(
    head_path: str,
    base_classes: int,
    classes: int,
    weights: dict[str, np.ndarray],
    sample_shape: tuple[int, ...],
) -> str:
    """Why these weights and head inputs do not fit the base's head grown to `classes`
    ("" when they do)."""
    head = onnx.load(head_path)
    if classes > base_classes:
        grow_classes(head, class_axes(head, base_classes), classes - base_classes)
    dims = head.graph.input[0].type.tensor_type.shape.dim[1:]
    expected = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    fits = len(sample_shape) == len(expected) and all(
        e in (None, f) for e, f in zip(expected, sample_shape, strict=True)
    )
    if not fits:
        return f"its examples have shape {sample_shape}, not the head's {expected}"
    shapes = {t.name: tuple(t.dims) for t in head.graph.initializer}
    for name, value in weights.items():
        if shapes.get(name) != value.shape:
            return f"weight {name!r} has shape {value.shape}, not {shapes.get(name)}"
    return ""


def head_with(
    head: Path | bytes | onnx.ModelProto, params: dict[str, np.ndarray] | None = None
) -> bytes:
    """A head (a file, bytes or a model) serialized, with these weights written back."""
    if isinstance(head, bytes):
        model = onnx.load_from_string(head)
    elif isinstance(head, Path):
        model = onnx.load(str(head))
    else:
        model = copy.deepcopy(head)
    if params:
        write_back(model, params)
    serialized: bytes = model.SerializeToString()
    return serialized


def build_template(
    model: Any,
    head: Any,
    trainable: tuple[str, ...],
    split_tensor: str,
    num_classes: int,
) -> Template:
    """The template of a base: its full model (skeleton) and head with a placeholder memory,
    stripped of the trainable weights and the memory's varying tensors (needs onnx)."""
    model, head = copy.deepcopy(model), copy.deepcopy(head)
    locations = tuple(sorted(external_locations(model)))
    logits = head.graph.output[0].name
    placeholder = build_memory(np.ones((1, 1), np.float32), np.zeros(1, np.int64), 0.0, None)
    for target in (model, head):
        add_memory(target, split_tensor, logits, placeholder, num_classes, 0)
    varying = set(trainable) | set(MEMORY_TENSORS)
    dtypes = {t.name: int(t.data_type) for t in head.graph.initializer if t.name in varying}
    blobs = []
    for target in (model, head):
        kept = [t for t in target.graph.initializer if t.name not in varying]
        if len(target.graph.initializer) - len(kept) != len(varying):
            raise ValueError("the graphs do not hold every trainable weight once")
        del target.graph.initializer[:]
        target.graph.initializer.extend(kept)
        graph_bytes = target.graph.SerializeToString()
        target.ClearField("graph")
        blobs += [target.SerializeToString(), graph_bytes]
    return Template(num_classes, locations, dtypes, *blobs)


def rebuild_template(base: Base) -> Template | None:
    """The template of `base`, made again and saved in its directory, for a base whose
    template is missing or older than this version's (template.MAGIC): later retrains
    then render without onnx. None when it cannot be made or written (the copy is then
    built with onnx, which reports any damage)."""
    meta = base.meta
    try:
        model = onnx.load(str(base.path / Files.MODEL), load_external_data=False)
        head = onnx.load(str(base.path / Files.HEAD))
        template = build_template(
            model, head, meta.trainable_params, meta.split_tensor, len(meta.labels)
        )
        temporary = base.path / f".{Files.TEMPLATE}.tmp"
        template.save(temporary)
        os.replace(temporary, base.path / Files.TEMPLATE)
    except Exception:  # noqa: BLE001 - a cache: any failure leaves the slower, same path
        return None
    return template
