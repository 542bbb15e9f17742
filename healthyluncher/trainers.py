"""Training the head: the training set, and ONNX Runtime's on-device training API."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from healthyluncher.errors import LuncherError
from healthyluncher.runtime import (
    MAX_IR_VERSION,
    runtime,
    training,
    training_api,
)
from healthyluncher.settings import Hyperparameters

# (epoch, epochs, loss) after each epoch.
EpochCallback = Callable[[int, int, float], None]


def generate_artifacts(
    head: Any, trainable: tuple[str, ...], optimizer: str, directory: Path
) -> None:
    """Write training, eval and optimizer models and the checkpoint for the head alone."""
    import onnx

    artifacts, _ = training()
    directory.mkdir(parents=True, exist_ok=True)
    optim = {"adamw": artifacts.OptimType.AdamW, "sgd": artifacts.OptimType.SGD}[optimizer]
    try:
        with _native_stderr_silenced():
            artifacts.generate_artifacts(
                head,
                requires_grad=list(trainable),
                frozen_params=[],
                loss=artifacts.LossType.CrossEntropyLoss,
                optimizer=optim,
                artifact_directory=str(directory),
            )
    except Exception as exc:  # ORT raises RuntimeError with C++ text for missing gradients
        missing = re.search(r"gradient builder has not been registered: (\w+)", str(exc))
        if missing:
            raise LuncherError(
                f"the trainable part contains the op {missing.group(1)}, which has no gradient "
                "in ONNX Runtime training; this model cannot be trained past it"
            ) from None
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LuncherError(
            f"cannot build training artifacts for the trainable part: {text}"
        ) from None
    # onnx >= 1.18 writes the optimizer model with an IR version ORT 1.19 refuses.
    for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
        path = directory / name
        model = onnx.load(str(path))
        if model.ir_version > MAX_IR_VERSION:
            model.ir_version = MAX_IR_VERSION
            onnx.save(model, str(path))


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Hide the INFO lines ORT's gradient builder writes to fd 2 whatever the log level."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@dataclass(frozen=True)
class TrainingSet:
    """Cached inputs to the head with integer labels and per-example weights.

    `extra` holds more inputs that follow `inputs` (the replay set), kept apart so that a
    large set of personal examples is never copied just to be trained on.
    """

    inputs: np.ndarray  # (N, *split_shape) float32
    labels: np.ndarray  # (N + len(extra),) int64
    weights: np.ndarray  # (N + len(extra),) float64, relative sampling weight
    extra: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def joined(self, limit_bytes: int = 32 * 2**20) -> TrainingSet:
        """The same set with `extra` appended to `inputs` when both fit in `limit_bytes`:
        one copy up front is cheaper than splitting every batch between the two."""
        if self.extra is None or self.inputs.nbytes + self.extra.nbytes > limit_bytes:
            return self
        inputs = np.concatenate([self.inputs, self.extra]).astype(np.float32, copy=False)
        return TrainingSet(inputs=inputs, labels=self.labels, weights=self.weights)

    def take(self, idx: np.ndarray) -> np.ndarray:
        """The inputs at these indices, as one float32 batch."""
        if self.extra is None:
            return np.ascontiguousarray(self.inputs[idx], dtype=np.float32)
        own = len(self.inputs)
        batch = np.empty((len(idx), *self.inputs.shape[1:]), np.float32)
        mine = idx < own
        batch[mine] = self.inputs[idx[mine]]
        batch[~mine] = self.extra[idx[~mine] - own]
        return batch


@dataclass
class TrainedHead:
    """The trained parameters, with the ORT state they live in (to save a checkpoint)."""

    params: dict[str, np.ndarray]
    final_loss: float
    _state: Any
    _module: Any  # keeps the state's owner alive while the checkpoint is saved

    def save_checkpoint(self, target: Path) -> None:
        api = training_api()
        api.CheckpointState.save_checkpoint(self._state, str(target), include_optimizer_state=False)


def train(
    artifact_dir: Path,
    data: TrainingSet,
    hp: Hyperparameters,
    *,
    start: dict[str, np.ndarray] | None = None,
    batch_limit: int | None = None,
    on_epoch: EpochCallback | None = None,
) -> TrainedHead:
    """Fit the trainable parameters, starting from the base's (or `start`).

    Weights are honoured by sampling: each epoch draws N examples with probability
    proportional to their weight, so the loss itself stays ORT's plain cross-entropy.
    """
    api = training_api()
    if len(data) == 0:
        raise LuncherError("nothing to train on")
    state = api.CheckpointState.load_checkpoint(str(artifact_dir / "checkpoint"))
    # No eval model: it is never run here, and loading it is one more session. One thread:
    # the head is a few small layers on batches of 16, where ONNX Runtime's thread pool
    # costs more than it shares (20 photos x 10 epochs on the shipped head: 18 ms of
    # training instead of 37, and 3 ms to create the session instead of 8).
    options = runtime().SessionOptions()
    options.intra_op_num_threads = 1
    module = api.Module(str(artifact_dir / "training_model.onnx"), state, session_options=options)
    # Parameters can only be assigned once a Module holds the state (before, ORT 1.19
    # crashes with a segmentation fault).
    for name, value in (start or {}).items():
        state.parameters[name] = np.ascontiguousarray(value, dtype=np.float32)
    optimizer = api.Optimizer(str(artifact_dir / "optimizer_model.onnx"), module)
    optimizer.set_learning_rate(hp.learning_rate)
    module.train()
    batch = max(1, min(hp.batch_size, batch_limit or hp.batch_size))
    n = len(data)
    p = data.weights / data.weights.sum()
    data = data.joined()
    loss_mean = float("nan")
    # numpy's generator, not Python's `random` (already imported, where numpy.random costs
    # 12 ms): tried, and the base accuracy lost by personalization moved with the stream
    # (pancakes K=5 over seeds 0-3: 0.91 points with numpy, 1.15 with random), so the
    # measured numbers stay on this one.
    rng = np.random.default_rng(hp.seed)
    for epoch in range(hp.epochs):
        order = rng.choice(n, size=n, replace=True, p=p) if _weighted(p) else rng.permutation(n)
        losses = []
        for start_at in range(0, n, batch):
            idx = order[start_at : start_at + batch]
            loss = module(data.take(idx), data.labels[idx])
            optimizer.step()
            module.lazy_reset_grad()
            losses.append(float(loss))
        loss_mean = float(np.mean(losses))
        if on_epoch is not None:
            on_epoch(epoch + 1, hp.epochs, loss_mean)
    params = {name: np.array(param.data) for name, param in state.parameters if param.requires_grad}
    return TrainedHead(params=params, final_loss=loss_mean, _state=state, _module=module)


def save_checkpoint_with(artifact_dir: Path, params: dict[str, np.ndarray], target: Path) -> None:
    """Write a checkpoint of the head in `artifact_dir` holding `params` (restored weights,
    not trained ones), without training."""
    api = training_api()
    state = api.CheckpointState.load_checkpoint(str(artifact_dir / "checkpoint"))
    # As in `train`: parameters can only be assigned once a Module holds the state (before,
    # ORT 1.19 crashes with a segmentation fault), and the Module must outlive the save.
    module = api.Module(
        str(artifact_dir / "training_model.onnx"), state, str(artifact_dir / "eval_model.onnx")
    )
    for name, value in params.items():
        state.parameters[name] = np.ascontiguousarray(value, dtype=np.float32)
    api.CheckpointState.save_checkpoint(state, str(target), include_optimizer_state=False)
    del module


def _weighted(p: np.ndarray) -> bool:
    return bool(np.ptp(p) > 1e-12)
