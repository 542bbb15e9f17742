"""Personalized models written without the onnx package.

A retrain changes tensors only: the trainable weights and the memory of the user's
examples. When a base is made updatable, the graphs around those tensors (the full model's
skeleton and the head, memory nodes included) are serialized once as a template; a retrain
appends its tensors to them, encoding ONNX's TensorProto by hand. That keeps `import onnx`
(about 60 ms) and the protobuf runtime off the retrain path. `heads.add_memory` remains the
one definition of the memory (the tensor names come from there); the tests check that both
ways give the same model.

Why not a fixed-shape personal graph whose weights and memory live in an external-data
file that numpy rewrites: the memory grows with the user's examples (its row count is a
tensor shape), and a new label changes the head's shapes, so the graph changes with both;
a fixed-capacity memory would cost every prediction a matmul against empty rows. Appending
a few length-delimited fields to a serialized graph is the smallest valid change.
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# 2: the memory gives a taught photo its label (heads.add_memory's exact match); 3: each
# remembered example has its own floor (memory.build_memory), and the replay set left the
# graph; 4: the memory measures head inputs from a centre (memory.build_memory); 5: a
# taught photo's label first rises to the head's top logit. An older template is not read,
# and the copy is then built with onnx.
MAGIC = b"luncher-template 5\n"

# ONNX TensorProto.DataType values a head's weights may use.
DTYPES: dict[int, Any] = {
    1: np.float32,
    6: np.int32,
    7: np.int64,
    10: np.float16,
    11: np.float64,
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
        # Parts joined once per model: the memory's rows (10 MB) are copied twice in all.
        extra: list[bytes | memoryview] = []
        for name, value in tensors.items():
            parts = _tensor_parts(name, value, self.dtypes[name])
            extra += [_header(5, sum(len(part) for part in parts)), *parts]
        size = sum(len(part) for part in extra)
        model = b"".join(
            [self.model_prefix, _header(7, len(self.model_graph) + size), self.model_graph, *extra]
        )
        head = b"".join(
            [self.head_prefix, _header(7, len(self.head_graph) + size), self.head_graph, *extra]
        )
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
    if not stat.S_ISREG(info.st_mode):  # /dev/zero would fill the memory, a pipe block
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


def _header(number: int, length: int) -> bytes:
    """The key and length of a length-delimited protobuf field. Repeated message fields may
    come in any order and a message's fields may be split: appending initializers to a
    serialized graph is valid."""
    return _varint(number << 3 | 2) + _varint(length)


def _tensor_parts(name: str, value: np.ndarray, dtype: int) -> list[bytes | memoryview]:
    """An ONNX TensorProto, in parts: dims (1), data_type (2), name (8), raw_data (9,
    little-endian; the array's own memory, not a copy)."""
    array = np.ascontiguousarray(np.asarray(value, dtype=np.dtype(DTYPES[dtype]).newbyteorder("<")))
    out = bytearray()
    for dim in array.shape:
        out += b"\x08" + _varint(int(dim))
    out += b"\x10" + _varint(dtype)
    encoded = name.encode()
    out += b"\x42" + _varint(len(encoded)) + encoded
    raw = array.reshape(-1).view(np.uint8).data  # 1-d bytes, also for an empty array
    out += b"\x4a" + _varint(len(raw))
    return [bytes(out), raw]
