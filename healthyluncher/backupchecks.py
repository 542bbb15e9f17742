"""The contents of a backup archive, checked once it is unpacked and before anything is
imported: meta.json, the arrays of weights.npz and examples.npz, and the manifest's
description of the base it was made with."""

from __future__ import annotations

import math
import os
import re
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from healthyluncher.errors import LuncherError
from healthyluncher.examples import sane_inputs
from healthyluncher.fileio import numpy_problem, parse_json
from healthyluncher.meta import PersonalMeta
from healthyluncher.records import Examples

DIGEST = re.compile(r"[0-9a-f]{64}")

T = TypeVar("T")


class Refused(LuncherError):
    """An archive refused: nothing was imported."""


def refuse(archive: Path, reason: str) -> Refused:
    return Refused(f"{archive}: {reason}; nothing was imported")


# The manifest's description of the base (exporting._describe_base): each key's JSON type.
BASE_KEYS: dict[str, type] = {
    "name": str,
    "sha256": str,
    "labels": list,
    "split_tensor": str,
    "trainable_params": list,
    "preprocessing": dict,
}


def check_base(archive: Path, base: Any) -> dict[str, Any]:
    """The manifest's description of the base the backup was made with, every value of the
    type export writes (an older archive may lack all but sha256)."""
    if not isinstance(base, dict) or not isinstance(base.get("sha256"), str):
        raise refuse(archive, "manifest.json does not say which base the backup was made with")
    for key, kind in BASE_KEYS.items():
        value = base.get(key, kind())
        if not isinstance(value, kind) or (
            isinstance(value, list) and not all(isinstance(item, str) for item in value)
        ):
            raise refuse(archive, f"manifest.json's description of its base is damaged ({key})")
    return base


def load_meta(archive: Path, path: Path) -> PersonalMeta:
    """The archive's meta.json, every value validated by PersonalMeta itself."""
    try:
        return PersonalMeta.from_json(parse_json(path.read_text()))
    except LuncherError as exc:
        raise refuse(archive, f"meta.json is damaged ({exc})") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise refuse(archive, f"meta.json is damaged ({type(exc).__name__}: {exc})") from None


# An .npz of a backup holds a few arrays (examples.npz 4, weights.npz one per trained
# tensor). zipfile reads a zip's whole directory into memory before anything can be
# checked, and a directory that names one stored array over and over costs a few bytes an
# entry, far less once gzipped: the directory is measured from its end record first.
MAX_NPZ_ENTRIES = 1024
_END = b"PK\x05\x06"  # the end of central directory record
_END_SIZE = 22
_ZIP64_LOCATOR = b"PK\x06\x07"


def _directory_entries(path: Path) -> int:
    """How many entries the zip file's directory holds, as its end record says, found as
    zipfile finds it (at the end, else the last one within a comment's reach); more than
    any limit for a zip64 directory (a backup's arrays never need one). ValueError when
    there is no end record."""
    with path.open("rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        handle.seek(max(0, size - _END_SIZE - 0xFFFF - 20))  # 20: a zip64 locator before
        tail = handle.read()
    at = len(tail) - _END_SIZE
    if not (at >= 0 and tail[at : at + 4] == _END and tail[-2:] == b"\0\0"):
        at = tail.rfind(_END)
    if at < 0 or len(tail) - at < _END_SIZE:
        raise ValueError("not a zip file")
    if at >= 20 and tail[at - 20 : at - 16] == _ZIP64_LOCATOR:
        return 1 << 62
    entries, directory_bytes = struct.unpack("<HI", tail[at + 10 : at + 16])
    # 46 bytes per entry at the least: a directory larger than its count says is refused too.
    return max(int(entries), int(directory_bytes) // 46)


def load_npz(archive: Path, path: Path, load: Callable[[], T]) -> T:
    """Check an .npz before numpy reads it: stored (not compressed) members only, each no
    larger than its header declares, so a small file cannot unpack to a huge array."""
    name = path.name
    try:
        if _directory_entries(path) > MAX_NPZ_ENTRIES:
            raise refuse(archive, f"{name} lists more entries than a backup's arrays")
        with zipfile.ZipFile(path) as bundle:
            for info in bundle.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    raise refuse(archive, f"{name} holds a compressed array")
                with bundle.open(info) as entry:
                    version = np.lib.format.read_magic(entry)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(entry)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(entry)
                    else:
                        raise ValueError(f"unsupported .npy version {version}")
                if dtype.hasobject or math.prod(shape) * dtype.itemsize > info.file_size:
                    raise refuse(archive, f"{name} declares arrays larger than it holds")
        return load()
    except Refused:
        raise
    except LuncherError:
        raise refuse(archive, f"{name} is damaged") from None
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        raise refuse(archive, f"{name} is damaged ({numpy_problem(exc)})") from None


def check_weights(archive: Path, weights: dict[str, np.ndarray]) -> None:
    for name, value in weights.items():
        if value.dtype != np.float32 or not np.all(np.isfinite(value)):
            raise refuse(archive, f"weights.npz is damaged ({name!r} is not finite float32)")


def check_examples(archive: Path, examples: Examples, meta: PersonalMeta) -> None:
    count = len(examples.digests)
    problem = ""
    if count == 0:
        problem = "it holds no examples"
    elif len(examples.labels) != count or len(set(examples.digests)) != count:
        problem = "digests and labels do not pair up"
    elif not all(DIGEST.fullmatch(d) for d in examples.digests):
        problem = "a digest is not a sha256"
    elif not set(examples.labels) <= set(meta.labels):
        problem = "a label is missing from meta.json"
    elif (
        examples.inputs.ndim < 2
        or examples.owner.shape != (len(examples.inputs),)
        or examples.owner.min(initial=0) < 0
        or examples.owner.max(initial=0) >= count
        or np.bincount(examples.owner, minlength=count).min() == 0  # a photo without views
        or not sane_inputs(examples.inputs)  # 1e30 blocked every later retrain
    ):
        problem = "inputs and owners do not fit together"
    if problem:
        raise refuse(archive, f"examples.npz is damaged ({problem})")
