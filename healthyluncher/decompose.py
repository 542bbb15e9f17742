"""The head rewritten for ONNX Runtime training: ops it cannot differentiate, spelled in ops
it can, wherever that is exact.

Measured with onnxruntime-training-cpu 1.19.2 (artifacts generated for a tiny graph with
the op between a trained Conv and the classifier, then one training step):

- no gradient at all: HardSigmoid, HardSwish, Softplus, Softsign, Elu, Selu, Celu, Mish,
  PRelu, ThresholdedRelu, InstanceNormalization, LpNormalization, GlobalMaxPool, Sum, Mean,
  ReduceSumSquare, ReduceL1 (all rewritten here), and ReduceMax, ReduceMin, ReduceProd,
  Floor, Ceil, Round, Sign, Mod, Einsum, LRN, CumSum, DepthToSpace, Hardmax, LpPool,
  GlobalLpPool, Shrink, Atan, Tan, Sinh, Cosh, Asinh (refused);
- a gradient whose builder fails on an internal assertion: LayerNormalization with one
  output (as exported), Dropout given a ratio input; rewritten;
- a gradient without a CPU kernel, so the training session cannot be created: Resize,
  ConvTranspose (refused);
- AveragePool: the first training step kills the process (SIGFPE) when the batch is
  dynamic; rewritten as a depthwise Conv where that is exact, refused otherwise;
- BatchNormalization trains, but ORT switches it to batch statistics while training (the
  loss differs from the model's own); rewritten in eval form, so that its scale and bias
  train and its statistics stay the model's.

Gradients exist (measured) for Conv, Gemm, MatMul, Add, Sub, Mul, Div, Pow, Sqrt, Exp, Log,
Reciprocal, Abs, Neg, Erf, Sin, Cos, Relu, LeakyRelu, Sigmoid, Tanh, Clip, Min, Max, Where,
Softmax, LogSoftmax, ReduceMean, ReduceSum, ReduceL2, ReduceLogSumExp, MaxPool,
GlobalAveragePool, Flatten, Reshape, Transpose, Squeeze, Unsqueeze, Concat, Split, Slice,
Gather, Expand, Tile, Pad, Cast, Trilu, ScatterND, Gelu (opset 20, both approximations) and
com.microsoft Gelu, FastGelu, BiasGelu and QuickGelu: those stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from healthyluncher.errors import LuncherError

NO_GRADIENT = frozenset(
    {
        "ReduceMax", "ReduceMin", "ReduceProd", "Floor", "Ceil", "Round", "Sign", "Mod",
        "Einsum", "LRN", "CumSum", "DepthToSpace", "Hardmax", "LpPool", "GlobalLpPool",
        "Shrink", "Atan", "Tan", "Sinh", "Cosh", "Asinh",
    }
)  # fmt: skip
NO_GRADIENT_KERNEL = frozenset({"Resize", "Upsample", "ConvTranspose"})
# Loss in ONNX Runtime training (SoftmaxCrossEntropyLoss) needs opset 12; older heads are
# converted to this one for training.
TRAINING_OPSET = 13


def blocker(node: onnx.NodeProto, used: AbstractSet[str]) -> str | None:
    """Why ONNX Runtime cannot train through `node`, even rewritten; None if it can.
    `used`: the tensors that some node or graph output reads."""
    if node.domain not in ("", "ai.onnx"):
        return None
    op = node.op_type
    if op in NO_GRADIENT:
        return "has no gradient in ONNX Runtime training"
    if op in NO_GRADIENT_KERNEL:
        return "has no CPU kernel for its gradient in ONNX Runtime training"
    if op in _REWRITES and any(name in used for name in node.output[1:]):
        return "has extra outputs that the model reads, so it cannot be rewritten for training"
    if op == "BatchNormalization" and _attr(node, "training_mode", 0):
        return "was exported in training mode (export the model in eval mode)"
    if op == "AveragePool":
        return _average_pool_problem(node)
    return None


def for_training(head: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `head` with the same outputs (within float rounding) and the same weight
    names, whose every op ONNX Runtime training can differentiate (or a LuncherError
    naming the op that cannot be rewritten)."""
    model = onnx.ModelProto()
    model.CopyFrom(head)
    opset = _opset(model)
    if opset < 12:
        from onnx import version_converter

        try:
            model = version_converter.convert_version(model, TRAINING_OPSET)
        except Exception as exc:  # the converter raises its own untyped errors
            raise LuncherError(
                f"the trainable part uses ONNX opset {opset}; ONNX Runtime training needs 12 "
                f"or later, and converting it failed ({type(exc).__name__})"
            ) from exc
    if not any(
        _REWRITES.get(node.op_type) and node.domain in ("", "ai.onnx") for node in model.graph.node
    ):
        return model
    rewriter = _Rewriter(model)
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        rewrite = _REWRITES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rewrite is None:
            nodes.append(node)
            continue
        reason = blocker(node, rewriter.used)
        if reason is not None:
            raise LuncherError(f"the op {_describe(node)} in the trainable part {reason}")
        rewriter.out = []
        rewriter.prefix = node.name or node.op_type
        rewrite(rewriter, node)
        nodes.extend(rewriter.out)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(rewriter.constants)
    del model.graph.value_info[:]
    return model


def _describe(node: onnx.NodeProto) -> str:
    return f"{node.op_type} ({node.name!r})" if node.name else node.op_type


def _opset(model: onnx.ModelProto) -> int:
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


class _Rewriter:
    """Names, constants and shapes for rewriting the nodes of one model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.opset = _opset(model)
        self.taken = {t.name for t in graph.initializer} | {n.name for n in graph.node}
        self.taken |= {v.name for v in [*graph.input, *graph.output]}
        self.taken |= {name for n in graph.node for name in [*n.input, *n.output]}
        self.used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
        self.constants: list[TensorProto] = []
        self.out: list[onnx.NodeProto] = []
        self.prefix = "decomposed"  # names the new nodes after the one they replace
        self._model = model
        self._shapes: dict[str, list[int | None]] | None = None

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name

    def const(self, base: str, value: Any, dtype: Any = np.float32) -> str:
        name = self.fresh(base)
        self.constants.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def add(self, op: str, inputs: Sequence[str], out: str | None = None, **attrs: Any) -> str:
        """Append a node; returns its output (`out`, or a fresh name)."""
        base = f"{self.prefix}/{op}"
        output = out or self.fresh(base)
        self.out.append(helper.make_node(op, list(inputs), [output], self.fresh(base), **attrs))
        return output

    def shape(self, name: str) -> list[int | None] | None:
        if self._shapes is None:
            inferred = onnx.shape_inference.infer_shapes(self._model)
            graph = inferred.graph
            self._shapes = {}
            for value in [*graph.input, *graph.value_info, *graph.output]:
                if value.type.tensor_type.HasField("shape"):
                    dims = value.type.tensor_type.shape.dim
                    self._shapes[value.name] = [
                        d.dim_value if d.HasField("dim_value") else None for d in dims
                    ]
        return self._shapes.get(name)

    def rank(self, node: onnx.NodeProto) -> int:
        shape = self.shape(node.input[0])
        if shape is None:
            raise LuncherError(
                f"cannot rewrite the op {_describe(node)} for training: "
                f"the rank of its input {node.input[0]!r} is unknown"
            )
        return len(shape)

    def reduce(self, op: str, x: str, axes: Sequence[int], out: str | None = None) -> str:
        """`op` over `axes`, keeping them; axes are an input from opset 18 (13 for ReduceSum)."""
        if self.opset >= (13 if op == "ReduceSum" else 18):
            return self.add(op, [x, self.const("axes", list(axes), np.int64)], out, keepdims=1)
        return self.add(op, [x], out, axes=list(axes), keepdims=1)

    def clip01(self, x: str, out: str | None = None) -> str:
        return self.add("Clip", [x, self.const("zero", 0.0), self.const("one", 1.0)], out)

    def per_channel(self, name: str, rank: int) -> str:
        """A per-channel vector shaped to broadcast over axis 1 of a rank-`rank` tensor."""
        if rank <= 2:
            return name
        shape = self.const("channel_shape", [-1] + [1] * (rank - 2), np.int64)
        return self.add("Reshape", [name, shape])


Rewrite = Callable[[_Rewriter, onnx.NodeProto], object]


def _normalize(rw: _Rewriter, x: str, axes: Sequence[int], epsilon: float) -> str:
    """(x - mean) / sqrt(var + epsilon) over `axes`."""
    centred = rw.add("Sub", [x, rw.reduce("ReduceMean", x, axes)])
    variance = rw.reduce("ReduceMean", rw.add("Mul", [centred, centred]), axes)
    std = rw.add("Sqrt", [rw.add("Add", [variance, rw.const("epsilon", epsilon)])])
    return rw.add("Div", [centred, std])


def _layer_norm(rw: _Rewriter, node: onnx.NodeProto) -> None:
    axis = int(_attr(node, "axis", -1))
    axes = list(range(axis, 0)) if axis < 0 else list(range(axis, rw.rank(node)))
    normalized = _normalize(rw, node.input[0], axes, float(_attr(node, "epsilon", 1e-5)))
    has_bias = len(node.input) > 2 and node.input[2]
    scaled = rw.add("Mul", [normalized, node.input[1]], None if has_bias else node.output[0])
    if has_bias:
        rw.add("Add", [scaled, node.input[2]], node.output[0])


def _instance_norm(rw: _Rewriter, node: onnx.NodeProto) -> None:
    rank = rw.rank(node)
    normalized = _normalize(rw, node.input[0], range(2, rank), float(_attr(node, "epsilon", 1e-5)))
    scaled = rw.add("Mul", [normalized, rw.per_channel(node.input[1], rank)])
    rw.add("Add", [scaled, rw.per_channel(node.input[2], rank)], node.output[0])


def _batch_norm(rw: _Rewriter, node: onnx.NodeProto) -> None:
    """In eval form, from the model's statistics: ORT's own gradient would switch to the
    statistics of each training batch."""
    rank = rw.rank(node)
    x, scale, bias, mean, var = node.input[:5]
    centred = rw.add("Sub", [x, rw.per_channel(mean, rank)])
    epsilon = rw.const("epsilon", float(_attr(node, "epsilon", 1e-5)))
    std = rw.add("Sqrt", [rw.add("Add", [rw.per_channel(var, rank), epsilon])])
    scaled = rw.add("Mul", [rw.add("Div", [centred, std]), rw.per_channel(scale, rank)])
    rw.add("Add", [scaled, rw.per_channel(bias, rank)], node.output[0])


def _hard_sigmoid(rw: _Rewriter, x: str, alpha: float, beta: float, out: str | None) -> str:
    linear = rw.add("Add", [rw.add("Mul", [x, rw.const("alpha", alpha)]), rw.const("beta", beta)])
    return rw.clip01(linear, out)


def _softplus(rw: _Rewriter, x: str, out: str | None = None) -> str:
    """relu(x) + log(1 + exp(-|x|)): softplus without overflow."""
    tail = rw.add("Exp", [rw.add("Neg", [rw.add("Abs", [x])])])
    log = rw.add("Log", [rw.add("Add", [tail, rw.const("one", 1.0)])])
    return rw.add("Add", [rw.add("Relu", [x]), log], out)


def _activation(rw: _Rewriter, node: onnx.NodeProto) -> None:
    x, out, op = node.input[0], node.output[0], node.op_type
    if op == "HardSigmoid":
        alpha, beta = float(_attr(node, "alpha", 0.2)), float(_attr(node, "beta", 0.5))
        _hard_sigmoid(rw, x, alpha, beta, out)
    elif op == "HardSwish":
        rw.add("Mul", [x, _hard_sigmoid(rw, x, 1 / 6, 0.5, None)], out)
    elif op == "Softplus":
        _softplus(rw, x, out)
    elif op == "Mish":
        rw.add("Mul", [x, rw.add("Tanh", [_softplus(rw, x)])], out)
    elif op == "Softsign":
        rw.add("Div", [x, rw.add("Add", [rw.add("Abs", [x]), rw.const("one", 1.0)])], out)
    elif op == "ThresholdedRelu":
        above = rw.add("Greater", [x, rw.const("alpha", float(_attr(node, "alpha", 1.0)))])
        rw.add("Where", [above, x, rw.const("zero", 0.0)], out)
    elif op == "PRelu":  # relu(x) + slope * min(x, 0); the slope keeps its name and trains
        negative = rw.add("Mul", [rw.add("Min", [x, rw.const("zero", 0.0)]), node.input[1]])
        rw.add("Add", [rw.add("Relu", [x]), negative], out)
    elif op in ("Elu", "Selu", "Celu"):  # relu(x) + alpha * (exp(min(x, 0) [/ alpha]) - 1)
        alpha = float(_attr(node, "alpha", 1.67326319217681884765625 if op == "Selu" else 1.0))
        negative = rw.add("Min", [x, rw.const("zero", 0.0)])
        if op == "Celu":
            negative = rw.add("Div", [negative, rw.const("alpha", alpha)])
        shifted = rw.add("Sub", [rw.add("Exp", [negative]), rw.const("one", 1.0)])
        terms = [rw.add("Relu", [x]), rw.add("Mul", [shifted, rw.const("alpha", alpha)])]
        if op == "Selu":
            gamma = rw.const("gamma", float(_attr(node, "gamma", 1.05070102214813232421875)))
            rw.add("Mul", [rw.add("Add", terms), gamma], out)
        else:
            rw.add("Add", terms, out)
    else:  # Dropout: nothing in an exported model; ORT's gradient of it given a ratio fails
        rw.add("Identity", [x], out)


def _average_pool_problem(node: onnx.NodeProto) -> str | None:
    padded = any(_attr(node, "pads", [])) or _attr(node, "auto_pad", b"NOTSET") in (
        b"SAME_UPPER",
        b"SAME_LOWER",
    )
    if _attr(node, "ceil_mode", 0) or (padded and not _attr(node, "count_include_pad", 0)):
        return (
            "kills ONNX Runtime training with a dynamic batch, and with its padding or "
            "ceil_mode it cannot be rewritten as a convolution"
        )
    return None


def _average_pool(rw: _Rewriter, node: onnx.NodeProto) -> None:
    """A depthwise Conv with weights 1/k: the same sums, without ORT's AveragePoolGrad."""
    shape = rw.shape(node.input[0])
    if not shape or len(shape) < 3 or shape[1] is None:
        raise LuncherError(
            f"cannot rewrite the op {_describe(node)} for training: its channel count is unknown"
        )
    kernel = list(_attr(node, "kernel_shape", []))
    weight = np.full([shape[1], 1, *kernel], 1.0 / float(np.prod(kernel)), np.float32)
    attrs: dict[str, Any] = {"group": shape[1], "kernel_shape": kernel}
    for name in ("strides", "pads", "dilations", "auto_pad"):
        value = _attr(node, name, None)
        if value is not None:
            attrs[name] = value.decode() if isinstance(value, bytes) else value
    rw.add("Conv", [node.input[0], rw.const("average", weight)], node.output[0], **attrs)


def _global_max_pool(rw: _Rewriter, node: onnx.NodeProto) -> None:
    shape = rw.shape(node.input[0])
    if not shape or len(shape) < 3 or any(d is None for d in shape[2:]):
        raise LuncherError(
            f"cannot rewrite the op {_describe(node)} for training: "
            "its input's spatial size is unknown"
        )
    rw.add("MaxPool", [node.input[0]], node.output[0], kernel_shape=list(shape[2:]))


def _reduce_as_sum(rw: _Rewriter, node: onnx.NodeProto) -> None:
    """ReduceSumSquare and ReduceL1 as ReduceSum of x*x or |x|, with the same axes."""
    x = node.input[0]
    term = rw.add("Mul", [x, x]) if node.op_type == "ReduceSumSquare" else rw.add("Abs", [x])
    keepdims = int(_attr(node, "keepdims", 1))
    noop = int(_attr(node, "noop_with_empty_axes", 0))
    axes = _attr(node, "axes", None)
    inputs = [term]
    if len(node.input) > 1 and node.input[1]:
        inputs.append(node.input[1])
    elif axes is not None:
        inputs.append(rw.const("axes", list(axes), np.int64))
    extra = {"noop_with_empty_axes": noop} if noop else {}
    rw.add("ReduceSum", inputs, node.output[0], keepdims=keepdims, **extra)


def _lp_normalization(rw: _Rewriter, node: onnx.NodeProto) -> None:
    x, axis, p = node.input[0], int(_attr(node, "axis", -1)), int(_attr(node, "p", 2))
    if p == 2:
        norm = rw.reduce("ReduceL2", x, [axis])
    else:
        norm = rw.reduce("ReduceSum", rw.add("Abs", [x]), [axis])
    rw.add("Div", [x, norm], node.output[0])


def _sum_or_mean(rw: _Rewriter, node: onnx.NodeProto) -> None:
    terms = [name for name in node.input if name]
    total = terms[0]
    for i, term in enumerate(terms[1:], start=2):
        last = i == len(terms) and node.op_type == "Sum"
        total = rw.add("Add", [total, term], node.output[0] if last else None)
    if node.op_type == "Mean":
        rw.add("Div", [total, rw.const("count", float(len(terms)))], node.output[0])
    elif len(terms) == 1:
        rw.add("Identity", [total], node.output[0])


_REWRITES: dict[str, Rewrite] = {
    "LayerNormalization": _layer_norm,
    "InstanceNormalization": _instance_norm,
    "BatchNormalization": _batch_norm,
    "AveragePool": _average_pool,
    "GlobalMaxPool": _global_max_pool,
    "ReduceSumSquare": _reduce_as_sum,
    "ReduceL1": _reduce_as_sum,
    "LpNormalization": _lp_normalization,
    "Sum": _sum_or_mean,
    "Mean": _sum_or_mean,
    **dict.fromkeys(
        ["HardSigmoid", "HardSwish", "Softplus", "Mish", "Softsign", "ThresholdedRelu", "PRelu"]
        + ["Elu", "Selu", "Celu", "Dropout"],
        _activation,
    ),
}
