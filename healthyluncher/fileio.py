"""Files written so that nothing half-written stands where a reader looks: fsync, replace."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from healthyluncher.errors import DamagedError, LuncherError


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem allows it
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Temporary file in the same directory, flush, fsync, then os.replace.

    `durable=False` skips the fsyncs, for files that are only a cache: after a power cut
    they may be missing or torn, and a torn one is simply computed again.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except OSError as exc:  # another user's 0600 file is unreadable, not damaged
        raise LuncherError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise DamagedError(f"{path} is damaged ({exc})") from None


def fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(Path(dirpath))
