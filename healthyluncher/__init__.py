"""healthyluncher: personalize an ONNX lunch-photo classifier on your own machine.

    import healthyluncher
    lun = healthyluncher.open()                 # the same models directory as `luncher`
    pred = lun.predict(["lunch.jpg"])[0]        # paths, bytes, PIL images, uint8 arrays
    pred.label, pred.probability, pred.probabilities
    lun.retrain("healthy", ["p1.jpg", "p2.jpg"], progress=print)
    lun.undo(); lun.forget(["p1.jpg"]); lun.reset(); lun.status()
    task = healthyluncher.UpdateTask(lun.retrain, "healthy", ["p3.jpg"]).start()
    task.cancel(); task.result()                # Core ML's MLUpdateTask: in a thread
    healthyluncher.make_updatable("model.onnx", labels=["healthy", "fast_food"])
    healthyluncher.to_json(pred)                # as `luncher predict --json` prints it

A photo (`PhotoInput`) is a path, a photo file's bytes, a PIL image or a (H, W, 3) uint8
numpy array; a result names one handed over in memory by a `MemoryPhoto` ("<image 2>": its
place in the list) where it names a file by its `Path`. Every error a caller can act on is
a `LuncherError`; a retrain's unknown label is an `UnknownLabelError` (`label`, `known`).
Results are frozen dataclasses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from healthyluncher.errors import LuncherError, UnknownLabelError
from healthyluncher.version import __version__

if TYPE_CHECKING:
    from healthyluncher.api import Luncher, make_updatable, open
    from healthyluncher.backup import ImportResult
    from healthyluncher.bases import UpdatableResult
    from healthyluncher.events import Progress, ProgressCallback
    from healthyluncher.exporting import ExportResult
    from healthyluncher.imaging import PhotoInput
    from healthyluncher.jsonform import to_json
    from healthyluncher.personalizing import (
        DuplicatePhoto,
        ResetResult,
        RetrainResult,
        Status,
        TrainedPhoto,
        UndoResult,
    )
    from healthyluncher.photos import ImageFailure, MemoryPhoto
    from healthyluncher.predictor import Prediction
    from healthyluncher.settings import Hyperparameters, Preprocessing
    from healthyluncher.tasks import Cancelled, TaskState, UpdateTask
    from healthyluncher.teaching import (
        ForgetResult,
        LabelInfo,
        RenameResult,
        RepairResult,
        TaughtExample,
    )

# Loaded on first use: `luncher --help` and `import healthyluncher` stay fast.
_EXPORTS = {
    "Luncher": "healthyluncher.api",
    "make_updatable": "healthyluncher.api",
    "open": "healthyluncher.api",
    "to_json": "healthyluncher.jsonform",
    "ExportResult": "healthyluncher.exporting",
    "ImportResult": "healthyluncher.backup",
    "UpdatableResult": "healthyluncher.bases",
    "Progress": "healthyluncher.events",
    "ProgressCallback": "healthyluncher.events",
    "ForgetResult": "healthyluncher.teaching",
    "RepairResult": "healthyluncher.teaching",
    "DuplicatePhoto": "healthyluncher.personalizing",
    "ResetResult": "healthyluncher.personalizing",
    "RetrainResult": "healthyluncher.personalizing",
    "Status": "healthyluncher.personalizing",
    "TrainedPhoto": "healthyluncher.personalizing",
    "UndoResult": "healthyluncher.personalizing",
    "ImageFailure": "healthyluncher.photos",
    "MemoryPhoto": "healthyluncher.photos",
    "PhotoInput": "healthyluncher.imaging",
    "Prediction": "healthyluncher.predictor",
    "Hyperparameters": "healthyluncher.settings",
    "Preprocessing": "healthyluncher.settings",
    "LabelInfo": "healthyluncher.teaching",
    "RenameResult": "healthyluncher.teaching",
    "TaughtExample": "healthyluncher.teaching",
    "Cancelled": "healthyluncher.tasks",
    "TaskState": "healthyluncher.tasks",
    "UpdateTask": "healthyluncher.tasks",
}

__all__ = [
    "LuncherError",
    "UnknownLabelError",
    "__version__",
    "Luncher",
    "make_updatable",
    "open",
    "to_json",
    "ExportResult",
    "ImportResult",
    "UpdatableResult",
    "Progress",
    "ProgressCallback",
    "ForgetResult",
    "RepairResult",
    "DuplicatePhoto",
    "ResetResult",
    "RetrainResult",
    "Status",
    "TrainedPhoto",
    "UndoResult",
    "ImageFailure",
    "MemoryPhoto",
    "PhotoInput",
    "Prediction",
    "Hyperparameters",
    "Preprocessing",
    "LabelInfo",
    "RenameResult",
    "TaughtExample",
    "Cancelled",
    "TaskState",
    "UpdateTask",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'healthyluncher' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
