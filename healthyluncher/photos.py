"""Finding photos and reading their bytes: what needs no image decoder."""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from healthyluncher.errors import LuncherError

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif"}
)
# Files larger than this are not read into memory at all.
MAX_FILE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class MemoryPhoto:
    """A photo handed over as pixels (a PIL image or a numpy array), encoded losslessly so
    that it is hashed, cached and kept like a file's bytes."""

    name: str  # "<image 3>": its place in the caller's list
    data: bytes

    def __str__(self) -> str:
        return self.name


# A photo as the engine takes it: a file, or pixels from a program.
PhotoSource = Path | MemoryPhoto


@dataclass(frozen=True)
class ImageFailure:
    path: PhotoSource
    error: str


def find_images(inputs: Sequence[PhotoSource]) -> list[PhotoSource]:
    """Files as given, and image files under directories (recursive, sorted).

    Hidden files and directories are skipped: `luncher retrain --label x ~` must not
    find the thumbnails in ~/.local/share/healthyluncher, nor a photo app's caches.
    """
    found: list[PhotoSource] = []
    for item in inputs:
        if isinstance(item, Path) and item.is_dir():
            found.extend(
                sorted(
                    p
                    for p in item.rglob("*")
                    if p.suffix.lower() in IMAGE_SUFFIXES
                    and not any(part.startswith(".") for part in p.relative_to(item).parts)
                    and p.is_file()
                )
            )
        else:
            # A missing file is reported with the others' results, not as a fatal error.
            found.append(item)
    return found


def read_bytes(path: PhotoSource) -> bytes:
    """The file's bytes; a directory, a device, a pipe or a huge file is a LuncherError."""
    if isinstance(path, MemoryPhoto):
        return path.data
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise LuncherError(f"{path}: is a directory, not a photo")
        # A pipe would block the read forever, and /dev/zero would fill the memory.
        if not stat.S_ISREG(info.st_mode):
            raise LuncherError(f"{path}: not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise LuncherError(f"{path}: file is too large ({info.st_size / 2**20:.0f} MiB)")
        with path.open("rb") as file:
            # The file may have grown since stat(): never read more than the limit.
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise LuncherError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise LuncherError(f"{path}: file is too large (over {MAX_FILE_BYTES / 2**20:.0f} MiB)")
    return data


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
