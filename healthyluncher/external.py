"""A model's external data (weights kept in files beside its .onnx), checked before it is read.

onnx reads the `length` bytes a tensor's entry declares, or the rest of its file when it
declares none, whatever the tensor's shape: a model file of a few kilobytes naming a sparse
file beside it had 6 GB read into memory (and the process die) before anything was checked.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import onnx
from onnx import TensorProto
from onnx.external_data_helper import (
    ExternalDataInfo,
    _get_all_tensors,
    load_external_data_for_model,
    uses_external_data,
)

from healthyluncher.errors import LuncherError

# The external weights of one model, in all: well past the largest image classifier.
MAX_EXTERNAL_BYTES = 4 * 2**30

# Bytes per element of the types a classifier's weights come in (others are not checked
# here: onnx and ONNX Runtime read them as they are).
_ITEM_BYTES: dict[int, int] = {
    TensorProto.FLOAT: 4,
    TensorProto.DOUBLE: 8,
    TensorProto.FLOAT16: 2,
    TensorProto.BFLOAT16: 2,
    TensorProto.INT8: 1,
    TensorProto.UINT8: 1,
    TensorProto.INT16: 2,
    TensorProto.UINT16: 2,
    TensorProto.INT32: 4,
    TensorProto.UINT32: 4,
    TensorProto.INT64: 8,
    TensorProto.UINT64: 8,
    TensorProto.BOOL: 1,
}


def load_with_external_data(path: Path) -> onnx.ModelProto:
    """The model at `path` with its external data, each tensor's checked first: as many
    bytes as its shape takes, inside its file, all of them within MAX_EXTERNAL_BYTES."""
    try:
        model = onnx.load(str(path), load_external_data=False)
        total = 0
        for tensor in _get_all_tensors(model):
            if uses_external_data(tensor):
                total += _checked(tensor, path)
                if total > MAX_EXTERNAL_BYTES:
                    raise LuncherError(
                        f"{path}: its external data is over "
                        f"{MAX_EXTERNAL_BYTES / 2**30:.0f} GiB, more than a classifier holds"
                    )
        load_external_data_for_model(model, str(path.parent))  # onnx checks where files are
    except LuncherError:
        raise
    except Exception as exc:  # protobuf's DecodeError; onnx's on external data (missing...)
        why = f"not an ONNX model ({type(exc).__name__})"
        named = any(word in str(exc) for word in ("TensorProto", "External data"))
        raise LuncherError(f"{path}: {exc if named else why}") from None
    return model


def _checked(tensor: TensorProto, path: Path) -> int:
    """The bytes the tensor's external data takes; its entry then names that length."""
    item = _ITEM_BYTES.get(tensor.data_type)
    if item is None:
        return 0
    name = f"{path}: tensor {tensor.name!r:.60}"
    if any(dim < 0 for dim in tensor.dims):
        raise LuncherError(f"{name} has a negative dimension")
    size = int(math.prod(tensor.dims)) * item
    info = ExternalDataInfo(tensor)
    offset = info.offset or 0
    if info.length is not None and info.length != size:
        raise LuncherError(
            f"{name}: its external data claims {info.length} bytes, its shape takes {size}"
        )
    if offset < 0 or size > MAX_EXTERNAL_BYTES:
        raise LuncherError(f"{name}: its external data is out of range")
    try:
        available = os.stat(path.parent / info.location).st_size
    except (OSError, ValueError):
        return size  # missing, or a name onnx refuses: it says which, as it loads
    if offset + size > available:
        raise LuncherError(f"{name}: its external data file {info.location!r:.60} is cut short")
    if info.length is None:  # else onnx reads to the end of the file
        entry = tensor.external_data.add()
        entry.key, entry.value = "length", str(size)
    return size
