"""The public API's arguments: paths, photos and flags as the library takes them, or the
one-line `LuncherError` a wrong one gets (a TypeError from deep inside before)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from healthyluncher.errors import LuncherError
from healthyluncher.photos import MemoryPhoto, PhotoSource, iter_images, refuse_urls
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
    for name in ("progress", "on_wait", "completion"):
        function = options.get(name)
        if function is not None and not callable(function):
            raise LuncherError(f"{name} must be a function, not {function!r:.40}")


def path_argument(value: Any, name: str) -> Path:
    """A path argument as a Path, or the one-line error a wrong type gets."""
    if isinstance(value, (str, os.PathLike)):
        if not os.fspath(value):  # Path("") is the current directory
            raise LuncherError(f"{name} is an empty path (an unset variable?)")
        return Path(os.fsdecode(value))  # also a PathLike of bytes (os.scandir(b"..."))
    raise LuncherError(f"{name} must be a path (str or os.PathLike), not {type(value).__name__}")


def photo_sources(photos: Any, *, former: bool = False) -> list[PhotoSource]:
    """Paths as Paths, bytes as the photo file they hold, in-memory images as lossless
    in-memory photos; with `former` (forget), with the digests of their earlier copies."""
    return [_source(item, index, former) for index, item in enumerate(_items(photos))]


def image_stream(photos: Any) -> Iterator[PhotoSource]:
    """The photos (directories searched) one at a time, each made a source when it is
    reached: a program's generator is read as the results are taken, and its pixels are
    encoded one photo at a time. LuncherError at once when there is none; a URL in a list
    is refused before any photo is read, one in a generator when it is reached."""
    items = _items(photos)
    if not isinstance(items, Iterator):
        refuse_urls(items)
    looked: list[str] = []  # folders without photos, for the error when there is none

    def stream() -> Iterator[PhotoSource]:
        for index, item in enumerate(items):
            source = _source(item, index)
            empty = True
            for found in iter_images([source]):
                empty = False
                yield found
            if empty and len(looked) < _NAMED:
                looked.append(str(source))

    sources = stream()
    first = next(sources, None)
    if first is None:
        raise LuncherError("no image files found in " + (", ".join(looked) or "(nothing)"))
    return itertools.chain([first], sources)


# Empty folders an error names at most (a generator may yield thousands).
_NAMED = 20


def _items(photos: Any) -> Iterable[Any]:
    """One photo as a list of one; a list as itself; any other iterable as its iterator."""
    if is_single(photos):
        return [photos]
    accepted = "photos must be a path, an image or a list of them"
    # A dict iterates as its keys: `{path: label}` would be read as its paths, the labels
    # dropped without a word. Which half is meant is the caller's to say.
    if isinstance(photos, Mapping):
        raise LuncherError(f"{accepted}, not a dict: pass its keys or its values as a list")
    if not isinstance(photos, Iterable):
        raise LuncherError(f"{accepted}, not {type(photos).__name__}")
    return photos if isinstance(photos, Collection) else iter(photos)


def _source(item: Any, index: int, former: bool = False) -> PhotoSource:
    if isinstance(item, str) and not item:  # Path("") would be the current directory
        raise LuncherError(f"photo {index} is an empty path")
    if isinstance(item, (str, os.PathLike)):
        return Path(os.fsdecode(item))
    if isinstance(item, (bytes, bytearray, memoryview)):  # a file's content, decoded as one
        return MemoryPhoto(f"<image {index}>", bytes(item))
    if isinstance(item, MemoryPhoto):  # a result's photo, handed back: named by this list
        return MemoryPhoto(f"<image {index}>", item.data, item.unusable)
    from healthyluncher.imaging import from_pixels  # Pillow: only for pixels

    return from_pixels(item, f"<image {index}>", former=former)


def is_single(photos: Any) -> bool:
    if isinstance(photos, (str, os.PathLike, bytes, bytearray, memoryview, MemoryPhoto)):
        return True
    if hasattr(photos, "read"):  # a file object is one photo (refused), not a list of lines
        return True
    # A numpy array of pixels is one photo; a list of them is several, and so is an array
    # of names or objects (`np.array(paths)`: an iterable of photos, not pixels).
    if getattr(getattr(photos, "dtype", None), "kind", "") in ("U", "S", "O"):
        return getattr(photos, "ndim", 0) == 0
    return hasattr(photos, "shape") or hasattr(photos, "getpixel")
