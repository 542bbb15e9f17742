"""The one place that imports ONNX Runtime and its on-device training API."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from healthyluncher.errors import LuncherError


def runtime() -> ModuleType:
    """Import onnxruntime quietly (its INFO logging floods the terminal otherwise)."""
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise LuncherError(
            "onnxruntime is not installed: pip install onnxruntime-training-cpu"
        ) from exc
    onnxruntime.set_default_logger_severity(3)
    module: ModuleType = onnxruntime
    return module


def training() -> tuple[Any, Any]:
    """Return (artifacts, api) from onnxruntime.training without importing torch.

    `onnxruntime/training/__init__.py` imports `.optim`, which imports torch
    (microsoft/onnxruntime#22070). The parts used here (artifacts, onnxblock, api) never
    touch torch, so the package module is registered without running its __init__.
    """
    runtime()
    if "onnxruntime.training" not in sys.modules:
        spec = importlib.util.find_spec("onnxruntime.training")
        if spec is None:
            raise LuncherError(
                "the ONNX Runtime training API is missing: install onnxruntime-training-cpu "
                "and uninstall plain onnxruntime (both own the onnxruntime/ directory)"
            )
        sys.modules["onnxruntime.training"] = importlib.util.module_from_spec(spec)
    from onnxruntime.training import api, artifacts

    return artifacts, api


def inference_session(model: Path | bytes, *, threads: int = 0) -> Any:
    """An InferenceSession on the CPU; `threads=0` lets ONNX Runtime use every core."""
    ort = runtime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own untyped errors for unloadable models
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LuncherError(f"ONNX Runtime cannot load the model: {first_line}") from exc
