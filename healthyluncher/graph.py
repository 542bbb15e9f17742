"""Reading an ONNX classifier, choosing its trainable layers, cutting it in two, externalizing."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from healthyluncher.cuts import MAX_LISTED, Topology, choices, cut_problem, working_counts
from healthyluncher.errors import LuncherError, Param
from healthyluncher.external import load_with_external_data
from healthyluncher.fileio import parse_json
from healthyluncher.meta import check_label
from healthyluncher.rewrites import fold_batch_norms, merge_parallel_heads
from healthyluncher.runtime import MAX_IR_VERSION, MAX_OPSET
from healthyluncher.settings import Layout

# An Add/Mul/Sub/Div or BatchNormalization with weights of its own, right after a layer, is
# that layer's bias or scale (Keras exports MatMul + Add).
ATTACHED_OPS = frozenset({"Add", "Sub", "Mul", "Div", "BatchNormalization"})
# Inputs (by position) that are weights but not learned by gradient: batch-norm statistics.
# A BatchNormalization's scale and bias do train (decompose.py rewrites it for training).
FROZEN_INPUTS = {"BatchNormalization": frozenset({3, 4})}
# Float inputs that are no weights at all: Resize's region and scales.
NOT_WEIGHTS = {"Resize": frozenset({1, 2}), "Upsample": frozenset({1})}
PASS_THROUGH_OPS = frozenset({"Identity"})
# What class scores may be: a float16 model's head trains in float32 (bases.float32_head).
SCORE_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE})


@dataclass(frozen=True)
class Layer:
    """A group of nodes that holds weights: e.g. Conv, or MatMul + Add."""

    name: str
    op: str
    params: int
    trainable_names: tuple[str, ...]
    first_node: int
    data_input: str


@dataclass(frozen=True)
class ImageInput:
    name: str
    layout: Layout
    channels: int
    height: int | None
    width: int | None
    batch: int | None  # None: dynamic


@dataclass(frozen=True)
class Analysis:
    input: ImageInput
    output_name: str
    logits_name: str
    output_is_probability: bool
    num_classes: int
    layers: tuple[Layer, ...]
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Split:
    """The frozen part (image -> split tensor) and the trainable head (split tensor -> logits)."""

    frozen: onnx.ModelProto | None  # None when every layer trains
    head: onnx.ModelProto
    split_tensor: str
    trainable_params: tuple[str, ...]


def load_model(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise LuncherError(f"{path}: no such file")
    model = load_with_external_data(path)  # each tensor's external data checked first
    if not model.graph.node:
        raise LuncherError(f"{path}: not an ONNX model (the graph has no nodes)")
    return model


def normalize_versions(model: onnx.ModelProto) -> None:
    """Lower the IR version that newer onnx releases write to what ORT 1.19 reads."""
    opset = default_opset(model)
    if opset < 1:  # onnx's shape inference knows no op then, ONNX Runtime runs none
        raise LuncherError("the model imports no ONNX operator set (opset) for its ops")
    if opset > MAX_OPSET:
        raise LuncherError(
            f"the model uses ONNX opset {opset}; ONNX Runtime 1.19 supports up to {MAX_OPSET}"
        )
    if (ir := model.ir_version) < 3:
        raise LuncherError(f"the model is ONNX IR version {ir}; ONNX Runtime reads 3 and later")
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def _dims(value: onnx.ValueInfoProto) -> list[int | None]:
    shape = value.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]


def float_initializers(model: onnx.ModelProto) -> dict[str, TensorProto]:
    return {
        t.name: t
        for t in model.graph.initializer
        if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
    }


def analyze(model: onnx.ModelProto) -> Analysis:
    """What the classifier is, and its layers. Folds each BatchNormalization that follows a
    Conv into that Conv first, and logits that sum several linear layers into one, in place
    (both exact): the layers listed are then the ones that train, and the model written for
    the base is the rewritten one."""
    graph = model.graph
    # Two weights of one name: ONNX Runtime keeps one (which trains?), onnx's tools break.
    made = Counter([t.name for t in graph.initializer] + [o for n in graph.node for o in n.output])
    twice = next((name for name, count in made.items() if name and count > 1), None)
    if twice is not None:
        raise LuncherError(f"the model has more than one weight or node output named {twice!r}")
    fold_batch_norms(model)
    initializer_names = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializer_names]
    if not inputs:
        raise LuncherError("the model has no input")
    if len(inputs) > 1:
        names = ", ".join(i.name for i in inputs)
        raise LuncherError(f"the model has {len(inputs)} inputs ({names}); expected one image")
    image = _image_input(inputs[0])
    if len(graph.output) != 1:
        raise LuncherError(
            f"the model has {len(graph.output)} outputs; expected one output of class scores"
        )
    output = graph.output[0]
    if output.type.tensor_type.elem_type not in SCORE_TYPES:
        raise LuncherError(f"the model's output {output.name!r} is {_kind(output)}, not scores")
    out_dims = _dims(output)
    if len(out_dims) != 2 or out_dims[1] is None:
        inferred = onnx.shape_inference.infer_shapes(model)
        out_dims = _dims(inferred.graph.output[0])
    if len(out_dims) != 2 or not out_dims[1]:
        raise LuncherError(
            f"the model's output {output.name!r} has shape {out_dims}; "
            "expected (batch, classes) class scores"
        )
    logits_name, is_probability = _logits_of(model, output.name)
    merge_parallel_heads(model, logits_name)
    layers = layers_of(model)
    if not layers:
        raise LuncherError("the model has no layers with weights to train")
    return Analysis(
        input=image,
        output_name=output.name,
        logits_name=logits_name,
        output_is_probability=is_probability,
        num_classes=int(out_dims[1]),
        layers=tuple(layers),
        metadata={p.key: p.value for p in model.metadata_props},
    )


def _image_input(value: onnx.ValueInfoProto) -> ImageInput:
    elem = value.type.tensor_type.elem_type
    dims = _dims(value)
    if elem != TensorProto.FLOAT or len(dims) != 4:
        raise LuncherError(
            f"input {value.name!r} is not an image: expected float32 or float16 with 4 "
            f"dimensions, got {_kind(value)} with shape {dims}"
        )
    if any(d is not None and d < 1 for d in dims):
        raise LuncherError(
            f"input {value.name!r} with shape {dims} is not an image: a size below 1"
        )
    layout: Layout
    if dims[1] in (1, 3):
        layout, channels, height, width = "NCHW", dims[1], dims[2], dims[3]
    elif dims[3] in (1, 3):
        layout, channels, height, width = "NHWC", dims[3], dims[1], dims[2]
    else:
        raise LuncherError(
            f"input {value.name!r} with shape {dims} is not an image: "
            "expected 1 or 3 channels first (NCHW) or last (NHWC)"
        )
    return ImageInput(value.name, layout, int(channels), height, width, dims[0])


def _kind(value: onnx.ValueInfoProto) -> str:
    """A tensor's element type as ONNX names it, in lower case: "float", "int64"."""
    elem = value.type.tensor_type.elem_type
    return TensorProto.DataType.Name(elem).lower() if elem else "unknown"


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def _logits_of(model: onnx.ModelProto, output: str) -> tuple[str, bool]:
    """The tensor holding the logits, and whether the output is Softmax probabilities."""
    producers = _producers(model)
    name = output
    node = producers.get(name)
    seen: set[str] = set()
    while node is not None and node.op_type in PASS_THROUGH_OPS:
        if name in seen:  # Identity nodes in a cycle: no graph ONNX Runtime would run
            raise LuncherError(
                f"the model's output {output!r} is made by a cycle of Identity nodes"
            )
        seen.add(name)
        name = node.input[0]
        node = producers.get(name)
    if node is not None and node.op_type == "Softmax":
        # CrossEntropyLoss expects logits: train on the Softmax's input.
        return node.input[0], True
    return output, False


def layers_of(model: onnx.ModelProto) -> list[Layer]:
    weights = float_initializers(model)
    layers: list[Layer] = []
    current: dict[str, Any] | None = None
    last_output: str | None = None
    for index, node in enumerate(model.graph.node):
        skip = NOT_WEIGHTS.get(node.op_type, frozenset())
        frozen = FROZEN_INPUTS.get(node.op_type, frozenset())
        held = [
            (position, name)
            for position, name in enumerate(node.input)
            if name in weights and _size(weights[name]) > 1 and position not in skip
        ]
        if not held:
            continue
        data_inputs = [n for n in node.input if n and n not in weights]
        attached = (
            current is not None
            and node.op_type in ATTACHED_OPS
            and last_output is not None
            and last_output in data_inputs
        )
        if not attached:
            if all(position in frozen for position, _ in held):
                continue  # nothing here learns: no layer to list
            if current is not None:
                layers.append(_finish(current))
            current = {
                "name": node.name or held[0][1],
                "op": node.op_type,
                "first_node": index,
                "data_input": data_inputs[0] if data_inputs else "",
                "params": 0,
                "trainable": [],
            }
        assert current is not None
        if attached:
            current["op"] = f"{current['op']}+{node.op_type}"
        current["params"] += sum(_size(weights[name]) for _, name in held)
        current["trainable"].extend(
            name
            for position, name in held
            if position not in frozen and name not in current["trainable"]
        )
        last_output = node.output[0]
    if current is not None:
        layers.append(_finish(current))
    return layers


def _finish(raw: dict[str, Any]) -> Layer:
    return Layer(
        name=raw["name"],
        op=raw["op"],
        params=int(raw["params"]),
        trainable_names=tuple(raw["trainable"]),
        first_node=int(raw["first_node"]),
        data_input=raw["data_input"],
    )


def _size(tensor: TensorProto) -> int:
    return int(np.prod(tensor.dims)) if tensor.dims else 1


def split(model: onnx.ModelProto, analysis: Analysis, trainable_layers: int) -> Split:
    layers = analysis.layers
    if trainable_layers < 1:
        raise LuncherError(Param("trainable_layers"), " must be at least 1")
    checked = [layer.data_input for layer in layers[-max(trainable_layers, MAX_LISTED) :]]
    topology = Topology.of(model, analysis.input.name, checked)

    def refuse(problem: str) -> LuncherError:
        working = working_counts(topology, layers, analysis.logits_name)
        given = Param("trainable_layers", trainable_layers)
        return LuncherError(given, f" {problem}; ", *choices(working, len(layers)))

    if trainable_layers > len(layers):
        raise refuse(f"is more than the {len(layers)} layers with weights in this model")
    problem = cut_problem(topology, layers, trainable_layers, analysis.logits_name)
    if problem is not None:
        raise refuse(problem)
    trainable = layers[-trainable_layers:]
    cut = trainable[0].data_input
    # The extractor needs the shapes of the tensors where it cuts.
    inferred = onnx.shape_inference.infer_shapes(model)
    head = _extract(inferred, [cut], [analysis.logits_name])
    _make_batch_dynamic(head)
    frozen = None
    if cut != analysis.input.name:
        frozen = _extract(inferred, [analysis.input.name], [cut])
    params = tuple(name for layer in trainable for name in layer.trainable_names)
    return Split(frozen=frozen, head=head, split_tensor=cut, trainable_params=params)


def _extract(model: onnx.ModelProto, inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
    try:
        part = onnx.utils.Extractor(model).extract_model(inputs, outputs)
    except ValueError:  # a tensor there has no inferred type: an op of another domain, say
        why = f"onnx cannot infer shapes there (an op unknown at opset {default_opset(model)}?)"
        raise LuncherError(f"cannot cut the model at {inputs[0]!r}: {why}") from None
    part.ir_version = model.ir_version
    del part.metadata_props[:]
    return part


def _make_batch_dynamic(head: onnx.ModelProto) -> None:
    """Let the head train on batches even when the original was exported for batch 1."""
    for value in list(head.graph.input) + list(head.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "batch"
    del head.graph.value_info[:]


# Initializers at least this large go to the weights file; smaller ones stay in the graph.
EXTERNAL_THRESHOLD = 512
# Large tensors start on a page boundary in the weights file, as onnx.save places them.
PAGE = 4096


def externalize(models: list[onnx.ModelProto], keep: set[str], location: str) -> bytes:
    """Move the large initializers of `models`, except those named in `keep`, into one
    external data file called `location` (next to the models); returns that file's bytes.

    Initializers with one name and the same values in several models (the full model and
    its frozen part) are stored once. What stays in the graphs is a small skeleton: the
    personalized copy rewrites only that, next to a copy of the weights file.
    """
    from onnx.external_data_helper import set_external_data, uses_external_data

    data = bytearray()
    placed: dict[str, tuple[int, bytes]] = {}
    for model in models:
        for tensor in model.graph.initializer:
            if tensor.name in keep or uses_external_data(tensor):
                continue
            if tensor.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
                continue
            if not tensor.HasField("raw_data"):
                if _size(tensor) * 4 < EXTERNAL_THRESHOLD:
                    continue
                tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
            raw = tensor.raw_data
            if len(raw) < EXTERNAL_THRESHOLD:
                continue
            if tensor.name in placed and placed[tensor.name][1] == raw:
                offset = placed[tensor.name][0]
            else:
                if len(raw) >= PAGE:
                    data.extend(bytes(-len(data) % PAGE))
                offset = len(data)
                data.extend(raw)
                placed[tensor.name] = (offset, raw)
            set_external_data(tensor, location, offset=offset, length=len(raw))
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
    return bytes(data)


def metadata_labels(metadata: dict[str, str]) -> list[str] | None:
    for key in ("labels", "classes", "class_names"):
        raw = metadata.get(key)
        if not raw:
            continue
        try:
            value = parse_json(raw)
        except ValueError:
            value = raw.split(",")
        if isinstance(value, dict):  # {"0": "cat", ...}
            try:
                value = [value[k] for k in sorted(value, key=int)]
            except (TypeError, ValueError):
                raise LuncherError(
                    f"the model's {key!r} metadata maps class numbers to names, but not all "
                    "of its keys are numbers; give the labels with ",
                    Param("labels", example="a,b,..."),
                ) from None
        if isinstance(value, list) and value:
            try:
                return [check_label(str(v)) for v in value]
            except LuncherError as exc:
                raise LuncherError(
                    f"the model's {key!r} metadata: {exc}; give the labels with ",
                    Param("labels", example="a,b,..."),
                ) from None
    return None
