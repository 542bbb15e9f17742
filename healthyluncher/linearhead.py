"""A head that is one linear layer (Gemm, or MatMul + Add): its description and detection."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from healthyluncher.errors import LuncherError

if TYPE_CHECKING:
    import onnx

LinearOp = Literal["Gemm", "MatMul"]


@dataclass(frozen=True)
class LinearHead:
    """A head that is one linear layer from D features to C logits.

    `op="Gemm"`: logits = alpha * x @ op(W) + beta * b with op(W) = W.T when `trans_b`
    (W is (C, D)) and W otherwise (W is (D, C)); transA is always 0. `op="MatMul"`:
    logits = x @ W (+ b when an Add follows), W (D, C), alpha = beta = 1, trans_b False.
    `bias` is None when the layer has none; a bias has C entries, shaped (C,) or (1, C).
    """

    op: LinearOp
    weight: str
    bias: str | None
    features: int
    classes: int
    trans_b: bool = False
    alpha: float = 1.0
    beta: float = 1.0

    def __post_init__(self) -> None:
        if self.op not in ("Gemm", "MatMul"):
            raise LuncherError(f"linear head: op must be 'Gemm' or 'MatMul', not {self.op!r}")
        if not isinstance(self.weight, str) or not self.weight:
            raise LuncherError("linear head: the weight name must be a non-empty string")
        if self.bias is not None and (not isinstance(self.bias, str) or not self.bias):
            raise LuncherError("linear head: the bias name must be a non-empty string or null")
        if self.bias == self.weight:
            raise LuncherError("linear head: the weight and the bias have the same name")
        for key in ("features", "classes"):
            value = getattr(self, key)
            # bool is an int subclass: refuse `true` where a count belongs.
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LuncherError(f"linear head: {key} must be a positive integer, not {value!r}")
        if not isinstance(self.trans_b, bool):
            raise LuncherError(f"linear head: trans_b must be true or false, not {self.trans_b!r}")
        for key in ("alpha", "beta"):
            value = getattr(self, key)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise LuncherError(f"linear head: {key} must be a finite number, not {value!r}")
        if self.op == "MatMul" and (self.trans_b or self.alpha != 1.0 or self.beta != 1.0):
            raise LuncherError("linear head: MatMul has no trans_b, alpha or beta")

    @property
    def weight_shape(self) -> tuple[int, int]:
        if self.trans_b:
            return (self.classes, self.features)
        return (self.features, self.classes)

    @property
    def param_names(self) -> tuple[str, ...]:
        return (self.weight,) if self.bias is None else (self.weight, self.bias)

    def to_json(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "weight": self.weight,
            "bias": self.bias,
            "features": self.features,
            "classes": self.classes,
            "trans_b": self.trans_b,
            "alpha": float(self.alpha),
            "beta": float(self.beta),
        }

    @classmethod
    def from_json(cls, data: Any) -> LinearHead:
        """The head described by `to_json()`'s output; LuncherError on anything else.
        Unknown keys are ignored (as Hyperparameters.from_json does), missing ones refused."""
        if not isinstance(data, dict):
            raise LuncherError("linear head: expected a JSON object")
        keys = ("op", "weight", "bias", "features", "classes", "trans_b", "alpha", "beta")
        missing = [key for key in keys if key not in data]
        if missing:
            raise LuncherError(f"linear head: missing {', '.join(missing)}")
        # JSON has one number type: 1 and 1.0 both mean a float for alpha and beta, and
        # __post_init__ refuses bools, NaN and infinities.
        return cls(**{key: data[key] for key in keys})

    def with_extra_classes(self, extra: int) -> LinearHead:
        """This head with `extra` more classes (the description to go with `grown`)."""
        _check_extra(extra)
        return LinearHead(
            op=self.op,
            weight=self.weight,
            bias=self.bias,
            features=self.features,
            classes=self.classes + extra,
            trans_b=self.trans_b,
            alpha=self.alpha,
            beta=self.beta,
        )

    def grown(self, extra: int, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`params` with `extra` more classes, as heads.grow_classes grows the ONNX head:
        the new classes' rows (or columns) of the weight and entries of the bias are zero, so
        the old classes keep their weights exactly and a new class starts from a neutral
        score. Dtypes are kept; the result goes with `with_extra_classes(extra)`."""
        _check_extra(extra)
        checked = self._checked(params)
        grown: dict[str, np.ndarray] = {}
        for name, value in checked.items():
            # The class axis: the weight's per trans_b (heads.class_axes), the bias's last.
            axis = 0 if (name == self.weight and self.trans_b) else value.ndim - 1
            pad = [(0, 0)] * value.ndim
            pad[axis] = (0, extra)
            grown[name] = np.pad(value, pad)
        return grown

    def logits(self, params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
        """The layer's output for inputs x (N, D) with these parameters, in float32 as
        ONNX Runtime computes it (the sums in float64, rounded once)."""
        checked = self._checked(params)
        weight = checked[self.weight].astype(np.float64)
        out = x.astype(np.float64) @ (weight.T if self.trans_b else weight)
        if self.alpha != 1.0:
            out *= self.alpha
        if self.bias is not None:
            out += self.beta * checked[self.bias].astype(np.float64).reshape(-1)
        with np.errstate(over="ignore"):  # inf, as ONNX Runtime gives: callers check
            return out.astype(np.float32)

    def _checked(self, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`params` as arrays, refused unless they are exactly this head's weight and bias."""
        if set(params) != set(self.param_names):
            raise LuncherError(
                f"linear head: expected the parameters {', '.join(self.param_names)}, "
                f"got {', '.join(sorted(params)) or 'none'}"
            )
        arrays = {name: np.asarray(params[name]) for name in self.param_names}
        weight = arrays[self.weight]
        if weight.shape != self.weight_shape:
            raise LuncherError(
                f"linear head: weight {self.weight!r} has shape {weight.shape}, "
                f"expected {self.weight_shape}"
            )
        if self.bias is not None:
            bias = arrays[self.bias]
            if bias.shape not in ((self.classes,), (1, self.classes)):
                raise LuncherError(
                    f"linear head: bias {self.bias!r} has shape {bias.shape}, "
                    f"expected ({self.classes},)"
                )
        return arrays


def _check_extra(extra: int) -> None:
    if isinstance(extra, bool) or not isinstance(extra, int) or extra < 0:
        raise LuncherError(f"cannot grow a head by {extra!r} classes")


def linear_head_of(head: onnx.ModelProto, trainable_params: tuple[str, ...]) -> LinearHead | None:
    """The head as one linear layer when it is exactly that, else None (then train with ORT).

    Accepted: one float32 input of rank 2 (batch, D); a Gemm (transA 0) of it with an
    initializer, with or without a bias initializer, or a MatMul of it with an initializer
    optionally followed by an Add of a bias initializer; then Identity nodes only, up to the
    one output (the logits, often an intermediate tensor of the full model, whose Softmax the
    split left out). The trainable parameters must be exactly the weight and the bias: a
    frozen bias would need a trainer that keeps it, and more names mean more layers.
    """
    from onnx import TensorProto

    graph = head.graph
    inits = {t.name: t for t in graph.initializer}
    inputs = [value for value in graph.input if value.name not in inits]
    if len(inputs) != 1 or len(graph.output) != 1 or not graph.node:
        return None
    x = inputs[0]
    tensor_type = x.type.tensor_type
    if tensor_type.elem_type != TensorProto.FLOAT or not tensor_type.HasField("shape"):
        return None
    dims = tensor_type.shape.dim
    if len(dims) != 2:
        return None
    nodes = list(graph.node)
    if any(node.domain not in ("", "ai.onnx") for node in nodes):
        return None
    first = nodes[0]
    if len(first.output) != 1:
        return None

    def float_init(name: str, rank: tuple[int, ...]) -> list[int] | None:
        tensor = inits.get(name)
        if tensor is None or tensor.data_type != TensorProto.FLOAT:
            return None
        shape = [int(d) for d in tensor.dims]
        return shape if len(shape) in rank else None

    bias: str | None = None
    trans_b = False
    alpha = beta = 1.0
    rest = nodes[1:]
    if first.op_type == "Gemm":
        if len(first.input) not in (2, 3) or first.input[0] != x.name:
            return None
        attrs = {a.name: a for a in first.attribute}
        if "transA" in attrs and attrs["transA"].i != 0:
            return None
        trans_b = "transB" in attrs and attrs["transB"].i != 0
        alpha = float(attrs["alpha"].f) if "alpha" in attrs else 1.0
        beta = float(attrs["beta"].f) if "beta" in attrs else 1.0
        weight = first.input[1]
        if len(first.input) == 3 and first.input[2]:
            bias = first.input[2]
    elif first.op_type == "MatMul":
        if len(first.input) != 2 or first.input[0] != x.name:
            return None
        weight = first.input[1]
        if rest and rest[0].op_type == "Add":
            add = rest[0]
            others = [name for name in add.input if name != first.output[0]]
            if len(add.input) != 2 or len(others) != 1 or len(add.output) != 1:
                return None
            bias = others[0]
            rest = rest[1:]
    else:
        return None
    shape = float_init(weight, (2,))
    if shape is None:
        return None
    features, classes = (shape[1], shape[0]) if trans_b else (shape[0], shape[1])
    if features < 1 or classes < 1:
        return None
    if dims[1].HasField("dim_value") and dims[1].dim_value != features:
        return None
    if bias is not None:
        bias_shape = float_init(bias, (1, 2))
        if bias_shape not in ([classes], [1, classes]) or bias == weight:
            return None
    if sorted(trainable_params) != sorted((weight,) if bias is None else (weight, bias)):
        return None
    last = first.output[0] if first.op_type == "Gemm" or bias is None else nodes[1].output[0]
    for node in rest:
        # Identity, or a Cast to float32 of what is float32 already (a float16 model's output
        # cast, once its head is float32): both pass the logits through unchanged.
        passes = node.op_type == "Identity" or (
            node.op_type == "Cast"
            and any(a.name == "to" and a.i == TensorProto.FLOAT for a in node.attribute)
        )
        if not passes or list(node.input) != [last] or len(node.output) != 1:
            return None
        last = node.output[0]
    if graph.output[0].name != last:
        return None
    return LinearHead(
        op="Gemm" if first.op_type == "Gemm" else "MatMul",
        weight=weight,
        bias=bias,
        features=features,
        classes=classes,
        trans_b=trans_b,
        alpha=alpha,
        beta=beta,
    )
