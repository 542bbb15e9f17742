"""Finding photos and reading their bytes: what needs no image decoder."""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import re
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from healthyluncher.errors import LuncherError

# What Pillow always reads, under every name it gives these formats (openers.PHOTO_FORMATS;
# MPO is a 3D camera's or a phone's multi-picture JPEG, APNG an animated PNG). Directories
# are searched for these and for `image_suffixes()`.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".png", ".apng", ".webp", ".bmp", ".gif"}
    | {".tif", ".tiff"}
)
# iPhone photos (HEIC) and other HEIF files and sequences, read through pillow-heif.
HEIF_SUFFIXES = frozenset({".heic", ".heics", ".heif", ".heifs", ".hif"})
# Read by Pillow itself when it is built with libavif (its wheels are from 11.3).
AVIF_SUFFIXES = frozenset({".avif", ".avifs"})
# Files larger than this are not read into memory at all.
MAX_FILE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class MemoryPhoto:
    """A photo handed over as pixels (a PIL image or a numpy array), encoded losslessly so
    that it is hashed, cached and kept like a file's bytes."""

    name: str  # "<image 3>": its place in the caller's list
    data: bytes = field(repr=False)  # a photo is megabytes: its repr is its name
    # Why pixels that cannot be used (an image that does not load) have no bytes: reading
    # them fails with it, as reading a damaged file does.
    unusable: str = field(default="", repr=False)
    # Digests its pixels had in an earlier copy (a PIL image turned upright by its EXIF
    # orientation, before luncher turned it): `forget` finds a photo taught from it then.
    also: tuple[str, ...] = field(default=(), repr=False)

    def __str__(self) -> str:
        return self.name

    def to_json(self) -> str:
        """Its name, as `--json` shows a photo: never its bytes."""
        return self.name


# A photo as the engine takes it: a file, or pixels from a program.
PhotoSource = Path | MemoryPhoto


@dataclass(frozen=True)
class ImageFailure:
    """A photo that could not be used, and why (`error`: one line naming it)."""

    path: PhotoSource
    error: str


@cache
def image_suffixes() -> frozenset[str]:
    """The file name endings a directory search picks up: the formats this install decodes.

    Looked up without importing the decoders (pillow-heif alone takes 0.2 s to import).
    """
    suffixes = set(IMAGE_SUFFIXES)
    if _module_exists("pillow_heif") and _module_exists("_pillow_heif"):
        suffixes |= HEIF_SUFFIXES
    if _module_exists("PIL._avif"):
        suffixes |= AVIF_SUFFIXES
    return frozenset(suffixes)


def _module_exists(name: str) -> bool:
    """Whether `name` can be imported, without importing it or its package (find_spec
    imports a submodule's package: Pillow's, for PIL._avif, in a retrain that decodes
    nothing)."""
    package, _, module = name.rpartition(".")
    try:
        if not package:
            return importlib.util.find_spec(name) is not None
        parent = importlib.util.find_spec(package)  # a top-level package: found, not run
        if parent is None or not parent.submodule_search_locations:
            return False
        where = list(parent.submodule_search_locations)
        return importlib.machinery.PathFinder.find_spec(name, where) is not None
    except (ImportError, ValueError):
        return False


# Schemes refused as URLs: luncher reads files on this machine and nothing else.
_URL_SCHEMES = frozenset({"http", "https", "ftp", "ftps", "sftp", "file", "data"})
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(.*)", re.DOTALL)
# A data: URL can be megabytes long: the message shows its start.
_SHOWN_URL_CHARS = 80


def url_error(item: PhotoSource | str) -> LuncherError | None:
    """The error for a URL given as a photo, None for a path (or in-memory photo).

    The CLI and the API turn arguments into Paths, which collapse `https://host/x.jpg`
    into `https:/host/x.jpg`: that spelling is recognized too, and the message shows the
    URL as it was typed. A file that exists under such a name is a file, not a URL.
    """
    if isinstance(item, MemoryPhoto):
        return None
    text = item if isinstance(item, str) else item.as_posix()
    match = _SCHEME.fullmatch(text)
    if match is None:
        return None
    scheme, rest = match.groups()
    kind = scheme.lower()
    if kind not in _URL_SCHEMES:
        return None
    if kind == "data":
        if "," not in rest:  # data:[<media type>][;base64],<data>
            return None
        url = text
    elif rest.startswith("/"):
        # file:///tmp/x.jpg collapses to file:/tmp/x.jpg; https://host/x to https:/host/x.
        url = f"{scheme}://{rest}" if kind == "file" else f"{scheme}://{rest.lstrip('/')}"
    else:
        return None
    if _exists(item):
        return None
    shown = " ".join(url.split())
    if len(shown) > _SHOWN_URL_CHARS:
        shown = shown[: _SHOWN_URL_CHARS - 1] + "\u2026"
    if kind == "file":
        local = rest if not re.match(r"/[A-Za-z]:/", rest) else rest[1:]  # file:///C:/x
        return LuncherError(f"{shown}: a file URL; give the file's path instead ({local})")
    first = "save it as a file" if kind == "data" else "download it"
    return LuncherError(
        f"{shown}: a URL; luncher never downloads anything (nothing leaves your machine): "
        f"{first} first"
    )


def _exists(item: Path | str) -> bool:
    try:
        return os.path.lexists(item)
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name too long: read_bytes reports it with the photo
        return False


def find_images(inputs: Sequence[PhotoSource]) -> list[PhotoSource]:
    """Files as given, and image files under directories (recursive, sorted).

    Hidden files and directories are skipped: `luncher retrain --label x ~` must not
    find the thumbnails in ~/.local/share/healthyluncher, nor a photo app's caches.
    A URL is refused before anything is read (LuncherError).
    """
    refuse_urls(inputs)
    return list(iter_images(inputs))


def every_image(folder: Path) -> list[PhotoSource]:
    """`find_images([folder])` where every photo counts (a base's examples, calibration):
    a folder under it that cannot be opened is a LuncherError, not left out. The search
    yields only photos' names and such folders, some of which cannot even be looked at
    (inside a folder listed but not searched): a name without a photo's suffix is one."""
    found, suffixes = find_images([folder]), image_suffixes()
    for item in found:
        if isinstance(item, Path) and (item.suffix.lower() not in suffixes or _is_dir(item)):
            read_bytes(item)  # its one line
    return found


def refuse_urls(inputs: Iterable[object]) -> None:
    """LuncherError for the first URL among these paths (other items are let be)."""
    for item in inputs:
        if isinstance(item, (str, os.PathLike)):
            error = url_error(item if isinstance(item, (str, Path)) else Path(os.fsdecode(item)))
            if error is not None:
                raise error


def iter_images(inputs: Iterable[PhotoSource]) -> Iterator[PhotoSource]:
    """`find_images` one input at a time, as a program's generator yields them: each URL
    is refused when it is reached."""
    suffixes = image_suffixes()
    for item in inputs:
        refuse_urls([item])
        if isinstance(item, Path) and _is_dir(item):
            yield from sorted(_walk(item, suffixes))
        else:
            # A missing file is reported with the others' results, not as a fatal error.
            yield item


# What a models directory holds (store.STATE_FILE, store.LOCK_FILE), also when it is not
# hidden (LUNCHER_MODELS_DIR=~/luncher-models): a folder search never goes into one.
MODELS_DIR_MARKERS = frozenset({"state.json", ".lock"})


def _walk(root: Path, suffixes: frozenset[str]) -> Iterator[Path]:
    """Image files under `root`, following symlinked folders (a folder of links to dish
    folders is a common way to lay out examples) but never the same folder twice: the
    first in sorted order, so the same tree always gives the same paths, and never into a
    models directory (MODELS_DIR_MARKERS) below `root`. A loop, not
    os.walk, which recurses once per level before Python 3.12 (RecursionError in a
    folder 1,000 levels deep)."""
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            info = os.stat(folder)
            if (info.st_dev, info.st_ino) in seen:  # a link back up the tree, or a twin
                continue
            seen.add((info.st_dev, info.st_ino))
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except FileNotFoundError:  # gone since it was listed
            continue
        except OSError:  # unreadable: yielded, so that read_bytes names it with the photos
            yield folder
            continue
        if folder != root and MODELS_DIR_MARKERS <= {entry.name for entry in entries}:
            continue  # a models directory: its thumbnails are copies of taught photos
        folders: list[Path] = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = folder / entry.name
            photo = path.suffix.lower() in suffixes
            try:  # the type the listing gives; a linked one's target's (a dangling: neither)
                if entry.is_dir():
                    folders.append(path)
                elif photo and (entry.is_file() or entry.is_symlink()):
                    yield path  # a broken link too: read_bytes names it, as an unreadable one
            except OSError:  # a folder listed but not searched: read_bytes says so
                if photo:
                    yield path
        stack.extend(reversed(folders))


def read_bytes(path: PhotoSource) -> bytes:
    """The file's bytes; a directory, a device, a pipe, a huge file or a URL is a
    LuncherError."""
    if isinstance(path, MemoryPhoto):
        if path.unusable:
            raise LuncherError(f"{path.name}: {path.unusable}")
        return path.data
    error = url_error(path)
    if error is not None:
        raise error
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            os.scandir(path).close()  # a folder a search could not open: OSError below
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
        reason = _broken_link(path, exc) or f"{exc.strerror or exc}{_trimmed(path, exc)}"
        raise LuncherError(f"{path}: cannot read: {reason}") from None
    except ValueError:  # os.stat's "embedded null byte"
        raise LuncherError(f"{path}: cannot read: a file name cannot hold a NUL byte") from None
    if len(data) > MAX_FILE_BYTES:
        raise LuncherError(f"{path}: file is too large (over {MAX_FILE_BYTES / 2**20:.0f} MiB)")
    return data


def _broken_link(path: Path, exc: OSError) -> str:
    """For a link whose target is missing, what it points to ("" for any other error)."""
    if not isinstance(exc, FileNotFoundError):
        return ""
    try:
        target = os.readlink(path)
    except (OSError, ValueError):  # not a link, or gone too
        return ""
    return f"broken link (to {target}, which does not exist)"


def _trimmed(path: Path, exc: OSError) -> str:
    """For a missing file whose name has white space around it (a name read from a file
    with its newline), that the name without it exists."""
    text = str(path)
    trimmed = text.strip()
    if not isinstance(exc, FileNotFoundError) or trimmed in ("", text) or not _exists(trimmed):
        return ""
    return f" (without the white space around it, {trimmed} exists)"


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
