"""What a model's inputs and outputs mean: its labels, and how a photo becomes its input."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from healthyluncher import graph
from healthyluncher.errors import LuncherError, Param
from healthyluncher.fileio import parse_json
from healthyluncher.meta import check_new_label, label_key
from healthyluncher.settings import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, is_finite_number

# Pixel normalizations by name, in 0..255 units: (mean, std) per channel.
PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # torchvision and timm: ImageNet statistics.
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    # Keras' MobileNet and EfficientNet-Lite and other TF models: pixels to [-1, 1].
    "inception": ((127.5, 127.5, 127.5), (127.5, 127.5, 127.5)),
    # Pixels to [0, 1].
    "unit": ((0.0, 0.0, 0.0), (255.0, 255.0, 255.0)),
    # Pixels as they are, 0..255 (Keras EfficientNet, which normalizes inside the model).
    "raw": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


@dataclass(frozen=True)
class Inputs:
    """How photos become the model's input, and where that came from."""

    preprocessing: Preprocessing
    # "the given mean and std", "the inception preset", "the model's metadata" or "the
    # default (ImageNet mean and std)": make-updatable says which.
    source: str


def model_labels(given: Sequence[str] | None, analysis: graph.Analysis) -> tuple[str, ...]:
    # Checked as every later read of meta.json checks them, so that none is refused there.
    labels = (
        [check_new_label(v) for v in given] if given else graph.metadata_labels(analysis.metadata)
    )
    if not labels:
        raise LuncherError(
            f"the model does not name its {analysis.num_classes} classes; give them with ",
            Param("labels", example="a,b,..."),
            ", or put a new head on it with ",
            Param("examples", example="DIR"),
            " (one subfolder of photos per label)",
        )
    if len(labels) != analysis.num_classes:
        raise LuncherError(
            f"{len(labels)} labels given ({', '.join(labels)}) but the model has "
            f"{analysis.num_classes} outputs; to give it a new head with your labels, use ",
            Param("examples", example="DIR"),
            " (one subfolder of photos per label)",
        )
    if len({label_key(x) for x in labels}) != len(labels) or any(not label for label in labels):
        raise LuncherError("labels must be unique and non-empty")
    return tuple(labels)


def model_inputs(
    analysis: graph.Analysis,
    *,
    preset: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    resize: int | None = None,
) -> Inputs:
    """The preprocessing: `mean` and `std`, else a preset, else the model's metadata,
    else ImageNet's statistics (the most common convention)."""
    meta = _metadata_preprocessing(analysis.metadata)
    image = analysis.input
    crop: Any = meta.get("crop", meta.get("size"))
    try:
        if isinstance(crop, list) and len(crop) == 2:
            crop_h, crop_w = int(crop[0]), int(crop[1])
        elif crop is not None:
            crop_h = crop_w = int(crop)
        else:
            crop_h = crop_w = 224
        height = image.height or crop_h
        width = image.width or crop_w
        if resize is None:  # resize=0 is refused below, not taken for "not given"
            resize = int(meta.get("resize") or round(min(height, width) * 256 / 224))
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(Infinity)
        raise LuncherError(
            "the model's 'preprocessing' metadata has a bad crop or resize"
        ) from None
    if preset is not None and preset not in PRESETS:
        raise LuncherError(Param("preprocessing", preset), f" is not one of {', '.join(PRESETS)}")
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise LuncherError(Param("mean"), " and ", Param("std"), " go together")
        source = "the given mean and std"
    elif preset is not None:
        mean, std = PRESETS[preset]
        source = f"the {preset} preset"
    elif "mean" in meta or "std" in meta:
        mean = meta.get("mean", IMAGENET_MEAN)
        std = meta.get("std", IMAGENET_STD)
        source = "the model's metadata"
    else:
        mean, std = PRESETS["imagenet"]
        source = "the default (ImageNet mean and std)"
    mean, std = _per_channel("mean", mean, image.channels), _per_channel("std", std, image.channels)
    if int(resize) < min(height, width):
        raise LuncherError(
            Param("resize", resize), f" is smaller than the model's input {height}x{width}"
        )
    prep = Preprocessing(
        height=int(height),
        width=int(width),
        resize=int(resize),
        mean=mean,
        std=std,
        layout=image.layout,
        channels=image.channels,
    )  # validates every value, whichever source it came from
    return Inputs(prep, source)


def _metadata_preprocessing(metadata: dict[str, str]) -> dict[str, Any]:
    raw = metadata.get("preprocessing")
    if not raw:
        return {}
    try:
        value = parse_json(raw)
    except ValueError:
        raise LuncherError("the model's 'preprocessing' metadata is not valid JSON") from None
    if not isinstance(value, dict):
        raise LuncherError("the model's 'preprocessing' metadata must be a JSON object")
    return value


def _per_channel(name: str, values: Any, channels: int) -> tuple[float, ...]:
    if not isinstance(values, (list, tuple)) or len(values) not in (1, channels, 3):
        raise LuncherError(f"{name} needs {channels} values (or 1), got {values!r}")
    if not all(is_finite_number(v) for v in values):
        raise LuncherError(f"{name} values must be finite numbers, got {values!r:.80}")
    floats = tuple(float(v) for v in values)
    return floats * 3 if len(floats) == 1 else floats


# The check run's input at most (a 4096x4096 photo is 192 MiB): a model exported for a
# fixed batch of many photos would take more memory than the machine has.
MAX_CHECK_INPUT_BYTES = 2**30


def check_run(session: Any, analysis: graph.Analysis, prep: Preprocessing) -> np.ndarray:
    """Run the model (an InferenceSession) once on a plain input, as every prediction
    will, and refuse it unless it outputs finite scores for the classes it declares;
    returns that input (one batch of zeros, as the model's input shape has it)."""
    batch = analysis.input.batch or 1
    if prep.layout == "NCHW":
        shape = (batch, prep.channels, prep.height, prep.width)
    else:
        shape = (batch, prep.height, prep.width, prep.channels)
    size = math.prod(shape) * 4
    if size > MAX_CHECK_INPUT_BYTES:
        raise LuncherError(
            f"the model takes a fixed batch of {batch} photos of {prep.height}x{prep.width} "
            f"({size / 2**30:.1f} GiB of input each run); export it with a dynamic batch size"
        )
    sample = np.zeros(shape, np.float32)
    try:
        scores = np.asarray(session.run(None, {analysis.input.name: sample})[0])
    except Exception as exc:  # ORT raises untyped errors: a Reshape to an impossible shape
        node = re.search(r"running (\w+) node", str(exc))
        where = f" (its {node[1]} node fails)" if node else ""
        raise LuncherError(f"ONNX Runtime cannot run the model on a plain photo{where}") from exc
    if scores.dtype.kind != "f":
        raise LuncherError(f"the model outputs {scores.dtype} values, not class scores")
    if scores.shape != (batch, analysis.num_classes):
        got = scores.shape[1] if scores.shape[:1] == (batch,) and scores.ndim == 2 else "other"
        raise LuncherError(
            f"the model declares {analysis.num_classes} class scores but outputs {got} "
            f"(an array of shape {scores.shape} for {batch} photo(s))"
        )
    if not np.isfinite(scores.astype(np.float64)).all():
        raise LuncherError(
            "the model outputs NaN or infinity for a plain photo: its weights are NaN or "
            "infinite, or so large that float32 overflows"
        )
    return sample
