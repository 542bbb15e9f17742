"""The public API's arguments: paths, photos and flags as the library takes them, or the
one-line `LuncherError` a wrong one gets (a TypeError from deep inside before)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from healthyluncher.errors import LuncherError
from healthyluncher.photos import MemoryPhoto, PhotoSource
from healthyluncher.settings import check_argument

# Keyword arguments of the API that are True or False: a string such as "no" is refused,
# not read as True (`reset(purge="no")` must not purge).
FLAGS = frozenset({"base", "new_label", "save", "purge", "force", "rebuild", "int8"}) | {
    "balance_subfolders"
}


def check_options(options: dict[str, Any]) -> None:
    """Refuse a flag that is not a bool, and a callback that is not callable."""
    for name in FLAGS & options.keys():
        check_argument(name, options[name], bool)
    for name in ("progress", "on_wait"):
        function = options.get(name)
        if function is not None and not callable(function):
            raise LuncherError(f"{name} must be a function, not {function!r:.40}")


def path_argument(value: Any, name: str) -> Path:
    """A path argument as a Path, or the one-line error a wrong type gets."""
    if isinstance(value, (str, os.PathLike)):
        if not os.fspath(value):  # Path("") is the current directory
            raise LuncherError(f"{name} is an empty path (an unset variable?)")
        return Path(value)
    raise LuncherError(f"{name} must be a path (str or os.PathLike), not {type(value).__name__}")


def photo_sources(photos: Any) -> list[PhotoSource]:
    """Paths as Paths, bytes as the photo file they hold, in-memory images as lossless
    in-memory photos."""
    if not is_single(photos) and not isinstance(photos, Iterable):
        raise LuncherError(
            f"photos must be a path, an image or a list of them, not {type(photos).__name__}"
        )
    items = [photos] if is_single(photos) else list(photos)
    sources: list[PhotoSource] = []
    for index, item in enumerate(items):
        if isinstance(item, str) and not item:  # Path("") would be the current directory
            raise LuncherError(f"photo {index} is an empty path")
        if isinstance(item, (str, os.PathLike)):
            sources.append(Path(item))
        elif isinstance(item, (bytes, bytearray, memoryview)):  # a file's content, decoded as one
            sources.append(MemoryPhoto(f"<image {index}>", bytes(item)))
        else:
            from healthyluncher.imaging import from_pixels  # Pillow: only for pixels

            sources.append(from_pixels(item, f"<image {index}>"))
    return sources


def is_single(photos: Any) -> bool:
    if isinstance(photos, (str, os.PathLike, bytes, bytearray, memoryview)):
        return True
    if hasattr(photos, "read"):  # a file object is one photo (refused), not a list of lines
        return True
    # A numpy array of pixels is one photo; a list of them is several.
    return hasattr(photos, "shape") or hasattr(photos, "getpixel")


def describe(photos: Any) -> str:
    items = [photos] if is_single(photos) else list(photos)
    return ", ".join(str(item) for item in items) or "(nothing)"
