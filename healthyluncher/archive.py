"""The backup archive format: writing one, and reading one back with every check.


An archive is a gzip-compressed tar of regular files, `manifest.json` first::

    manifest.json              format, the base it was made with, labels, hyperparameters,
                               photos' names and dates, a sha256 and size for every other file
    meta.json                  the personal meta.json
    weights.npz                the trained head weights
    examples.npz               the cached head inputs of your photos, with labels and digests
    thumbnails/<sha256>.jpg    your photos at the model's input size, to embed them again

Import reads the archive as a stream into a hidden scratch directory of the models directory,
checking every name, type and size on the way and every checksum at the end. Only then is
the models directory touched, and it changes the way every writer changes it: a staged
personal directory, then one switch of state.json.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from healthyluncher.backupchecks import (
    DIGEST,
    Refused,
    check_base,
    check_examples,
    check_weights,
    load_meta,
    load_npz,
    refuse,
)
from healthyluncher.errors import LuncherError
from healthyluncher.fileio import open_regular, parse_json
from healthyluncher.meta import PersonalMeta
from healthyluncher.records import Examples, Personal, load_examples, load_weights, taught_entries
from healthyluncher.store import Files
from healthyluncher.thumbnails import MAX_THUMBNAIL_BYTES, thumbnail_problem

BACKUP_KIND = "healthyluncher-backup"
BACKUP_FORMAT = 1
MANIFEST = "manifest.json"
# Every name an archive may hold; anything else is refused before it is read.
ALLOWED_NAME = re.compile(
    r"manifest\.json|meta\.json|weights\.npz|examples\.npz|thumbnails/[0-9a-f]{64}\.jpg"
)
# Limits on what an archive may unpack to. A year of lunches is a few thousand photos; with
# a conv feature map as head input, examples.npz of 1000 photos x 8 views is ~500 MiB.
MAX_MEMBERS = 50_000
MAX_MEMBER_BYTES = 2 * 2**30
MAX_TOTAL_BYTES = 4 * 2**30
MAX_MANIFEST_BYTES = 16 * 2**20
# Room for tar headers, padding and the tar reader's read-ahead (10 KiB) between two files:
# a huge pax header (tarfile reads those whole into memory) stops here.
HEADER_ALLOWANCE = 2**20
OVERSIZED_HEADER = "it holds an oversized tar header"
CHUNK = 2**20


@dataclass(frozen=True)
class Backup:
    """A verified archive, unpacked into a scratch directory laid out like a personal one."""

    archive: Path
    directory: Path
    base: dict[str, Any]  # the manifest's description of the base it was made with
    meta: PersonalMeta
    weights: dict[str, np.ndarray]
    examples: Examples
    thumbnails: dict[str, Path]  # digest -> JPEG in `directory`, for the examples' photos
    taught: dict[str, tuple[str, str]]  # digest -> (file name, when taught), as listed


class _BoundedReader:
    """The archive's decompressed bytes, refused once past `limit`: a decompression bomb
    stops here, having cost no more memory or disk than the limit."""

    def __init__(self, source: gzip.GzipFile, archive: Path) -> None:
        self._source = source
        self._archive = archive
        self.position = 0
        # tarfile.open reads the first header before any member is seen.
        self.limit = HEADER_ALLOWANCE
        self.reason = OVERSIZED_HEADER

    def allow(self, end: int, reason: str) -> None:
        self.limit = min(end, MAX_TOTAL_BYTES)
        self.reason = reason if end <= MAX_TOTAL_BYTES else ""

    def read(self, size: int = -1) -> bytes:
        room = self.limit - self.position + 1  # one byte past the limit proves the excess
        data = self._source.read(room if size < 0 else min(size, room))
        self.position += len(data)
        if self.position > self.limit:
            raise refuse(
                self._archive,
                self.reason
                or f"it unpacks to more than {_mib(MAX_TOTAL_BYTES)} (a decompression bomb?)",
            )
        return data


@dataclass(frozen=True)
class _Unpacked:
    sha256: str
    size: int


def read_backup(archive: Path, scratch: Path) -> Backup:
    """Unpack and verify everything: names, types, sizes, checksums, and contents."""
    manifest, unpacked = _unpack(archive, scratch)
    _check_against_manifest(archive, manifest, unpacked)
    base = check_base(archive, manifest.get("base"))
    meta = load_meta(archive, scratch / Files.META)
    if meta.base_sha256 != base["sha256"]:
        raise refuse(archive, "meta.json and manifest.json name different base models")
    personal = Personal(scratch, meta)
    weights = load_npz(archive, scratch / Files.WEIGHTS, lambda: load_weights(personal))
    examples = load_npz(
        archive, scratch / Files.EXAMPLES, lambda: load_examples(personal, (), shared=False)
    )
    check_weights(archive, weights)
    check_examples(archive, examples, meta)
    thumbnails = {}
    for digest in dict.fromkeys(examples.digests):
        path = scratch / Files.THUMBNAILS / f"{digest}.jpg"
        if path.is_file():
            if problem := thumbnail_problem(path, f"thumbnails/{digest}.jpg"):
                raise refuse(archive, problem)
            thumbnails[digest] = path
    taught = taught_entries(manifest.get("taught"))  # an older archive has none
    taught = {d: taught[d] for d in examples.digests if d in taught}
    return Backup(archive, scratch, base, meta, weights, examples, thumbnails, taught)


def _unpack(archive: Path, scratch: Path) -> tuple[dict[str, Any], dict[str, _Unpacked]]:
    """Stream the archive's files into `scratch`, refusing anything but allowed regular files."""
    with open_regular(archive, "a backup") as handle:
        if handle.read(2) != b"\x1f\x8b":
            raise refuse(archive, "not a luncher backup (not a gzip-compressed tar archive)")
        handle.seek(0)
        try:
            with gzip.GzipFile(fileobj=handle, mode="rb") as stream:
                reader = _BoundedReader(stream, archive)
                # "r|": a stream, read once front to back; nothing is extracted by tarfile.
                with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                    return _unpack_members(archive, tar, reader, scratch)
        except Refused:
            raise
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            raise _corrupt(archive, exc) from None


def _unpack_members(
    archive: Path, tar: tarfile.TarFile, reader: _BoundedReader, scratch: Path
) -> tuple[dict[str, Any], dict[str, _Unpacked]]:
    manifest: dict[str, Any] | None = None
    unpacked: dict[str, _Unpacked] = {}
    count = 0
    while True:
        reader.allow(tar.offset + HEADER_ALLOWANCE, OVERSIZED_HEADER)
        member = tar.next()
        if member is None:
            break
        count += 1
        if count > MAX_MEMBERS:
            raise refuse(archive, f"it holds more than {MAX_MEMBERS} files")
        name = member.name
        _check_member(archive, member)
        if name in unpacked or (name == MANIFEST and manifest is not None):
            raise refuse(archive, f"{name!r} appears twice")
        if (name == MANIFEST) != (manifest is None):
            raise refuse(archive, "not a luncher backup (manifest.json is not its first file)")
        limit = MAX_MANIFEST_BYTES if name == MANIFEST else MAX_MEMBER_BYTES
        limit = MAX_THUMBNAIL_BYTES if name.startswith(f"{Files.THUMBNAILS}/") else limit
        if member.size > limit:
            raise refuse(
                archive,
                f"{name!r} unpacks to {_mib(member.size)}, more than the {_mib(limit)} "
                "allowed (a decompression bomb?)",
            )
        if member.offset_data + member.size > MAX_TOTAL_BYTES:
            raise refuse(
                archive,
                f"it unpacks to more than {_mib(MAX_TOTAL_BYTES)} (a decompression bomb?)",
            )
        reader.allow(member.offset_data + member.size + HEADER_ALLOWANCE, "")
        source = tar.extractfile(member)
        assert source is not None  # a regular file
        if name == MANIFEST:
            manifest = _parse_manifest(archive, _read_limited(archive, name, source, limit))
            continue
        unpacked[name] = _copy_limited(archive, name, source, scratch / name, limit)
    if manifest is None:
        raise refuse(archive, "not a luncher backup (it holds no manifest.json)")
    return manifest, unpacked


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    name = member.name
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        raise refuse(archive, f"refusing {name!r}: an absolute path")
    if ".." in parts:
        raise refuse(archive, f"refusing {name!r}: a path that climbs out with '..'")
    if member.issym():
        raise refuse(
            archive, f"refusing {name!r}: a symbolic link (to {member.linkname!r}), not a file"
        )
    if member.islnk():
        raise refuse(
            archive, f"refusing {name!r}: a hard link (to {member.linkname!r}), not a file"
        )
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        kind = "not a regular file"
        if member.isdir():
            kind = "a directory"
        elif member.isfifo():  # isdev() holds for a FIFO too
            kind = "a named pipe"
        elif member.isdev():
            kind = "a device"
        elif member.issparse():
            kind = "a sparse file"
        raise refuse(archive, f"refusing {name!r}: {kind}")
    if not ALLOWED_NAME.fullmatch(name):
        raise refuse(archive, f"refusing {name!r}: not a file a luncher backup holds")


def _read_limited(archive: Path, name: str, source: IO[bytes], limit: int) -> bytes:
    chunks, size = [], 0
    while chunk := _read_chunk(archive, source):
        size += len(chunk)
        if size > limit:
            raise refuse(archive, f"{name!r} unpacks to more than {_mib(limit)}")
        chunks.append(chunk)
    return b"".join(chunks)


def _copy_limited(
    archive: Path, name: str, source: IO[bytes], target: Path, limit: int
) -> _Unpacked:
    digest = hashlib.sha256()
    size = 0
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("xb") as sink:  # "x": never through an existing file or link
            while chunk := _read_chunk(archive, source):
                size += len(chunk)
                if size > limit:
                    raise refuse(archive, f"{name!r} unpacks to more than {_mib(limit)}")
                digest.update(chunk)
                sink.write(chunk)
    except OSError as exc:  # reading errors arrive as Refused: this is the scratch disk
        raise LuncherError(
            f"cannot unpack {archive} into {target.parent}: {exc.strerror or exc}; "
            "nothing was imported"
        ) from None
    return _Unpacked(digest.hexdigest(), size)


def _read_chunk(archive: Path, source: IO[bytes]) -> bytes:
    try:
        return source.read(CHUNK)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise _corrupt(archive, exc) from None


def _corrupt(archive: Path, exc: BaseException) -> Refused:
    detail = str(exc).strip() or type(exc).__name__
    return refuse(archive, f"the archive is truncated or corrupt ({detail})")


def _parse_manifest(archive: Path, data: bytes) -> dict[str, Any]:
    try:
        manifest = parse_json(data)
    except ValueError as exc:
        raise refuse(archive, f"manifest.json is damaged ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != BACKUP_KIND:
        raise refuse(archive, "not a luncher backup (manifest.json does not say so)")
    version = manifest.get("format")
    if version != BACKUP_FORMAT:
        raise refuse(
            archive,
            f"unknown backup format {version!r}: this luncher reads format {BACKUP_FORMAT} "
            "(was it written by a newer luncher?)",
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise refuse(archive, "manifest.json lists no files")
    for name, entry in files.items():
        if name == MANIFEST or not ALLOWED_NAME.fullmatch(name):
            raise refuse(archive, f"manifest.json lists {name!r}, not a file a backup holds")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not DIGEST.fullmatch(entry["sha256"])
            or type(entry.get("size")) is not int
        ):
            raise refuse(archive, f"manifest.json has no valid sha256 and size for {name!r}")
    return manifest


def _check_against_manifest(
    archive: Path, manifest: dict[str, Any], unpacked: dict[str, _Unpacked]
) -> None:
    listed: dict[str, dict[str, Any]] = manifest["files"]
    for name in (Files.META, Files.WEIGHTS, Files.EXAMPLES):
        if name not in listed:
            raise refuse(archive, f"manifest.json does not list {name}")
    unlisted = sorted(unpacked.keys() - listed.keys())
    if unlisted:
        raise refuse(archive, f"{unlisted[0]!r} is not listed in manifest.json")
    missing = sorted(listed.keys() - unpacked.keys())
    if missing:
        raise refuse(archive, f"the archive is incomplete or damaged: {missing[0]} is missing")
    for name, entry in sorted(listed.items()):
        found = unpacked[name]
        if found.size != entry["size"]:
            raise refuse(
                archive, f"{name} has {found.size} bytes, but manifest.json says {entry['size']}"
            )
        if found.sha256 != entry["sha256"]:
            raise refuse(archive, f"{name} does not match its checksum in manifest.json")


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"
