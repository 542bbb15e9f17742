"""Personalized models written without the onnx package.

A retrain changes tensors only: the trainable weights and the memory of the user's
examples. When a base is made updatable, the graphs around those tensors (the full model's
skeleton and the head, memory nodes included) are serialized once as a template; a retrain
appends its tensors to them, encoding ONNX's TensorProto by hand. That keeps `import onnx`
(about 60 ms) and the protobuf runtime off the retrain path. `graph.add_memory` remains the
one definition of the memory; the tests check that both ways give the same model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"luncher-template 1\n"
MEMORY_PREFIX = "luncher_memory"
PERSONAL_ROWS = f"{MEMORY_PREFIX}/personal_rows"
PERSONAL_MASK = f"{MEMORY_PREFIX}/personal_mask"
THRESHOLD = f"{MEMORY_PREFIX}/threshold"
STRENGTH = f"{MEMORY_PREFIX}/strength"
MEMORY_TENSORS = (PERSONAL_ROWS, PERSONAL_MASK, THRESHOLD, STRENGTH)

# ONNX TensorProto.DataType values a head's weights may use.
DTYPES: dict[int, Any] = {
    1: np.float32,
    6: np.int32,
    7: np.int64,
    10: np.float16,
    11: np.float64,
}


def memory_tensors(rows: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The memory's two tensors: unit-length rows, transposed to (D, M), and the (C, M)
    mask that is 0 where row m counts for class c and -4 (below any similarity) elsewhere."""
    unit = rows.reshape(len(rows), -1).astype(np.float32)  # a copy: normalized below
    unit /= np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    mask = np.where(keep, 0.0, -4.0).astype(np.float32)
    return unit.T.copy(), mask


def personal_memory(
    rows: np.ndarray, classes: np.ndarray, num_classes: int, threshold: float, strength: float
) -> dict[str, np.ndarray]:
    """The varying memory tensors for the user's examples (rows and their class indices)."""
    unit, mask = memory_tensors(rows, classes[None, :] == np.arange(num_classes)[:, None])
    return {
        PERSONAL_ROWS: unit,
        PERSONAL_MASK: mask,
        THRESHOLD: np.array(threshold, np.float32),
        STRENGTH: np.array(strength, np.float32),
    }


@dataclass(frozen=True)
class Template:
    """A base's personalized graphs without their varying tensors."""

    num_classes: int
    locations: tuple[str, ...]  # external data files the full model names
    dtypes: dict[str, int]  # varying tensor -> ONNX data type
    model_prefix: bytes  # ModelProto without its graph
    model_graph: bytes  # GraphProto without the varying initializers
    head_prefix: bytes
    head_graph: bytes

    def render(self, tensors: dict[str, np.ndarray]) -> tuple[bytes, bytes]:
        """(full model, head) with these tensors, as serialized ONNX models."""
        if set(tensors) != set(self.dtypes):
            raise ValueError(f"the template needs {sorted(self.dtypes)}, not {sorted(tensors)}")
        extra = b"".join(
            _field(5, _tensor(name, value, self.dtypes[name])) for name, value in tensors.items()
        )
        model = self.model_prefix + _field(7, self.model_graph + extra)
        head = self.head_prefix + _field(7, self.head_graph + extra)
        return model, head

    def save(self, path: Path) -> None:
        blobs = (self.model_prefix, self.model_graph, self.head_prefix, self.head_graph)
        header = {
            "num_classes": self.num_classes,
            "locations": list(self.locations),
            "dtypes": self.dtypes,
            "lengths": [len(b) for b in blobs],
        }
        path.write_bytes(MAGIC + json.dumps(header).encode() + b"\n" + b"".join(blobs))


# The last template read, by (path, size, mtime): a retrain renders it twice (before and
# after), and a base directory never changes once published.
_last: dict[tuple[str, int, int], Template | None] = {}


def load(path: Path) -> Template | None:
    """The template, or None when there is none or it is unreadable (the caller then builds
    the graphs with onnx: slower, same result)."""
    try:
        info = path.stat()
    except OSError:
        return None
    key = (str(path), info.st_size, info.st_mtime_ns)
    if key not in _last:
        _last.clear()
        _last[key] = _read(path)
    return _last[key]


def _read(path: Path) -> Template | None:
    try:
        data = path.read_bytes()
        if not data.startswith(MAGIC):
            return None
        end = data.index(b"\n", len(MAGIC))
        header = json.loads(data[len(MAGIC) : end])
        blobs, at = [], end + 1
        for length in header["lengths"]:
            blobs.append(data[at : at + length])
            at += length
        if at != len(data) or len(blobs) != 4:
            return None
        dtypes = {str(k): int(v) for k, v in header["dtypes"].items()}
        if not all(v in DTYPES for v in dtypes.values()):
            return None
        return Template(
            int(header["num_classes"]),
            tuple(str(x) for x in header["locations"]),
            dtypes,
            *blobs,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build(
    model: Any,
    head: Any,
    trainable: tuple[str, ...],
    split_tensor: str,
    num_classes: int,
    replay: tuple[np.ndarray, np.ndarray] | None,
) -> Template:
    """The template of a base: its full model (skeleton) and head with a placeholder memory,
    stripped of the trainable weights and the memory's varying tensors (needs onnx)."""
    import copy

    from healthyluncher import graph

    model, head = copy.deepcopy(model), copy.deepcopy(head)
    locations = tuple(sorted(graph.external_locations(model)))
    logits = head.graph.output[0].name
    placeholder = np.ones((1, 1), np.float32)
    for target in (model, head):
        graph.add_memory(
            target,
            split_tensor,
            logits,
            placeholder,
            np.zeros(1, np.int64),
            num_classes,
            0,
            0,
            replay,
        )
    varying = set(trainable) | set(MEMORY_TENSORS)
    dtypes = {t.name: int(t.data_type) for t in head.graph.initializer if t.name in varying}
    blobs = []
    for target in (model, head):
        kept = [t for t in target.graph.initializer if t.name not in varying]
        if len(target.graph.initializer) - len(kept) != len(varying):
            raise ValueError("the graphs do not hold every trainable weight once")
        del target.graph.initializer[:]
        target.graph.initializer.extend(kept)
        graph_bytes = target.graph.SerializeToString()
        target.ClearField("graph")
        blobs += [target.SerializeToString(), graph_bytes]
    return Template(num_classes, locations, dtypes, *blobs)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field. Repeated message fields may come in any order and
    a message's fields may be split: appending initializers to a serialized graph is valid."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _tensor(name: str, value: np.ndarray, dtype: int) -> bytes:
    """An ONNX TensorProto: dims (1), data_type (2), name (8), raw_data (9, little-endian)."""
    array = np.ascontiguousarray(np.asarray(value, dtype=np.dtype(DTYPES[dtype]).newbyteorder("<")))
    out = bytearray()
    for dim in array.shape:
        out += b"\x08" + _varint(int(dim))
    out += b"\x10" + _varint(dtype)
    encoded = name.encode()
    out += b"\x42" + _varint(len(encoded)) + encoded
    raw = array.tobytes()
    out += b"\x4a" + _varint(len(raw)) + raw
    return bytes(out)
