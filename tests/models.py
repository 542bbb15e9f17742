"""Tiny ONNX classifiers built with onnx.helper, shaped like real exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SIZE = 16  # input height and width


def save(model: onnx.ModelProto, path: Path, labels: list[str] | None) -> Path:
    """Checked, at IR 10, with the labels in its metadata (None: unnamed classes)."""
    if labels is not None:
        helper.set_model_props(model, {"labels": json.dumps(labels)})
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _colour_conv(rng: np.random.Generator, channels: int) -> np.ndarray:
    """3x3 conv filters: the first three pass the mean colour through, the rest are random."""
    w = rng.normal(0, 0.1, (channels, 3, 3, 3)).astype(np.float32)
    for c in range(3):
        w[c] = 0
        w[c, c] = 1.0 / 9
    return w


def pytorch_style(
    path: Path,
    labels: list[str] | None = ("healthy", "fast_food"),  # type: ignore[assignment]
    *,
    batch: int | str = "N",
    classes: int = 2,
    seed: int = 0,
    gain: float = 1.0,
    offset: float = 0.5,
    size: int = SIZE,
) -> Path:
    """NCHW: Conv -> Relu -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm (logits).

    `gain` and `offset` are the second conv's weight factor and bias: a large offset with a
    small gain gives the huge, alike features of a random-weight deep network."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(_colour_conv(rng, 8), "conv1.weight"),
        numpy_helper.from_array(np.zeros(8, np.float32), "conv1.bias"),
        numpy_helper.from_array(
            (gain * rng.normal(0, 0.3, (8, 8, 1, 1))).astype(np.float32), "conv2.weight"
        ),
        numpy_helper.from_array(np.full(8, offset, np.float32), "conv2.bias"),
        numpy_helper.from_array(rng.normal(0, 0.1, (classes, 8)).astype(np.float32), "fc.weight"),
        numpy_helper.from_array(np.zeros(classes, np.float32), "fc.bias"),
    ]
    nodes = [
        helper.make_node(
            "Conv", ["image", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", pads=[1, 1, 1, 1]
        ),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["features"], name="flatten"),
        helper.make_node(
            "Gemm", ["features", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_pytorch",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return save(model, path, list(labels) if labels is not None else None)


def keras_style(
    path: Path,
    labels: list[str] | None = ("healthy", "fast_food"),  # type: ignore[assignment]
    *,
    seed: int = 1,
    convs: int = 1,
) -> Path:
    """NHWC: Transpose -> Conv -> Relu -> ReduceMean -> MatMul + Add -> Softmax.

    `convs=2` adds a 1x1 Conv -> Relu after the first Relu."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(_colour_conv(rng, 6), "conv/kernel"),
        numpy_helper.from_array(np.zeros(6, np.float32), "conv/bias"),
        numpy_helper.from_array(rng.normal(0, 0.1, (6, 2)).astype(np.float32), "dense/kernel"),
        numpy_helper.from_array(np.zeros(2, np.float32), "dense/bias"),
        numpy_helper.from_array(np.array([-1, 6], np.int64), "flat_shape"),
    ]
    nodes = [
        helper.make_node("Transpose", ["input_1"], ["nchw"], perm=[0, 3, 1, 2], name="to_nchw"),
        helper.make_node(
            "Conv", ["nchw", "conv/kernel", "conv/bias"], ["c"], name="conv", pads=[1, 1, 1, 1]
        ),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
    ]
    if convs == 2:
        kernel = rng.normal(0, 0.3, (6, 6, 1, 1)).astype(np.float32)
        inits += [
            numpy_helper.from_array(kernel, "conv_1/kernel"),
            numpy_helper.from_array(np.full(6, 0.5, np.float32), "conv_1/bias"),
        ]
        nodes[-1:] = [
            helper.make_node("Conv", ["r", "conv_1/kernel", "conv_1/bias"], ["c1"], name="conv_1"),
            helper.make_node("Relu", ["c1"], ["r1"], name="relu_1"),
            helper.make_node("GlobalAveragePool", ["r1"], ["p"], name="gap"),
        ]
    nodes += [
        helper.make_node("Reshape", ["p", "flat_shape"], ["features"], name="flatten"),
        helper.make_node("MatMul", ["features", "dense/kernel"], ["mm"], name="dense/MatMul"),
        helper.make_node("Add", ["mm", "dense/bias"], ["dense_out"], name="dense/BiasAdd"),
        helper.make_node("Softmax", ["dense_out"], ["probabilities"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_keras",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["batch", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return save(model, path, list(labels) if labels is not None else None)


def distilled_style(
    path: Path,
    labels: list[str] | None = ("healthy", "fast_food"),  # type: ignore[assignment]
    *,
    classes: int = 2,
    constant_node: bool = True,
) -> Path:
    """A distilled DeiT's ending: two linear heads on two different tensors, averaged.

    pytorch_style's body, then (fc(average-pooled) + fc_dist(max-pooled)) / 2, the 2 a
    Constant node as torch exports it (or an initializer)."""
    model = onnx.load(str(pytorch_style(path, None, classes=classes)))
    rng = np.random.default_rng(5)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(
                rng.normal(0, 0.3, (classes, 8)).astype(np.float32), "fc_dist.weight"
            ),
            numpy_helper.from_array(rng.normal(0, 0.1, classes).astype(np.float32), "fc_dist.bias"),
        ]
    )
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    if not constant_node:
        model.graph.initializer.append(two)
    model.graph.node[-1].output[0] = "cls_logits"
    model.graph.node.extend(
        [
            *([helper.make_node("Constant", [], ["two"], value=two)] if constant_node else []),
            helper.make_node("GlobalMaxPool", ["r2"], ["max_pooled"], name="max_pool"),
            helper.make_node("Flatten", ["max_pooled"], ["dist_features"], name="flatten_dist"),
            helper.make_node(
                "Gemm",
                ["dist_features", "fc_dist.weight", "fc_dist.bias"],
                ["dist_logits"],
                name="fc_dist",
                transB=1,
            ),
            helper.make_node("Add", ["cls_logits", "dist_logits"], ["logit_sum"], name="add"),
            helper.make_node("Div", ["logit_sum", "two"], ["logits"], name="average"),
        ]
    )
    return save(model, path, list(labels) if labels is not None else None)


def batch_one_head(
    path: Path,
    labels: list[str] | None = ("healthy", "fast_food"),  # type: ignore[assignment]
    *,
    classes: int = 2,
) -> Path:
    """Conv -> Relu -> GlobalAveragePool -> Reshape to (1, -1) -> Gemm: an exporter baked
    batch 1 into the Reshape (as torch's dynamo exporter does for a batch-1 export), so a
    head cut before the conv runs one sample at a time."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "c.w"),
        numpy_helper.from_array(np.zeros(4, np.float32), "c.b"),
        numpy_helper.from_array(np.array([1, -1], np.int64), "shape"),
        numpy_helper.from_array(rng.normal(0, 0.3, (classes, 4)).astype(np.float32), "fc.w"),
        numpy_helper.from_array(np.zeros(classes, np.float32), "fc.b"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "c.w", "c.b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Reshape", ["p", "shape"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "batch_one",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return save(model, path, list(labels) if labels is not None else None)


def dynamo_squeezenet_style(
    path: Path,
    labels: list[str] | None = ("healthy", "fast_food"),  # type: ignore[assignment]
    *,
    classes: int = 2,
    batch: int | str = 1,
) -> Path:
    """Conv -> Relu -> 1x1 Conv (the classifier) -> Relu -> GlobalAveragePool -> Reshape
    to (1, classes), as torch's dynamo exporter writes torchvision's SqueezeNet: the class
    count is baked into the Reshape (and so is a fixed batch; -1 where it is dynamic)."""
    rng = np.random.default_rng(0)
    first = 1 if isinstance(batch, int) else -1
    inits = [
        numpy_helper.from_array(_colour_conv(rng, 8), "conv.w"),
        numpy_helper.from_array(np.zeros(8, np.float32), "conv.b"),
        numpy_helper.from_array(rng.normal(0, 0.3, (classes, 8, 1, 1)).astype(np.float32), "cls.w"),
        numpy_helper.from_array(np.full(classes, 0.1, np.float32), "cls.b"),
        numpy_helper.from_array(np.array([first, classes], np.int64), "val_9"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "conv.w", "conv.b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Conv", ["r", "cls.w", "cls.b"], ["k"]),
        helper.make_node("Relu", ["k"], ["kr"]),
        helper.make_node("GlobalAveragePool", ["kr"], ["mean"]),
        helper.make_node("Reshape", ["mean", "val_9"], ["logits"], allowzero=1),
    ]
    graph = helper.make_graph(
        nodes,
        "dynamo_squeezenet",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return save(model, path, list(labels) if labels is not None else None)


def levit_style(path: Path, labels: list[str] | None = ("healthy", "fast_food")) -> Path:  # type: ignore[assignment]
    """Patches -> MatMul on (batch, tokens, channels) -> Reshape to (-1, channels) ->
    BatchNormalization -> back to tokens -> mean -> Gemm, as torch's dynamo exporter
    writes LeViT's Linear + BatchNorm1d. ONNX Runtime 1.19's MatMulBnFusion optimizer
    fuses the MatMul and the BatchNormalization into a Gemm of a rank-3 input and then
    refuses the model it made ("First input does not have rank 2")."""
    rng = np.random.default_rng(0)
    tokens, channels = (SIZE // 4) ** 2, 8
    inits = [
        numpy_helper.from_array(
            rng.normal(0, 0.3, (channels, 3, 4, 4)).astype(np.float32), "patch.w"
        ),
        numpy_helper.from_array(np.zeros(channels, np.float32), "patch.b"),
        numpy_helper.from_array(np.array([0, channels, tokens], np.int64), "to_tokens"),
        numpy_helper.from_array(
            rng.normal(0, 0.3, (channels, channels)).astype(np.float32), "mm.w"
        ),
        numpy_helper.from_array(np.array([-1, channels], np.int64), "flat"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, channels).astype(np.float32), "bn.scale"),
        numpy_helper.from_array(rng.normal(0, 0.1, channels).astype(np.float32), "bn.bias"),
        numpy_helper.from_array(rng.normal(0, 0.1, channels).astype(np.float32), "bn.mean"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, channels).astype(np.float32), "bn.var"),
        numpy_helper.from_array(np.array([-1, tokens, channels], np.int64), "unflat"),
        numpy_helper.from_array(np.array([1], np.int64), "token_axis"),
        numpy_helper.from_array(rng.normal(0, 0.3, (2, channels)).astype(np.float32), "fc.w"),
        numpy_helper.from_array(np.zeros(2, np.float32), "fc.b"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "patch.w", "patch.b"], ["p"], strides=[4, 4]),
        helper.make_node("Reshape", ["p", "to_tokens"], ["pt"]),
        helper.make_node("Transpose", ["pt"], ["t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["t", "mm.w"], ["m"]),
        helper.make_node("Reshape", ["m", "flat"], ["mf"]),
        helper.make_node(
            "BatchNormalization", ["mf", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["bn"]
        ),
        helper.make_node("Reshape", ["bn", "unflat"], ["u"]),
        helper.make_node("ReduceMean", ["u", "token_axis"], ["pooled"], keepdims=0),
        helper.make_node("Gemm", ["pooled", "fc.w", "fc.b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "levit_style",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return save(model, path, list(labels) if labels is not None else None)
