"""ONNX Runtime: the one place that imports it and its training API, and runs sessions."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from healthyluncher import heldlocks
from healthyluncher.errors import LuncherError
from healthyluncher.fileio import regular

# ONNX Runtime 1.19 (the last training build) loads models up to IR version 10 and opset 21;
# newer onnx releases write IR 11 and up.
MAX_IR_VERSION = 10
MAX_OPSET = 21


@contextmanager
def root_logging_kept() -> Iterator[None]:
    """The program's root logger with the handlers it had: for ONNX Runtime's tools run in
    the program's process where no child Python can be started (their logging.debug and
    logging.warning call logging.basicConfig when the root logger has no handler)."""
    handlers = list(logging.root.handlers)
    try:
        yield
    finally:
        for handler in set(logging.root.handlers) - set(handlers):
            logging.root.removeHandler(handler)


# The submodules of onnxruntime.training imported here, by name (see _training_package).
_TRAINING: dict[str, ModuleType] = {}
_TRAINING_LOCK = heldlocks.module_lock(globals(), "_TRAINING_LOCK")
_MISSING = (
    "the ONNX Runtime training API is missing: install onnxruntime-training-cpu "
    "and uninstall plain onnxruntime (both own the onnxruntime/ directory)"
)


def _training_spec() -> importlib.machinery.ModuleSpec | None:
    """onnxruntime.training's spec, found without importing anything."""
    root = importlib.util.find_spec("onnxruntime")  # finds the package without importing it
    if root is None or not root.submodule_search_locations:
        return None
    locations = list(root.submodule_search_locations)
    return importlib.machinery.PathFinder.find_spec("onnxruntime.training", locations)


@contextmanager
def _training_package() -> Iterator[None]:
    """`onnxruntime.training` in sys.modules without running its __init__, while the block
    runs (with _TRAINING_LOCK held); afterwards sys.modules is as the program had it, plus
    the submodules imported meanwhile.

    `onnxruntime/training/__init__.py` imports `.optim`, which imports torch
    (microsoft/onnxruntime#22070), and `import onnxruntime` itself, in the training build,
    probes `onnxruntime.training.ortmodule`, which would run that __init__ (and import onnx,
    and configure the root logger) on every start. The parts used here (api, onnxblock)
    never touch torch. Left registered, the program's own `import onnxruntime.training`
    would get this uninitialized package instead of its own (or its ImportError).
    """
    spec = None if "onnxruntime.training" in sys.modules else _training_spec()
    if spec is None:  # the program's own, or no training build
        yield
        return
    package = importlib.util.module_from_spec(spec)
    sys.modules["onnxruntime.training"] = package
    try:
        yield
    finally:
        if sys.modules.get("onnxruntime.training") is package:
            del sys.modules["onnxruntime.training"]
        parent = sys.modules.get("onnxruntime")
        if parent is not None and getattr(parent, "training", None) is package:
            delattr(parent, "training")


def runtime() -> ModuleType:
    """Import onnxruntime. Its default logger, the program's, is left as the program set it
    (session_options makes each session of ours quiet by its own options instead)."""
    try:
        if "onnxruntime" not in sys.modules:
            with _TRAINING_LOCK, _training_package():
                import onnxruntime
        import onnxruntime
    except ImportError as exc:
        if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from None  # Ctrl-C as its extension initialized
        raise LuncherError(install_problem() or f"ONNX Runtime cannot be imported ({exc})") from exc
    if _quiet[0] and not _quiet[1]:
        onnxruntime.set_default_logger_severity(4)
        _quiet[1] = True
    module: ModuleType = onnxruntime
    return module


# [asked for, done]: ONNX Runtime's default logger fatal-only (quiet_default_logger).
_quiet = [False, False]


def quiet_default_logger() -> None:
    """For a program whose process is its own, luncher's (the library never calls this):
    ONNX Runtime's default logger, one for the whole process, fatal-only from its import on.
    ONNX Runtime logs a few things outside any session there (a thread-affinity failure in a
    container, say)."""
    _quiet[0] = True
    if "onnxruntime" in sys.modules:
        runtime()


def _training_module(name: str) -> ModuleType:
    """A submodule of onnxruntime.training, imported once (see _training_package)."""
    module = _TRAINING.get(name)
    if module is not None:
        return module
    runtime()
    with _TRAINING_LOCK:
        if name not in _TRAINING:
            if "onnxruntime.training" not in sys.modules and _training_spec() is None:
                raise LuncherError(_MISSING)
            with _training_package():
                _TRAINING[name] = importlib.import_module(name)
        return _TRAINING[name]


def session_options(threads: int = 0) -> Any:
    """SessionOptions for a session of ours, training ones too: `threads` intra-op threads
    (0: every core), and its log fatal-only. Errors come back as exceptions, which are
    reported in one line; ONNX Runtime's default logger is the program's and stays as it is."""
    options = runtime().SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 4
    return options


# Both wheels install the onnxruntime/ directory; whichever came last wins, and the training
# bindings break (microsoft/onnxruntime#21233).
CLASH = (
    "onnxruntime and onnxruntime-training-cpu are both installed and overwrite each other; "
    "fix it with: pip uninstall -y onnxruntime onnxruntime-training-cpu, then install "
    "healthyluncher again"
)


def install_problem() -> str | None:
    """What is wrong with this environment's ONNX Runtime, if anything."""
    from importlib import metadata

    installed = set()
    for name in ("onnxruntime", "onnxruntime-training-cpu", "onnxruntime-training"):
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        installed.add(name)
    if "onnxruntime" in installed and len(installed) > 1:
        return CLASH
    if not installed:
        return "ONNX Runtime is not installed: install healthyluncher again (pip install .)"
    return None


def training_installed() -> bool:
    """Whether the training build is installed, without importing ONNX Runtime (for
    `status`: `training_available` says whether it also works)."""
    return _training_spec() is not None and install_problem() is None


def training_available() -> bool:
    """Whether ONNX Runtime's training API works here (onnxruntime-training-cpu, which
    exists for CPython 3.10 to 3.12 only)."""
    try:
        training_api()
    except (ImportError, LuncherError):
        return False
    return True


def training_api() -> Any:
    """onnxruntime.training.api alone (Module, Optimizer, CheckpointState): what a retrain
    needs, without the artifact generator's imports."""
    return _training_module("onnxruntime.training.api")


def onnxblock() -> tuple[Any, Any, Any, Any]:
    """onnxruntime.training.onnxblock (what generate_artifacts builds with) and its
    _graph_utils, _training_graph_utils and model_accessor modules, without the artifact
    generator's module (which configures the root logger when imported)."""
    names = ("", "._graph_utils", "._training_graph_utils", ".model_accessor")
    blocks, graph_utils, training_graph, accessor = (
        _training_module(f"onnxruntime.training.onnxblock{name}") for name in names
    )
    return blocks, graph_utils, training_graph, accessor


# ONNX Runtime 1.19 fuses MatMul -> Reshape -> BatchNormalization into one Gemm even where
# the MatMul's input has 3 dimensions (torch's dynamo export of LeViT's Linear + BatchNorm1d),
# then refuses the model it made ("Node (MatMulBnFusion_Gemm) ... First input does not have
# rank 2"), or, where those dimensions are unknown (a head cut before it), runs it wrong.
BROKEN_OPTIMIZERS = ["MatMul_BatchNormalization_Fusion"]


def inference_session(model: Path | bytes, *, threads: int = 0) -> Any:
    """An InferenceSession on the CPU; `threads=0` lets ONNX Runtime use every core."""
    ort = runtime()
    options = session_options(threads)
    # Idle ORT threads spin by default, taking the cores the decoding threads need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = str(model) if isinstance(model, Path) else model
    try:
        if isinstance(model, Path):
            regular(model)  # ONNX Runtime would wait on a named pipe forever
        return ort.InferenceSession(
            source,
            options,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=BROKEN_OPTIMIZERS,
        )
    except Exception as exc:  # ORT raises its own untyped errors for unloadable models
        name = model.name if isinstance(model, Path) else "the model"
        raise LuncherError(model_problem(exc, name)) from exc


def input_mismatch(session: Any, name: str, prep: Any) -> str | None:
    """Why the session cannot take the tensors `prep` (settings.Preprocessing, from a
    meta.json anyone can edit) makes under the input `name`, or None when it can."""
    shapes = {node.name: node.shape for node in session.get_inputs()}
    if name not in shapes:
        return f"meta.json names the input {name!r:.40}, which the model does not have"
    sides = (prep.height, prep.width)
    wanted = (prep.channels, *sides) if prep.layout == "NCHW" else (*sides, prep.channels)
    shape = list(shapes[name] or [])
    if len(shape) != 4:  # not an image batch luncher made: ONNX Runtime says what it wants
        return None
    if any(isinstance(a, int) and a != b for a, b in zip(shape[1:], wanted, strict=True)):
        model = "x".join(str(side) if isinstance(side, int) else "?" for side in shape[1:])
        ours = "x".join(map(str, wanted))
        return f"meta.json's input ({prep.layout} {ours}) is not the model's ({model})"
    return None


# ONNX Runtime's exception text: "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model
# from /x/model.onnx failed:Protobuf parsing failed.", often with the C++ source and
# signature that raised it ("/onnxruntime_src/.../model.cc:165 onnxruntime::Model::Model(
# onnx::ModelProto&&, ...) ModelProto does not have a graph.").
_STATUS = re.compile(r"\[ONNXRuntimeError\] : \d+ : (\w+) : ")
_SOURCE = re.compile(r"\S+\.(?:cc|h|cpp):\d+ (?:[^()]*\([^()]*\)(?: const)? )?")
_PREAMBLE = re.compile(
    r"Load model from .* failed:|Exception during initialization: |Failed to load model with "
    r"error: "
)


def ort_text(exc: BaseException) -> str:
    """ONNX Runtime's exception on one line without its status code and C++ sources: what
    is left of its first line ("" when nothing is)."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return _SOURCE.sub("", _PREAMBLE.sub("", _STATUS.sub("", line))).strip()


def model_problem(exc: BaseException, name: str) -> str:
    """What ONNX Runtime's exception says is wrong with the model `name` (a file's name,
    or "the model") that it cannot load, in plain words on one line."""
    text = " ".join(str(exc).split())
    codes = _STATUS.findall(text)
    if "INVALID_PROTOBUF" in codes or "does not have a graph" in text or "No graph" in text:
        return f"{name} is not a valid ONNX file"
    if "NO_SUCHFILE" in codes:
        return f"{name} is missing"
    if "External initializer" in text and "out of bounds" in text:
        return f"the weights file of {name} is cut short"
    if missing := re.search(r"No such file or directory \[(.+?)\]", text):
        return f"the weights file of {name} is missing ({missing[1]})"
    if op := re.search(r"(\S+?)(?:\(-?\d+\))? is not a registered function/op", text):
        return f"{name} uses the op {op[1]}, which ONNX Runtime does not have"
    if op := re.search(r"Could not find an implementation for (\w+)\((\d+)\)", text):
        return f"ONNX Runtime has no kernel for the op {op[1]} (opset {op[2]}) of {name}"
    detail = ort_text(exc)
    if not detail or "::" in detail:  # a C++ signature it was not written for
        detail = codes[-1].lower().replace("_", " ") if codes else type(exc).__name__
    return f"ONNX Runtime cannot load {name}: {detail}"


def pad_batch(batch: np.ndarray, size: int) -> np.ndarray:
    """A batch grown to `size` samples by repeating its last one (a model exported for a
    fixed batch size; a repeated sample moves no calibration range and no other result)."""
    if len(batch) >= size:
        return batch
    return np.concatenate([batch, np.repeat(batch[-1:], size - len(batch), axis=0)])


def run_in_batches(
    run: Callable[[np.ndarray], np.ndarray],
    inputs: np.ndarray,
    *,
    step: int,
    fixed: int | None = None,
) -> np.ndarray:
    """`run` over chunks of `step` samples; a model exported for a `fixed` batch size gets
    chunks of exactly that size, the last one padded by repeating its last sample."""
    size = fixed or step
    parts = []
    for start in range(0, len(inputs), size):
        chunk = inputs[start : start + size]
        count = len(chunk)
        if fixed:
            chunk = pad_batch(chunk, fixed)
        parts.append(np.asarray(run(chunk))[:count])
    return np.concatenate(parts)


def head_batch_limit(head: bytes, sample: np.ndarray) -> int | None:
    """None if the head runs on any batch size; else the one size it accepts (an exporter
    baked batch 1 into a Reshape: torch's dynamo exporter for a batch-1 export)."""
    session = inference_session(head, threads=1)
    name = session.get_inputs()[0].name
    try:
        session.run(None, {name: np.concatenate([sample[:1], sample[:1]])})
        return None
    except Exception:  # noqa: BLE001 - any failure of a batch of two: try one
        session.run(None, {name: sample[:1]})
        return 1


class HeadRunner:
    """Runs a head (split tensor -> logits) for before/after scores."""

    def __init__(self, head: Path | bytes, *, batch_limit: int | None = None) -> None:
        """`head`: a file or serialized model bytes; `batch_limit`: the one batch size the
        head accepts, if its exporter baked one in (`BaseMeta.head_batch_limit`)."""
        self._session = inference_session(head, threads=1)
        self._input = self._session.get_inputs()[0].name
        self._fixed = batch_limit

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        def run(chunk: np.ndarray) -> np.ndarray:
            return np.asarray(self._session.run(None, {self._input: chunk})[0])

        return run_in_batches(run, inputs, step=256, fixed=self._fixed)

    def probabilities(self, inputs: np.ndarray) -> np.ndarray:
        return softmax(self.logits(inputs).astype(np.float64))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities; NaN where the logits overflowed (callers check), without numpy's
    warnings (the library never prints)."""
    with np.errstate(invalid="ignore", over="ignore"):
        shifted = logits - logits.max(axis=-1, keepdims=True)
        exp = np.exp(shifted)
        return exp / exp.sum(axis=-1, keepdims=True)  # type: ignore[no-any-return]
