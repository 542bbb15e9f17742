"""The frozen weights file (model.data) of personalized copies: copied for the current copy,
shared with the base by an undo step.

The current copy owns its own copy of the base's weights file, because `onnx.load` refuses
external data with more than one hard link, and a developer may load that model with onnx.
An undo step is only ever loaded by ONNX Runtime, so its weights file becomes a hard link
to its base's (the same bytes): each kept step then costs its small graph, not 13 MB more.
When `undo` makes a step current again, it gets its own copy back before state.json names
it (`own`). Where hard links are impossible, the copies simply stay.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import uuid
from pathlib import Path

from healthyluncher.fileio import fsync_dir, regular

NAME = "model.data"


def copy_in_background(source: Path, target: Path) -> threading.Thread:
    """Copy (and fsync) a weights file into a new copy while the head trains: the GIL is
    free during both. A failure leaves nothing behind (the caller copies again)."""

    def copy() -> None:
        if not source.is_file():
            return  # a base from before the weights file: nothing to copy
        try:
            _copy(source, target)
        except OSError:
            with contextlib.suppress(OSError):
                target.unlink()

    thread = threading.Thread(target=copy, name="copy-weights", daemon=True)
    thread.start()
    return thread


def _copy(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def own(copy_dir: Path) -> None:
    """Give a copy that becomes current its own weights file in place of a hard link."""
    target = copy_dir / NAME
    try:
        if target.stat().st_nlink <= 1:
            return
    except FileNotFoundError:
        return  # a copy from before the weights file: the model holds its weights
    temporary = copy_dir / f".{NAME}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        _copy(target, temporary)
        os.replace(temporary, target)
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()
    fsync_dir(copy_dir)


def tidy(copy_dir: Path) -> None:
    """Remove what a killed `own` or `share` left in a copy (with the lock held)."""
    for stale in copy_dir.glob(f".{NAME}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


def share(copy_dir: Path, base_dir: Path) -> None:
    """Make an undo step's weights file a hard link to its base's, when the two hold the
    same bytes; nothing changes when they differ or a link cannot be made."""
    target, source = copy_dir / NAME, base_dir / NAME
    temporary = copy_dir / f".{NAME}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        if os.path.samefile(target, source):
            return
        if not same_bytes(target, source):
            return
        os.link(source, temporary)
        os.replace(temporary, target)
    except OSError:
        pass  # missing files, or a filesystem without hard links: keep the copy
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()


# Bytes compared per read: filecmp's 8 KiB reads took 12 ms for the shipped base's 13.5 MB
# weights file, on every change (its undo step is compared); 64 KiB reads take 3 ms.
COMPARE_CHUNK = 1 << 16


def same_bytes(first: Path, second: Path) -> bool:
    """Whether two files hold the same bytes (OSError if either cannot be read)."""
    with (
        open(regular(first), "rb", buffering=0) as one,
        open(regular(second), "rb", buffering=0) as other,
    ):
        if os.fstat(one.fileno()).st_size != os.fstat(other.fileno()).st_size:
            return False
        while True:
            chunk = one.read(COMPARE_CHUNK)
            if chunk != other.read(COMPARE_CHUNK):  # a short read only keeps the copy
                return False
            if not chunk:
                return True
