"""The contents of a backup archive, checked once it is unpacked and before anything is
imported: meta.json, the arrays of weights.npz and examples.npz, and the manifest's
description of the base it was made with."""

from __future__ import annotations

import math
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from healthyluncher.errors import LuncherError
from healthyluncher.examples import sane_inputs
from healthyluncher.fileio import parse_json
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


def load_npz(archive: Path, path: Path, load: Callable[[], T]) -> T:
    """Check an .npz before numpy reads it: stored (not compressed) members only, each no
    larger than its header declares, so a small file cannot unpack to a huge array."""
    name = path.name
    try:
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
        raise refuse(archive, f"{name} is damaged ({type(exc).__name__}: {exc})") from None


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
