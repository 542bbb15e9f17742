"""Reading an ONNX classifier, choosing its trainable layers and cutting it in two."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from healthyluncher.config import Layout
from healthyluncher.errors import LuncherError
from healthyluncher.fastgraph import MEMORY_PREFIX, memory_tensors

# ONNX Runtime 1.19 loads models up to IR version 10 and opset 21.
MAX_IR_VERSION = 10
MAX_OPSET = 21

# Ops that carry a layer's main weights. A following Add/Mul/Sub/Div or BatchNormalization
# with weights of its own is that layer's bias or scale (Keras exports MatMul + Add).
PRIMARY_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
ATTACHED_OPS = frozenset({"Add", "Sub", "Mul", "Div", "BatchNormalization"})
# Batch-norm statistics are not learned by gradient; they stay frozen even in a trainable layer.
NON_TRAINABLE_OPS = frozenset({"BatchNormalization"})
PASS_THROUGH_OPS = frozenset({"Identity"})


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
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and friends
        raise LuncherError(f"{path}: not an ONNX model ({type(exc).__name__})") from None
    if not model.graph.node:
        raise LuncherError(f"{path}: not an ONNX model (the graph has no nodes)")
    return model


def normalize_versions(model: onnx.ModelProto) -> None:
    """Lower the IR version that newer onnx releases write to what ORT 1.19 reads."""
    opset = default_opset(model)
    if opset > MAX_OPSET:
        raise LuncherError(
            f"the model uses ONNX opset {opset}; ONNX Runtime 1.19 supports up to {MAX_OPSET}"
        )
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


def _float_initializers(model: onnx.ModelProto) -> dict[str, TensorProto]:
    return {
        t.name: t
        for t in model.graph.initializer
        if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
    }


def analyze(model: onnx.ModelProto) -> Analysis:
    graph = model.graph
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
    layers = _layers(model)
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
        kind = TensorProto.DataType.Name(elem) if elem else "unknown"
        raise LuncherError(
            f"input {value.name!r} is not an image: expected float32 with 4 dimensions, "
            f"got {kind.lower()} with shape {dims}"
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


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def _logits_of(model: onnx.ModelProto, output: str) -> tuple[str, bool]:
    """The tensor holding the logits, and whether the output is Softmax probabilities."""
    producers = _producers(model)
    name = output
    node = producers.get(name)
    while node is not None and node.op_type in PASS_THROUGH_OPS:
        name = node.input[0]
        node = producers.get(name)
    if node is not None and node.op_type == "Softmax":
        # CrossEntropyLoss expects logits: train on the Softmax's input.
        return node.input[0], True
    return output, False


def _layers(model: onnx.ModelProto) -> list[Layer]:
    weights = _float_initializers(model)
    layers: list[Layer] = []
    current: dict[str, Any] | None = None
    last_output: str | None = None
    for index, node in enumerate(model.graph.node):
        held = [n for n in node.input if n in weights and _size(weights[n]) > 1]
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
            if current is not None:
                layers.append(_finish(current))
            current = {
                "name": node.name or held[0],
                "op": node.op_type,
                "first_node": index,
                "data_input": data_inputs[0] if data_inputs else "",
                "params": 0,
                "trainable": [],
            }
        assert current is not None
        if attached:
            current["op"] = f"{current['op']}+{node.op_type}"
        current["params"] += sum(_size(weights[n]) for n in held)
        if node.op_type not in NON_TRAINABLE_OPS:
            current["trainable"].extend(n for n in held if n not in current["trainable"])
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
        raise LuncherError("--trainable-layers must be at least 1")
    if trainable_layers > len(layers):
        raise LuncherError(
            f"--trainable-layers {trainable_layers} is more than the {len(layers)} "
            "layers with weights in this model"
        )
    trainable = layers[-trainable_layers:]
    cut = trainable[0].data_input
    if not cut:
        raise LuncherError(f"cannot find the data input of layer {trainable[0].name!r}")
    # The extractor needs the shapes of the tensors where it cuts.
    inferred = onnx.shape_inference.infer_shapes(model)
    head = _extract(inferred, [cut], [analysis.logits_name])
    _check_closed(head, cut, trainable_layers)
    _make_batch_dynamic(head)
    frozen = None
    if cut != analysis.input.name:
        frozen = _extract(inferred, [analysis.input.name], [cut])
    params = tuple(name for layer in trainable for name in layer.trainable_names)
    return Split(frozen=frozen, head=head, split_tensor=cut, trainable_params=params)


def _extract(model: onnx.ModelProto, inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
    extractor = onnx.utils.Extractor(model)
    part = extractor.extract_model(inputs, outputs)
    part.ir_version = model.ir_version
    del part.metadata_props[:]
    return part


def _check_closed(head: onnx.ModelProto, cut: str, n: int) -> None:
    """The head must depend on the cut tensor alone (no skip connection around it)."""
    available = {cut} | {t.name for t in head.graph.initializer}
    for node in head.graph.node:
        for name in node.input:
            if name and name not in available:
                raise LuncherError(
                    f"the last {n} layers cannot be split from the rest at one tensor "
                    f"(they also read {name!r}); choose a different --trainable-layers"
                )
        available.update(node.output)


def _make_batch_dynamic(head: onnx.ModelProto) -> None:
    """Let the head train on batches even when the original was exported for batch 1."""
    for value in list(head.graph.input) + list(head.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "batch"
    del head.graph.value_info[:]


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


def external_locations(model: onnx.ModelProto) -> set[str]:
    """The external data files the model's initializers name (relative to the model)."""
    found = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    found.add(entry.value)
    return found


def metadata_labels(metadata: dict[str, str]) -> list[str] | None:
    for key in ("labels", "classes", "class_names"):
        raw = metadata.get(key)
        if not raw:
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw.split(",")
        if isinstance(value, dict):  # {"0": "cat", ...}
            value = [value[k] for k in sorted(value, key=lambda k: int(k))]
        if isinstance(value, list) and value:
            return [str(v).strip() for v in value]
    return None


def metadata_preprocessing(metadata: dict[str, str]) -> dict[str, Any]:
    raw = metadata.get("preprocessing")
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise LuncherError("the model's 'preprocessing' metadata is not valid JSON") from None
    if not isinstance(value, dict):
        raise LuncherError("the model's 'preprocessing' metadata must be a JSON object")
    return value


def class_axes(model: onnx.ModelProto, num_classes: int) -> dict[str, int]:
    """For each weight of the last layer, the axis that has one entry per class."""
    layers = _layers(model)
    if not layers:
        raise LuncherError("the model has no layer with weights to grow")
    weights = _float_initializers(model)
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
    for name, axis in axes.items():
        old = numpy_helper.to_array(model.graph.initializer[index[name]])
        pad = [(0, 0)] * old.ndim
        pad[axis] = (0, extra)
        grown = np.pad(old, pad)
        model.graph.initializer[index[name]].CopyFrom(numpy_helper.from_array(grown, name))
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        if len(dims) == 2 and dims[1].HasField("dim_value"):
            dims[1].dim_value = dims[1].dim_value + extra
    del model.graph.value_info[:]


def add_memory(
    model: onnx.ModelProto,
    features: str,
    logits: str,
    memory: np.ndarray,
    classes: np.ndarray,
    num_classes: int,
    threshold: float,
    strength: float,
    replay: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """Put a nearest-neighbour memory of the user's examples in front of the logits.

    For each class c: `best` is the highest cosine similarity between the photo's head
    input and the user's examples of c; `floor` is the threshold, or, if higher, the
    similarity to the closest replayed base example of another class. Where best exceeds
    floor, c's logit rises by `strength` per unit above it. So a photo leans to the user's
    label only when it is nearer to the user's photos than to anything the base knows
    under another label: held-out photos of the user's dish flip, the base's own
    look-alikes (beignets next to pancakes) keep their label.

    memory: (M, ...) head inputs; classes: (M,) class indices; replay: the same for the
    base's replay set, or None.
    """
    prefix = MEMORY_PREFIX
    make = onnx.helper.make_node
    opset = default_opset(model)
    initializers = [
        numpy_helper.from_array(np.array(threshold, np.float32), f"{prefix}/threshold"),
        numpy_helper.from_array(np.array(strength, np.float32), f"{prefix}/strength"),
        numpy_helper.from_array(np.array([1], np.int64), f"{prefix}/axis1"),
        numpy_helper.from_array(np.array([2], np.int64), f"{prefix}/axis2"),
    ]
    nodes = [
        make("Flatten", [features], [f"{prefix}/flat"], axis=1),
        make("LpNormalization", [f"{prefix}/flat"], [f"{prefix}/unit"], axis=1, p=2),
    ]

    def best_per_class(name: str, rows: np.ndarray, keep: np.ndarray) -> str:
        """(N, C): max similarity to the rows where keep[c, m] is true."""
        unit, mask = memory_tensors(rows, keep)
        initializers.extend(
            [
                numpy_helper.from_array(unit, f"{prefix}/{name}_rows"),
                numpy_helper.from_array(mask, f"{prefix}/{name}_mask"),
            ]
        )
        p = f"{prefix}/{name}"
        nodes.extend(
            [
                make("MatMul", [f"{prefix}/unit", f"{p}_rows"], [f"{p}_similarity"]),
                make("Unsqueeze", [f"{p}_similarity", f"{prefix}/axis1"], [f"{p}_per_class"]),
                make("Add", [f"{p}_per_class", f"{p}_mask"], [f"{p}_masked"]),
                make("ReduceMax", [f"{p}_masked"], [f"{p}_best"], axes=[2], keepdims=0)
                if opset < 18
                else make(
                    "ReduceMax", [f"{p}_masked", f"{prefix}/axis2"], [f"{p}_best"], keepdims=0
                ),
            ]
        )
        return f"{p}_best"

    class_ids = np.arange(num_classes)[:, None]
    best = best_per_class("personal", memory, classes[None, :] == class_ids)
    floor = f"{prefix}/threshold"
    if replay is not None and len(replay[0]):
        nearest_other = best_per_class("replay", replay[0], replay[1][None, :] != class_ids)
        nodes.append(make("Max", [nearest_other, floor], [f"{prefix}/floor"]))
        floor = f"{prefix}/floor"
    head_logits = f"{prefix}/head_logits"
    for node in model.graph.node:
        for i, name in enumerate(node.output):
            if name == logits:
                node.output[i] = head_logits
    nodes.extend(
        [
            make("Sub", [best, floor], [f"{prefix}/excess"]),
            make("Relu", [f"{prefix}/excess"], [f"{prefix}/above"]),
            make("Mul", [f"{prefix}/above", f"{prefix}/strength"], [f"{prefix}/bonus"]),
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
