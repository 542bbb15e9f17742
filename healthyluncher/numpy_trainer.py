"""Retraining a head that is one linear layer with numpy alone, the way ONNX Runtime would.

onnxruntime-training stopped at 1.19.2 and has no wheel for CPython 3.13 or 3.14. A head that
is exactly one linear layer (Gemm, or MatMul + Add as Keras exports it) needs none of its
machinery: this module repeats `trainers.train` step for step (the same sampling stream, ORT's
`SoftmaxCrossEntropyLoss` with mean reduction, and the `AdamWOptimizer` / `SGDOptimizerV2`
kernels that `generate_artifacts` puts in the optimizer model, with their default settings),
so that a retrain gives the same weights, within float32 rounding, with or without ORT.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from healthyluncher.errors import LuncherError
from healthyluncher.settings import Hyperparameters
from healthyluncher.trainers import TrainingSet

if TYPE_CHECKING:
    import onnx

LinearOp = Literal["Gemm", "MatMul"]

# What onnxblock.optim.AdamW() (onnxruntime/training/onnxblock/optim/optim.py, 1.19.2) writes
# into the AdamWOptimizer node when `generate_artifacts` is given OptimType.AdamW: the node's
# attributes alpha, beta, epsilon, weight_decay, correct_bias and adam_mode=1. The kernel
# reads them as float32.
ADAMW_BETA1 = np.float32(0.9)
ADAMW_BETA2 = np.float32(0.999)
ADAMW_EPSILON = np.float32(1e-6)
ADAMW_WEIGHT_DECAY = np.float32(0.0)

# The loss and gradients are computed in float64 and rounded to float32 once. ORT computes
# them in float32 with MLAS, numpy's float32 BLAS would sum in yet another order, and neither
# reproduces ORT bit for bit. Measured against ORT: float64 gradients were slightly closer per
# step (D=1280, batches of 16: 1.5e-7 to 1.0e-6 apart at most, against 2.2e-7 to 1.4e-6 in
# float32) and the trained weights equally close either way (about 1e-7), so float64 is kept
# because its result hardly depends on which BLAS numpy was built with (OpenBLAS, Accelerate).
# The optimizer runs in float32 in ORT's operation order: its elementwise updates then round
# as ORT's kernels do (the same AdamW step in another order drifted about 25 times further).
_GRAD_DTYPE = np.float64


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
        if node.op_type != "Identity" or list(node.input) != [last] or len(node.output) != 1:
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


def train_linear(
    spec: LinearHead,
    start: dict[str, np.ndarray],
    data: TrainingSet,
    hp: Hyperparameters,
    *,
    batch_limit: int | None = None,
    on_epoch: Callable[[int, int, float], None] | None = None,
) -> tuple[dict[str, np.ndarray], float]:
    """Fit the head from `start` as `trainers.train` would with ONNX Runtime; returns the
    trained parameters (float32, the names and shapes of `start`) and the final epoch's mean
    loss.

    Everything that decides the result follows `trainers.train`: a numpy generator seeded
    with hp.seed, per epoch N draws weighted by `data.weights` (or a permutation when all
    weights are equal), batches of min(hp.batch_size, batch_limit), mean cross-entropy on
    the logits, and one AdamW or SGD step per batch at hp.learning_rate.
    """
    if len(data) == 0:
        raise LuncherError("nothing to train on")
    params = {
        name: np.array(value, dtype=np.float32) for name, value in spec._checked(start).items()
    }
    labels = np.asarray(data.labels)
    if labels.min() < 0 or labels.max() >= spec.classes:
        raise LuncherError(f"labels must lie in 0..{spec.classes - 1} for this head")
    inputs_shape = data.inputs.shape[1:]
    if inputs_shape != (spec.features,):
        raise LuncherError(
            f"the head takes {spec.features} features per example, not shape {inputs_shape}"
        )
    step = _optimizer(hp, params)
    batch = max(1, min(hp.batch_size, batch_limit or hp.batch_size))
    n = len(data)
    p = data.weights / data.weights.sum()
    data = data.joined()
    loss_mean = float("nan")
    rng = np.random.default_rng(hp.seed)
    # The same draws, in the same order, as trainers.train; its rule for weighted sampling
    # (trainers._weighted) is private, so it is repeated here: probabilities spread by more
    # than 1e-12.
    weighted = bool(np.ptp(p) > 1e-12)
    for epoch in range(hp.epochs):
        order = rng.choice(n, size=n, replace=True, p=p) if weighted else rng.permutation(n)
        losses = []
        for start_at in range(0, n, batch):
            idx = order[start_at : start_at + batch]
            loss, grads = _loss_and_gradients(spec, params, data.take(idx), labels[idx])
            step(grads)
            losses.append(loss)
        loss_mean = float(np.mean(losses))
        if on_epoch is not None:
            on_epoch(epoch + 1, hp.epochs, loss_mean)
    return {name: params[name] for name in start}, loss_mean


def _loss_and_gradients(
    spec: LinearHead, params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray
) -> tuple[float, dict[str, np.ndarray]]:
    """ORT's SoftmaxCrossEntropyLoss (reduction "mean", no class weights, no ignore_index:
    onnxblock.loss.CrossEntropyLoss's defaults) of one batch, and its gradients."""
    xs = x.astype(_GRAD_DTYPE)
    weight = params[spec.weight].astype(_GRAD_DTYPE)
    w = weight.T if spec.trans_b else weight  # (D, C)
    logits = xs @ w
    if spec.alpha != 1.0:
        logits *= spec.alpha
    if spec.bias is not None:
        logits += spec.beta * params[spec.bias].astype(_GRAD_DTYPE).reshape(-1)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_prob = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(len(y))
    # ORT returns the loss as float32: round it the same way before it is averaged.
    loss = float(np.float32(-log_prob[rows, y].mean()))
    d_logits = np.exp(log_prob)
    d_logits[rows, y] -= 1.0
    d_logits /= len(y)
    d_w = spec.alpha * (xs.T @ d_logits)  # (D, C)
    grads = {spec.weight: (d_w.T if spec.trans_b else d_w).astype(np.float32)}
    if spec.bias is not None:
        d_b = spec.beta * d_logits.sum(axis=0)
        grads[spec.bias] = d_b.reshape(params[spec.bias].shape).astype(np.float32)
    return loss, grads


def _optimizer(
    hp: Hyperparameters, params: dict[str, np.ndarray]
) -> Callable[[dict[str, np.ndarray]], None]:
    """One optimizer step that updates `params` in place, in float32 as ORT's CPU kernels."""
    # Optimizer.set_learning_rate stores a C++ float.
    lr = np.float32(hp.learning_rate)
    if hp.optimizer == "sgd":

        def sgd(grads: dict[str, np.ndarray]) -> None:
            # SGDOptimizerV2: w = w + (-lr * g).
            for name, g in grads.items():
                params[name] += -lr * g

        return sgd
    if hp.optimizer != "adamw":
        raise LuncherError(f"unknown optimizer {hp.optimizer!r}; expected adamw or sgd")
    m1 = {name: np.zeros_like(value) for name, value in params.items()}
    m2 = {name: np.zeros_like(value) for name, value in params.items()}
    one = np.float32(1.0)
    steps = 0

    def adamw(grads: dict[str, np.ndarray]) -> None:
        # AdamWOptimizer with adam_mode=1 (Hugging Face's AdamW) and correct_bias=1. The
        # training API passes the step count plus one, so the first step is 1. Each
        # expression keeps the kernel's float32 operation order.
        nonlocal steps
        steps += 1
        # 1.f - static_cast<float>(std::pow(alpha_, step)): the power in double.
        correction1 = one - np.float32(float(ADAMW_BETA1) ** steps)
        correction2 = one - np.float32(float(ADAMW_BETA2) ** steps)
        lr_corrected = lr * (np.sqrt(correction2) / correction1)
        for name, g in grads.items():
            w = params[name]
            m1[name] = ADAMW_BETA1 * m1[name] + (one - ADAMW_BETA1) * g
            m2[name] = ADAMW_BETA2 * m2[name] + (one - ADAMW_BETA2) * g * g
            w -= lr_corrected * m1[name] / (np.sqrt(m2[name]) + ADAMW_EPSILON)
            # Decoupled weight decay after the update, with the uncorrected rate.
            if ADAMW_WEIGHT_DECAY:
                w -= (lr * ADAMW_WEIGHT_DECAY) * w

    return adamw
