"""Training the head: the training set, and ONNX Runtime's on-device training API."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from healthyluncher import child
from healthyluncher.child import JobError
from healthyluncher.errors import MAKE_UPDATABLE_KEEPING, LuncherError, Message
from healthyluncher.records import GO_BACK, make_updatable_command
from healthyluncher.runtime import root_logging_kept, session_options, training_api
from healthyluncher.settings import Hyperparameters

# Draws per epoch at most. A retrain's personal examples and replayed base examples number a
# few hundred to a couple of thousand rows, and every one is drawn once per epoch on average;
# with years of examples (5,000 photos: 1,690 optimizer steps for a 5-photo retrain) the
# epochs draw this many instead, by the same weights, so training time stops growing.
MAX_DRAWS_PER_EPOCH = 2048

# (epoch, epochs, loss) after each epoch.
EpochCallback = Callable[[int, int, float], None]
# How ONNX Runtime ends the text of a file it could not write: "... error:No space left on
# device errno:28". That is the disk, not the model, and is raised as the OSError it is.
_ERRNO = re.compile(r"errno:(\d+)")


def _as_os_error(exc: Exception) -> Exception:
    match = _ERRNO.search(str(exc))
    if isinstance(exc, OSError) or match is None:
        return exc
    return OSError(int(match.group(1)), os.strerror(int(match.group(1))))


def _save(api: Any, state: Any, target: Path) -> None:
    try:
        api.CheckpointState.save_checkpoint(state, str(target), include_optimizer_state=False)
    except RuntimeError as exc:
        raise _as_os_error(exc) from None


def generate_artifacts(
    head: Any, trainable: tuple[str, ...], optimizer: str, directory: Path
) -> None:
    """Write training, eval and optimizer models and the checkpoint for the head alone.

    The head is first rewritten where ONNX Runtime cannot differentiate an op as exported
    (decompose.py); then its training session is created and runs one step, so that what
    fails in ONNX Runtime fails here, at make-updatable, not at the first retrain. Each
    failure is one line of ours: ONNX Runtime's own text never reaches the user.
    """
    from healthyluncher.decompose import for_training  # onnx: not on the retrain path

    directory.mkdir(parents=True, exist_ok=True)
    model = for_training(head)
    try:
        _write(model, trainable, optimizer, directory)
    except LuncherError:
        raise
    except JobError as exc:  # raised in the child: known by its type's name and text
        if exc.errno is not None:
            raise OSError(exc.errno, os.strerror(exc.errno)) from None
        error = _as_os_error(RuntimeError(exc.message))
        if isinstance(error, OSError):
            raise error from None
        raise LuncherError(*_explain(exc.message, exc.kind, head, trainable)) from None
    except Exception as exc:  # ORT raises RuntimeError and friends with C++ text
        error = _as_os_error(exc)
        if isinstance(error, OSError):  # a full disk: the caller says so
            raise error from None
        raise LuncherError(*_explain(str(exc), type(exc).__name__, head, trainable)) from None


def _write(model: Any, trainable: tuple[str, ...], optimizer: str, directory: Path) -> None:
    """artifacts.write, where it changes nothing of the program's: in this process when the
    root logger has a handler (onnxblock logs with logging.debug, which configures a root
    logger that has none); otherwise in a child Python (about 1 s more), or, where none can
    be started, here with the handler that logging.basicConfig adds removed again."""
    from healthyluncher import artifacts

    if logging.root.handlers:
        artifacts.write(model, trainable, optimizer, directory)
    elif child.python() is not None:
        child.run(
            "healthyluncher.artifacts:child_job",
            {"trainable": list(trainable), "optimizer": optimizer, "directory": str(directory)},
            model.SerializeToString(),
            what="ONNX Runtime's generator of training files",
        )
    else:
        with root_logging_kept():
            artifacts.write(model, trainable, optimizer, directory)


# ONNX Runtime's messages, and what they mean (measured with 1.19.2).
_NO_GRADIENT = re.compile(r"gradient builder has not been registered: (\w+)(?: for node (\S+))?")
_NO_KERNEL = re.compile(r"Could not find an implementation for (\w+?)Grad\(")
_STEP_FAILED = re.compile(r"while running (\w+?)(?:Grad)? node")
_OLD_OPSET = re.compile(r"No Op registered for (\w+) with domain_version of (\d+)")


def _explain(text: str, kind: str, head: Any, trainable: tuple[str, ...]) -> Message:
    """One line for a failure of ONNX Runtime training, without its own text."""
    op = None
    if match := _NO_GRADIENT.search(text):
        op, node = match.group(1), match.group(2)
        where = f"the op {op} ({node!r})" if node else f"the op {op}"
        problem = f"{where} in the trainable part has no gradient in ONNX Runtime training"
    elif match := _NO_KERNEL.search(text):
        op = match.group(1)
        problem = (
            f"the op {op} in the trainable part has no CPU kernel for its gradient "
            "in ONNX Runtime training"
        )
    elif match := _STEP_FAILED.search(text):
        op = match.group(1)
        problem = f"ONNX Runtime training fails to train through the op {op} in the trainable part"
    elif match := _OLD_OPSET.search(text):
        problem = f"ONNX Runtime training has no {match.group(1)} at ONNX opset {match.group(2)}"
    elif "gradient_builder" in text:
        problem = (
            "ONNX Runtime training cannot build the gradient of an op in the trainable "
            "part (an internal check of its gradient builder failed)"
        )
    else:
        problem = f"ONNX Runtime training fails on the trainable part ({kind})"
    return problem, "; ", *_smaller_choices(head, trainable, op)


def _smaller_choices(head: Any, trainable: tuple[str, ...], op: str | None) -> Message:
    """Which smaller `trainable_layers` leave every `op` out of the trainable part."""
    from healthyluncher.cuts import TRAINABLE_LAYERS, Topology, choices, cut_problem
    from healthyluncher.graph import layers_of

    wanted = set(trainable)
    layers = [layer for layer in layers_of(head) if wanted & set(layer.trainable_names)]
    if len(layers) < 2:
        return "the last layer alone already has it, so no ", TRAINABLE_LAYERS, " avoids it"
    if op is None:
        return "a smaller ", TRAINABLE_LAYERS, " may leave it out"
    weights = {t.name for t in head.graph.initializer}
    topology = Topology.of(head, next(i.name for i in head.graph.input if i.name not in weights))
    logits = head.graph.output[0].name
    fine = []
    for n in range(1, len(layers)):
        if cut_problem(topology, layers, n, logits) is None:
            nodes, _ = topology.head(layers[-n].data_input, logits)
            if all(head.graph.node[i].op_type != op for i in nodes):
                fine.append(n)
    if not fine:
        return "no smaller ", TRAINABLE_LAYERS, " leaves it out"
    return choices(fine, len(layers))


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
        _save(training_api(), self._state, target)


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
    state, module = _load(api, artifact_dir, start)
    try:
        optimizer = api.Optimizer(str(artifact_dir / "optimizer_model.onnx"), module)
    except Exception:  # ORT's RuntimeError with C++ text, for a file it cannot parse
        raise _damaged(artifact_dir) from None
    optimizer.set_learning_rate(hp.learning_rate)
    module.train()
    batch = max(1, min(hp.batch_size, batch_limit or hp.batch_size))
    p = data.weights / data.weights.sum()
    data = data.joined()
    loss_mean = float("nan")
    # numpy's generator, not Python's `random` (already imported, where numpy.random costs
    # 12 ms): tried, and the base accuracy lost by personalization moved with the stream
    # (pancakes K=5 over seeds 0-3: 0.91 points with numpy, 1.15 with random), so the
    # measured numbers stay on this one.
    rng = np.random.default_rng(hp.seed)
    for epoch in range(hp.epochs):
        order = epoch_order(rng, p, _weighted(p))
        losses = []
        for start_at in range(0, len(order), batch):
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


def epoch_order(rng: np.random.Generator, p: np.ndarray, weighted: bool) -> np.ndarray:
    """The examples one epoch trains on, in order: N draws weighted by `p` (or a
    permutation when all weights are equal), N the number of examples up to
    MAX_DRAWS_PER_EPOCH. Below the cap every epoch sees as many draws as there are
    examples; above it, a retrain costs the same however many photos were taught before.
    Both trainers call this, so they draw the same examples."""
    n = len(p)
    draws = min(n, MAX_DRAWS_PER_EPOCH)
    if weighted:
        return rng.choice(n, size=draws, replace=True, p=p)
    return rng.permutation(n)[:draws]


def save_checkpoint_with(artifact_dir: Path, params: dict[str, np.ndarray], target: Path) -> None:
    """Write a checkpoint of the head in `artifact_dir` holding `params` (restored weights,
    not trained ones), without training."""
    api = training_api()
    state, module = _load(api, artifact_dir, params)
    _save(api, state, target)
    del module  # the Module must outlive the save


def _load(api: Any, artifact_dir: Path, params: dict[str, np.ndarray] | None) -> tuple[Any, Any]:
    """The head's checkpoint state and its training Module, holding `params` if given."""
    try:
        state = api.CheckpointState.load_checkpoint(str(artifact_dir / "checkpoint"))
        # No eval model: it is never run here, and loading it is one more session. One
        # thread: the head is a few small layers on batches of 16, where ONNX Runtime's
        # thread pool costs more than it shares (20 photos x 10 epochs on the shipped head:
        # 18 ms of training instead of 37, and 3 ms to create the session instead of 8).
        module = api.Module(
            str(artifact_dir / "training_model.onnx"),
            state,
            session_options=session_options(threads=1),
        )
        # Parameters can only be assigned once a Module holds the state (before, ORT 1.19
        # crashes with a segmentation fault).
        for name, value in (params or {}).items():
            state.parameters[name] = np.ascontiguousarray(value, dtype=np.float32)
    except Exception:  # ORT's RuntimeError with C++ text, for a file it cannot parse
        raise _damaged(artifact_dir) from None
    return state, module


def _damaged(artifact_dir: Path) -> LuncherError:
    fix = GO_BACK  # a personalized copy's files (it has more labels than its base)
    if artifact_dir.parent.name.startswith("base-"):
        root = artifact_dir.parent.parent  # the models directory
        fix = ("run ", make_updatable_command(root, MAKE_UPDATABLE_KEEPING))
    return LuncherError(
        f"{artifact_dir} is damaged (ONNX Runtime cannot load its training files); ", *fix
    )


def _weighted(p: np.ndarray) -> bool:
    return bool(np.ptp(p) > 1e-12)
