"""The examples' head inputs, stored once for every kept copy that holds them.

A change writes the views of its new photos into one content-addressed segment, a .npy
file in `examples/` of the models directory, and a copy's examples.npz names the segment
and row of each of its views instead of holding them. Unchanged examples thus cost nothing
per undo step, and a retrain writes only its new photos' views. Past MAX_SEGMENTS
segments, a copy merges all but its largest into one. Segments no kept copy names are
removed with the directories (`ModelStore.collect_garbage`).
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import numpy as np

from healthyluncher.errors import DamagedViewsError
from healthyluncher.fileio import atomic_write_bytes, numpy_problem, regular

FOLDER = "examples"
NAME = re.compile(r"[0-9a-f]{32}\.npy")
MAX_SEGMENTS = 16
# The keys of an examples.npz whose views live in segments.
INDEX_KEYS = ("segments", "origin")


def store_views(
    folder: Path, inputs: np.ndarray, origin: np.ndarray | None, segments: tuple[str, ...]
) -> tuple[np.ndarray, tuple[str, ...]]:
    """(origin, segments) naming a stored row for every view of `inputs`: rows whose origin
    is -1 (or all, without an origin) are written into a new segment, and when the views
    span more than MAX_SEGMENTS segments, all but the largest are merged into one."""
    if origin is None or len(origin) != len(inputs):
        origin, segments = np.full((len(inputs), 2), -1, np.int64), ()
    origin = origin.copy()
    new = np.flatnonzero(origin[:, 0] < 0)
    names = list(segments)
    if len(new):
        names.append(_write(folder, inputs[new]))
        origin[new] = np.stack([np.full(len(new), len(names) - 1), np.arange(len(new))], axis=1)
    if len(_used(origin, len(names))) > MAX_SEGMENTS:
        counts = np.bincount(origin[:, 0], minlength=len(names))
        largest = int(np.argmax(counts))
        merged = np.flatnonzero(origin[:, 0] != largest)
        names.append(_write(folder, inputs[merged]))
        origin[merged] = np.stack(
            [np.full(len(merged), len(names) - 1), np.arange(len(merged))], axis=1
        )
    # Only the segments some view names, renumbered in order.
    used = _used(origin, len(names))
    renumber = np.full(len(names), -1, np.int64)
    renumber[used] = np.arange(len(used))
    origin[:, 0] = renumber[origin[:, 0]]
    return origin, tuple(names[i] for i in used)


def _used(origin: np.ndarray, count: int) -> np.ndarray:
    """The segments some view names, in order (not np.unique: it imports numpy.ma, 30 ms)."""
    return np.flatnonzero(np.bincount(origin[:, 0], minlength=count))


def _write(folder: Path, rows: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(rows, np.float32), allow_pickle=False)
    data = buffer.getvalue()
    name = hashlib.sha256(data).hexdigest()[:32] + ".npy"
    path = folder / name
    if not path.is_file() or path.stat().st_size != len(data):
        folder.mkdir(exist_ok=True)
        atomic_write_bytes(path, data)
    return name


def load_views(folder: Path, origin: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """The views an index names, every value checked first (ValueError, OSError)."""
    names = [str(name) for name in segments.reshape(-1)]
    if segments.ndim != 1 or not all(NAME.fullmatch(name) for name in names):
        raise ValueError("the names of its segments are malformed")
    if origin.ndim != 2 or origin.shape[1] != 2 or origin.dtype.kind not in "iu":
        raise ValueError(f"its index has shape {origin.shape} and type {origin.dtype}")
    try:  # a segment is shared by the undo steps: its damage is not one copy's
        arrays = [
            np.load(regular(folder / name), mmap_mode="r", allow_pickle=False) for name in names
        ]
    except (OSError, ValueError, EOFError) as exc:
        raise DamagedViewsError(
            f"a segment in {folder} cannot be read ({numpy_problem(exc)})"
        ) from None
    shapes = {array.shape[1:] for array in arrays}
    if any(a.dtype != np.float32 or a.ndim < 2 for a in arrays) or len(shapes) > 1:
        raise DamagedViewsError(f"a segment in {folder} holds other data than head inputs")
    which, row = origin[:, 0].astype(np.int64), origin[:, 1].astype(np.int64)
    if len(origin) and (which.min() < 0 or which.max() >= len(arrays) or row.min() < 0):
        raise ValueError("its index names a segment it does not list")
    lengths = np.array([len(a) for a in arrays], np.int64)
    if len(origin) and np.any(row >= lengths[which]):
        raise ValueError("its index names a row past the end of a segment")
    shape = shapes.pop() if shapes else (0,)
    views = np.empty((len(origin), *shape), np.float32)
    for i, array in enumerate(arrays):
        mine = np.flatnonzero(which == i)
        views[mine] = array[row[mine]]
    if not usable(views):  # trained on, they make every weight NaN
        raise DamagedViewsError(f"a segment in {folder} holds values that are not numbers")
    return views


# Past it a head input's square overflows float32, as infinity's does: no network's features
# come near (a random-weight ResNet-50's, the largest measured: mean L1 norm 90,000 over 2,048).
MAX_HEAD_INPUT = 1e18


def usable(values: np.ndarray) -> bool:
    """Head inputs fit to train on: numbers (no NaN, no infinity), none past MAX_HEAD_INPUT."""
    if not values.size:
        return True
    return bool(-MAX_HEAD_INPUT <= values.min() and values.max() <= MAX_HEAD_INPUT)
