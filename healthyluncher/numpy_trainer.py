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
from typing import TYPE_CHECKING

import numpy as np

from healthyluncher.errors import LuncherError
from healthyluncher.linearhead import LinearHead
from healthyluncher.settings import Hyperparameters
from healthyluncher.trainers import TrainingSet, epoch_order

if TYPE_CHECKING:
    pass

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
            loss, grads = _loss_and_gradients(spec, params, x, labels[idx])
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
    xs = x.astype(_GRAD_DTYPE, copy=False)
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
