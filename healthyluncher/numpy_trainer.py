"""Retraining a head that is one linear layer with numpy alone, the way ONNX Runtime would.

onnxruntime-training stopped at 1.19.2 and has no wheel for CPython 3.13 or 3.14. A head that
is exactly one linear layer (Gemm, or MatMul + Add as Keras exports it) needs none of its
machinery: this module repeats `trainers.train` step for step (the same sampling stream, ORT's
`SoftmaxCrossEntropyLoss` with mean reduction, and the `AdamWOptimizer` / `SGDOptimizerV2`
kernels that `generate_artifacts` puts in the optimizer model, with their default settings),
so that a retrain gives the same weights, within float32 rounding, with or without ORT.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from healthyluncher.errors import LuncherError
from healthyluncher.linearhead import LinearHead
from healthyluncher.settings import Hyperparameters
from healthyluncher.trainers import TrainingSet, epoch_order

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
    with hp.seed, per epoch the draws of `trainers.epoch_order` (N weighted by
    `data.weights`, or a permutation when all weights are equal, N capped), batches of
    min(hp.batch_size, batch_limit), mean cross-entropy on the logits, and one AdamW or
    SGD step per batch at hp.learning_rate.
    """
    if len(data) == 0:
        raise LuncherError("nothing to train on")
    params = _Params(spec, spec._checked(start))
    labels = np.asarray(data.labels)
    if labels.min() < 0 or labels.max() >= spec.classes:
        raise LuncherError(f"labels must lie in 0..{spec.classes - 1} for this head")
    inputs_shape = data.inputs.shape[1:]
    if inputs_shape != (spec.features,):
        raise LuncherError(
            f"the head takes {spec.features} features per example, not shape {inputs_shape}"
        )
    step = _optimizer(hp, params.flat)
    batch = max(1, min(hp.batch_size, batch_limit or hp.batch_size))
    p = data.weights / data.weights.sum()
    data = data.joined()
    loss_mean = float("nan")
    # The inputs in the gradients' precision once, when they fit in one array: each batch
    # is then an index, not a copy and a conversion.
    whole = data.inputs.astype(_GRAD_DTYPE) if data.extra is None else None
    rng = np.random.default_rng(hp.seed)
    # The same draws, in the same order, as trainers.train; its rule for weighted sampling
    # (trainers._weighted) is private, so it is repeated here: probabilities spread by more
    # than 1e-12.
    weighted = bool(np.ptp(p) > 1e-12)
    for epoch in range(hp.epochs):
        order = epoch_order(rng, p, weighted)
        losses = []
        for start_at in range(0, len(order), batch):
            idx = order[start_at : start_at + batch]
            x = whole[idx] if whole is not None else data.take(idx)
            losses.append(params.loss_and_gradients(x, labels[idx]))
            step(params.gradients)
        loss_mean = float(np.mean(losses))
        if on_epoch is not None:
            on_epoch(epoch + 1, hp.epochs, loss_mean)
    trained = params.arrays()
    return {name: trained[name] for name in start}, loss_mean


class _Params:
    """The head's parameters in one float32 vector (the weight, then the bias), and their
    gradients in another of the same layout: the optimizer then updates both with one
    elementwise operation each, which rounds every entry exactly as one per parameter
    would (each entry's arithmetic is its own), in half the numpy calls."""

    def __init__(self, spec: LinearHead, start: dict[str, np.ndarray]) -> None:
        self.spec = spec
        self.names = spec.param_names
        self.shapes = [np.shape(start[name]) for name in self.names]
        self.flat = np.concatenate(
            [np.asarray(start[name], np.float32).reshape(-1) for name in self.names]
        )
        self.gradients = np.empty_like(self.flat)
        self.sizes = [int(np.prod(shape)) for shape in self.shapes]
        self._rows: dict[int, np.ndarray] = {}

    def _parts(self, flat: np.ndarray) -> list[np.ndarray]:
        parts, at = [], 0
        for size, shape in zip(self.sizes, self.shapes, strict=True):
            parts.append(flat[at : at + size].reshape(shape))
            at += size
        return parts

    def arrays(self) -> dict[str, np.ndarray]:
        """The parameters, each an array of its own."""
        return {n: part.copy() for n, part in zip(self.names, self._parts(self.flat), strict=True)}

    def loss_and_gradients(self, x: np.ndarray, y: np.ndarray) -> float:
        """ORT's SoftmaxCrossEntropyLoss (reduction "mean", no class weights, no
        ignore_index: onnxblock.loss.CrossEntropyLoss's defaults) of one batch; its
        gradients go to `self.gradients`. (Multiplying by an alpha or beta of 1.0, which
        changes nothing, is skipped.)"""
        spec = self.spec
        xs = x.astype(_GRAD_DTYPE, copy=False)
        parts = self._parts(self.flat.astype(_GRAD_DTYPE))
        weight = parts[0]
        logits = xs @ (weight.T if spec.trans_b else weight)  # (N, C)
        if spec.alpha != 1.0:
            logits *= spec.alpha
        if spec.bias is not None:
            bias = parts[1].reshape(-1)
            logits += bias if spec.beta == 1.0 else spec.beta * bias
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_prob = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        rows = self._rows.get(len(y))
        if rows is None:
            rows = self._rows[len(y)] = np.arange(len(y))
        # ORT returns the loss as float32: round it the same way before it is averaged.
        # (The mean as ndarray.mean takes it, without its Python wrapper.)
        loss = float(np.float32(-(np.add.reduce(log_prob[rows, y]) / len(y))))
        d_logits = np.exp(log_prob)
        d_logits[rows, y] -= 1.0
        d_logits /= len(y)
        d_w = xs.T @ d_logits  # (D, C)
        if spec.alpha != 1.0:
            d_w = spec.alpha * d_w
        grads = self._parts(self.gradients)
        # Rounded to float32 on assignment; transposed on the float32 side, where it is
        # cheaper than a transposing cast.
        (grads[0].T if spec.trans_b else grads[0])[...] = d_w
        if spec.bias is not None:
            d_b = d_logits.sum(axis=0)
            if spec.beta != 1.0:
                d_b = spec.beta * d_b
            np.copyto(grads[1], d_b.reshape(grads[1].shape))
        return loss


def _optimizer(hp: Hyperparameters, params: np.ndarray) -> Callable[[np.ndarray], None]:
    """One optimizer step that updates `params` in place, in float32 as ORT's CPU kernels."""
    # Optimizer.set_learning_rate stores a C++ float.
    lr = np.float32(hp.learning_rate)
    if hp.optimizer == "sgd":

        def sgd(grads: np.ndarray) -> None:
            # SGDOptimizerV2: w = w + (-lr * g).
            np.add(params, -lr * grads, out=params)

        return sgd
    if hp.optimizer != "adamw":
        raise LuncherError(f"unknown optimizer {hp.optimizer!r}; expected adamw or sgd")
    m1 = np.zeros_like(params)
    m2 = np.zeros_like(params)
    scratch = np.empty_like(params)
    one = np.float32(1.0)
    keep1, keep2 = one - ADAMW_BETA1, one - ADAMW_BETA2
    steps = 0

    def adamw(g: np.ndarray) -> None:
        # AdamWOptimizer with adam_mode=1 (Hugging Face's AdamW) and correct_bias=1. The
        # training API passes the step count plus one, so the first step is 1. Each
        # expression keeps the kernel's float32 operation order (in place, into scratch).
        nonlocal steps
        steps += 1
        # 1.f - static_cast<float>(std::pow(alpha_, step)): the power in double.
        correction1 = one - np.float32(float(ADAMW_BETA1) ** steps)
        correction2 = one - np.float32(float(ADAMW_BETA2) ** steps)
        lr_corrected = lr * (np.sqrt(correction2) / correction1)
        # m1 = beta1 * m1 + (1 - beta1) * g
        np.multiply(m1, ADAMW_BETA1, out=m1)
        np.multiply(keep1, g, out=scratch)
        np.add(m1, scratch, out=m1)
        # m2 = beta2 * m2 + (1 - beta2) * g * g
        np.multiply(m2, ADAMW_BETA2, out=m2)
        np.multiply(keep2, g, out=scratch)
        np.multiply(scratch, g, out=scratch)
        np.add(m2, scratch, out=m2)
        # w -= lr_corrected * m1 / (sqrt(m2) + epsilon)
        denominator = np.sqrt(m2)
        np.add(denominator, ADAMW_EPSILON, out=denominator)
        np.multiply(lr_corrected, m1, out=scratch)
        np.divide(scratch, denominator, out=scratch)
        np.subtract(params, scratch, out=params)
        # Decoupled weight decay after the update, with the uncorrected rate.
        if ADAMW_WEIGHT_DECAY:
            np.subtract(params, (lr * ADAMW_WEIGHT_DECAY) * params, out=params)

    return adamw
