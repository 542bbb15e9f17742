"""The one place that imports ONNX Runtime and its on-device training API."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from healthyluncher.errors import LuncherError


def _register_training_package() -> None:
    """Put `onnxruntime.training` in sys.modules without running its __init__.

    `onnxruntime/training/__init__.py` imports `.optim`, which imports torch
    (microsoft/onnxruntime#22070), and `import onnxruntime` itself, in the training build,
    probes `onnxruntime.training.ortmodule`, which would run that __init__ (and import onnx)
    on every start. The parts used here (artifacts, onnxblock, api) never touch torch.
    """
    if "onnxruntime.training" in sys.modules:
        return
    root = importlib.util.find_spec("onnxruntime")  # finds the package without importing it
    if root is None or not root.submodule_search_locations:
        return
    spec = importlib.machinery.PathFinder.find_spec(
        "onnxruntime.training", list(root.submodule_search_locations)
    )
    if spec is not None:
        sys.modules["onnxruntime.training"] = importlib.util.module_from_spec(spec)


def runtime() -> ModuleType:
    """Import onnxruntime quietly (its INFO logging floods the terminal otherwise)."""
    _register_training_package()
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise LuncherError(
            "onnxruntime is not installed: pip install onnxruntime-training-cpu"
        ) from exc
    # Fatal only: errors come back as exceptions, which are reported in one line.
    onnxruntime.set_default_logger_severity(4)
    module: ModuleType = onnxruntime
    return module


def training_api() -> Any:
    """onnxruntime.training.api alone (Module, Optimizer, CheckpointState): what a retrain
    needs, without the artifact generator's imports."""
    runtime()
    if "onnxruntime.training" not in sys.modules:
        raise LuncherError(
            "the ONNX Runtime training API is missing: install onnxruntime-training-cpu "
            "and uninstall plain onnxruntime (both own the onnxruntime/ directory)"
        )
    from onnxruntime.training import api

    return api


def training() -> tuple[Any, Any]:
    """Return (artifacts, api) from onnxruntime.training without importing torch."""
    runtime()
    if "onnxruntime.training" not in sys.modules:
        raise LuncherError(
            "the ONNX Runtime training API is missing: install onnxruntime-training-cpu "
            "and uninstall plain onnxruntime (both own the onnxruntime/ directory)"
        )
    from onnxruntime.training import api, artifacts

    return artifacts, api


def inference_session(model: Path | bytes, *, threads: int = 0) -> Any:
    """An InferenceSession on the CPU; `threads=0` lets ONNX Runtime use every core."""
    ort = runtime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 4
    # Idle ORT threads spin by default, taking the cores the decoding threads need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = str(model) if isinstance(model, Path) else model
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own untyped errors for unloadable models
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LuncherError(f"ONNX Runtime cannot load the model: {first_line}") from exc
